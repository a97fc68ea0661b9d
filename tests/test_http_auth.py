"""API exposure rules with real processes: loopback only without a token; bearer auth; TLS."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Broker, free_port
from harness import Proc, gateway_config, spawn

TOKEN = "s3cret-test-token"


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with one server and one client certificate, made with openssl."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Pki:
    """CA, server cert for localhost/127.0.0.1 and client cert, all P-256, valid two days."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "2",
             "-subj", "/CN=edgetok test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("client", "clientAuth", "DNS:edgetok-gateway")):
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                       "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        _openssl("req", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
                 "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt", "-CAkey",
                 d / "ca.key", "-CAcreateserial", "-out", d / f"{name}.crt", "-days", "2",
                 "-extfile", ext)
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key")


def _wait_alive(proc: Proc, ctx: ssl.SSLContext | None, timeout: float = 60) -> None:
    """Poll the public /healthz (readyz needs the token here) until it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.logtext()[-2000:]
        try:
            if _get(proc.http_port, "/healthz", ctx=ctx)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(proc.logtext()[-2000:])


def _get(port: int, path: str, token: str | None = None,
         ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        # The event stream never ends: its status and first line are enough.
        body = resp.readline() if path.startswith("/v1/results/stream") else resp.read()
        return resp.status, body
    finally:
        conn.close()


def test_refuses_to_bind_beyond_loopback_without_a_token(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    cfg = gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port())
    cfg["http"]["host"] = "0.0.0.0"
    gw = spawn("gateway", cfg, tmp_path, "gateway")
    gw.env = {"EDGETOK_API_TOKEN": ""}  # an empty token is no token
    gw.start(wait=False)
    assert gw.proc is not None
    assert gw.proc.wait(timeout=60) == 2
    log = gw.logtext()
    assert "refusing to serve the HTTP API beyond loopback without a bearer token" in log
    assert "Traceback" not in log
    with pytest.raises(OSError):
        _get(gw.http_port, "/healthz")


@dataclass
class Exposed:
    """A gateway on 0.0.0.0 with a bearer token and TLS."""

    gw: Proc
    pki: Pki
    ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Exposed]:
    work = tmp_path_factory.mktemp("http_auth")
    pki = make_pki(work / "pki")
    broker = Broker(port=free_port(), workdir=work / "broker")
    broker.start()
    cfg = gateway_config(work, tiny_bundle, broker.port, free_port(), variant="r0.00-s2")
    cfg["http"].update(host="0.0.0.0", tls_cert=str(pki.server_cert),
                       tls_key=str(pki.server_key))
    gw = spawn("gateway", cfg, work, "gateway")
    gw.env = {"EDGETOK_API_TOKEN": TOKEN}
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    gw.start(wait=False)
    try:
        _wait_alive(gw, ctx)
        yield Exposed(gw, pki, ctx)
    finally:
        gw.stop()
        broker.stop()


def _paths(ex: Exposed) -> list[str]:
    code, body = _get(ex.gw.http_port, "/openapi.json", TOKEN, ex.ctx)
    assert code == 200
    return list(json.loads(body)["paths"])


def test_every_endpoint_but_healthz_needs_the_token(exposed: Exposed) -> None:
    port, ctx = exposed.gw.http_port, exposed.ctx
    paths = _paths(exposed)
    assert len(paths) >= 10
    for path in paths:
        with_token = _get(port, path, TOKEN, ctx)[0]
        without = _get(port, path, None, ctx)[0]
        wrong = _get(port, path, TOKEN + "x", ctx)[0]
        if path == "/healthz":
            assert (with_token, without, wrong) == (200, 200, 200)
        else:
            assert with_token == 200, path
            assert (without, wrong) == (401, 401), path
    _, body = _get(port, "/v1/status", None, ctx)
    assert json.loads(body) == {"error": "bearer token required"}
    # Browsers cannot send the header on navigation: the page alone takes it as a parameter.
    assert _get(port, f"/?access_token={TOKEN}", None, ctx)[0] == 200
    assert _get(port, f"/v1/status?access_token={TOKEN}", None, ctx)[0] == 401


def test_spec_declares_the_bearer_scheme(exposed: Exposed) -> None:
    _, body = _get(exposed.gw.http_port, "/openapi.json", TOKEN, exposed.ctx)
    spec = json.loads(body)
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/status"]["get"]["security"] == [{"bearer": []}]
    assert "401" in spec["paths"]["/metrics"]["get"]["responses"]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_tls_serves_the_configured_certificate(exposed: Exposed) -> None:
    port = exposed.gw.http_port
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=exposed.ctx)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    sock = conn.sock
    assert isinstance(sock, ssl.SSLSocket)
    peer = sock.getpeercert()
    assert peer is not None and ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):  # a client without our CA refuses it
        _get(port, "/healthz", ctx=ssl.create_default_context())
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError,
                        http.client.BadStatusLine)):
        _get(port, "/healthz")  # plain HTTP is not served on the TLS port


@pytest.mark.slow
def test_schemathesis_with_token_and_tls(exposed: Exposed, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run",
         f"https://127.0.0.1:{exposed.gw.http_port}/openapi.json",
         "-H", f"Authorization: Bearer {TOKEN}", "--tls-verify", str(exposed.pki.ca),
         "--checks", "all", "--max-examples", "5", "--seed", "1",
         "--exclude-path", "/v1/results/stream"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)  # cache out of the repo
    assert run.returncode == 0, run.stdout[-4000:]
    assert "No issues found" in run.stdout
