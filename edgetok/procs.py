"""Child processes for the demo, tests and benchmarks: mosquitto and edgetok daemons."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto")


def free_port() -> int:
    """A loopback TCP port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Serialise nested dicts, lists of dicts and scalars to TOML (enough for our configs)."""
    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    tables: list[tuple[str, Any, bool]] = []
    for k, v in doc.items():
        if isinstance(v, dict):
            tables.append((k, v, False))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v, True))
        elif v is not None:
            lines.append(f"{k} = {scalar(v)}")
    out = "\n".join(lines) + "\n"
    for k, v, many in tables:
        name = f"{prefix}{k}"
        for item in (v if many else [v]):
            out += f"\n[[{name}]]\n" if many else f"\n[{name}]\n"
            out += to_toml(item, prefix=f"{name}.")
    return out


def mosquitto_path() -> str:
    """The mosquitto binary; SystemExit with the install hint if there is none."""
    for c in MOSQUITTO_CANDIDATES:
        found = shutil.which(c)
        if found:
            return found
    raise SystemExit("mosquitto is not installed: apt-get install mosquitto")


def start_mosquitto(workdir: Path, port: int, extra: str = "") -> subprocess.Popen[bytes]:
    """A private broker with persistence and a deep queue, listening on loopback only."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {workdir}/\n"
        # Default 1000 would drop QoS 1 messages queued for a slow or restarting gateway.
        f"user {getpass.getuser()}\n"  # as root it would switch to a user that cannot write here
        "max_queued_messages 100000\n"
        # No broker-side cap on unacked deliveries; the client's Receive Maximum bounds it.
        "max_inflight_messages 0\n"
        # Without it, Nagle plus delayed ACKs add ~40 ms to every small frame and reply.
        "set_tcp_nodelay true\n" + extra)
    with (workdir / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([mosquitto_path(), "-c", str(conf)], stdout=log, stderr=log)
    wait_port(port, proc)
    return proc


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    """Block until something accepts connections on the loopback port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def start_edgetok(role: str, config: Path, log_path: Path,
                  extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m edgetok <role> --config <config>`, logging to a file."""
    import os

    env = {**os.environ, **(extra_env or {})}
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "edgetok", role, "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)


def http_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET a JSON document; (status, body). Non-2xx statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Poll a /readyz URL until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before ready")
        try:
            if http_json(url, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> int | None:
    """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
