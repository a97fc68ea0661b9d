"""CLI front door: --version, --help, config errors with locations, torch-free runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgetok import __version__
from edgetok.gateway.config import GatewayConfig
from edgetok.settings import ConfigError, load_toml, read_secret

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetok", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def test_version_and_help() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    for cmd in ("gateway", "server", "build", "replay", "demo"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0, h.stderr
        assert "usage: edgetok " + cmd in h.stdout
    assert "--check-config" in run_cli("gateway", "--help").stdout


def test_help_shows_defaults_and_the_log_level_goes_either_side_of_the_command() -> None:
    from edgetok.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["gateway", "--config", "g.toml"]).log_level == "INFO"
    assert parse(["gateway", "--config", "g.toml", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parse(["--log-level", "ERROR", "server", "--config", "s.toml"]).log_level == "ERROR"
    replay = run_cli("replay", "--help").stdout
    assert "(default: 1883)" in replay and "EDGETOK_MQTT_PASSWORD" in replay
    assert "(default: False)" not in run_cli("demo", "--help").stdout
    plan = run_cli("--log-level", "WARNING", "plan", "--help")
    assert plan.returncode == 0 and "--scenario" in plan.stdout


BAD = textwrap.dedent("""
    id = "gw 1"
    colour = "blue"
    [mqtt]
    port = 70000
    [bundle]
    path = "nowhere"
    [[streams]]
    name = "imu"
    topics = ["a/b"]
    channels = ["x"]
    rate_hz = -1
    window = 10
""")


def test_bad_config_lists_every_problem_with_its_location(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_toml(cfg, GatewayConfig)
    problems = info.value.problems
    locs = {p.split(":")[0] for p in problems}
    assert {"id", "colour", "mqtt.port", "streams.0.rate_hz"} <= locs, problems
    out = run_cli("gateway", "--config", str(cfg), "--check-config")
    assert out.returncode == 2
    for loc in ("colour: unknown key", "mqtt.port", "streams.0.rate_hz"):
        assert loc in out.stderr


def test_toml_syntax_error_and_missing_file_are_clear(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("id = \n")
    out = run_cli("gateway", "--config", str(cfg), "--check-config")
    assert out.returncode == 2 and "TOML syntax" in out.stderr
    out = run_cli("server", "--config", str(tmp_path / "nope.toml"), "--check-config")
    assert out.returncode == 2 and "file not found" in out.stderr


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(textwrap.dedent("""
        id = "gw1"
        [bundle]
        path = "no-bundle-here"
        [[streams]]
        name = "imu"
        topics = ["a/b"]
        channels = ["x"]
        rate_hz = 10
        window = 10
    """))
    out = run_cli("gateway", "--config", str(cfg), "--check-config")
    assert out.returncode == 2 and "no manifest" in out.stderr


def test_secret_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    inline = SecretStr("from-file")
    monkeypatch.delenv("EDGETOK_MQTT_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_secret("mqtt_password", "EDGETOK_MQTT_PASSWORD", inline) == "from-file"
    monkeypatch.setenv("EDGETOK_MQTT_PASSWORD", "from-env")
    assert read_secret("mqtt_password", "EDGETOK_MQTT_PASSWORD", inline) == "from-env"
    (tmp_path / "mqtt_password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("mqtt_password", "EDGETOK_MQTT_PASSWORD", inline) == "from-credential"


def test_runtime_imports_without_torch() -> None:
    """Gateway and server runtime import in a Python where `import torch` fails."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, Block())
        import edgetok.cli, edgetok.gateway.daemon, edgetok.gateway.http
        import edgetok.agent.server, edgetok.models.runtime, edgetok.tokenizers
        import edgetok.replay, edgetok.demo
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch imported despite the block")
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_taken_http_port_is_a_clear_start_up_error(tmp_path: Path, tiny_bundle: Path) -> None:
    import socket

    from harness import gateway_config

    from edgetok.procs import free_port, to_toml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(gateway_config(tmp_path, tiny_bundle, free_port(), port)))
        out = run_cli("gateway", "--config", str(cfg))
    assert out.returncode == 1
    assert "address already in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_relative_tls_files_are_found_beside_the_config_from_any_directory(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """Under systemd the working directory is /: a certificate named relative to the config
    is found beside it, and --check-config reads it, run from elsewhere."""
    from harness import gateway_config, server_config
    from test_http_auth import make_pki

    from edgetok.procs import to_toml

    conf = tmp_path / "etc"
    make_pki(conf / "pki")
    mqtt_tls = {"ca_file": "pki/ca.crt", "cert_file": "pki/client.crt",
                "key_file": "pki/client.key"}
    gw = gateway_config(tmp_path, tiny_bundle, 1883, 8080)
    gw["mqtt"]["tls"] = mqtt_tls
    gw["http"].update(tls_cert="pki/server.crt", tls_key="pki/server.key")
    gw["actuators"] = {"cgroup": "quota"}
    (conf / "gw.toml").write_text(to_toml(gw))
    loaded = load_toml(conf / "gw.toml", GatewayConfig)
    assert loaded.mqtt.tls is not None and loaded.mqtt.tls.ca_file == conf / "pki" / "ca.crt"
    assert loaded.http.tls_key == conf / "pki" / "server.key"
    assert loaded.actuators.cgroup == conf / "quota"
    out = subprocess.run([sys.executable, "-m", "edgetok", "gateway", "--config",
                          str(conf / "gw.toml"), "--check-config"], capture_output=True,
                         text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    srv = server_config(tiny_bundle, 1883)
    srv["mqtt"]["tls"] = {"ca_file": "pki/missing-ca.crt"}
    (conf / "srv.toml").write_text(to_toml(srv))
    out = run_cli("server", "--config", str(conf / "srv.toml"), "--check-config")
    assert out.returncode == 2 and "mqtt.tls.ca_file: cannot read" in out.stderr
    assert str(conf / "pki" / "missing-ca.crt") in out.stderr


def test_check_config_refuses_what_the_daemon_would_refuse_at_start(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """An API exposed beyond loopback without a token passes validation, but the daemon
    refuses to start with it: so does --check-config, and with a token it is fine."""
    import os

    from harness import gateway_config

    from edgetok.procs import to_toml

    gw = gateway_config(tmp_path, tiny_bundle, 1883, 8080)
    gw["http"]["host"] = "0.0.0.0"
    cfg = tmp_path / "gw.toml"
    cfg.write_text(to_toml(gw))
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGETOK_API_TOKEN", "CREDENTIALS_DIRECTORY")}
    out = run_cli("gateway", "--config", str(cfg), "--check-config", env=env)
    assert out.returncode == 2 and "without a bearer token" in out.stderr
    out = run_cli("gateway", "--config", str(cfg), "--check-config",
                  env={**env, "EDGETOK_API_TOKEN": "s3cret-token-for-the-test"})
    assert out.returncode == 0, out.stderr


def test_check_config_names_every_stream_the_bundle_cannot_take_and_every_other_problem(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """Streams that do not give the model its input passed the check, and then every window
    failed at inference with the daemon ready; now the check names them, with whatever else
    is wrong, and the daemon refuses to start (exit 2)."""
    import os

    from harness import gateway_config

    from edgetok.models.bundle import read_manifest
    from edgetok.procs import to_toml

    spec = read_manifest(tiny_bundle).input
    gw = gateway_config(tmp_path, tiny_bundle, 1883, 8080)
    stream = gw["streams"][0]
    gw["streams"] = [
        {**stream, "name": "few", "channels": spec.channels[:3]},
        {**stream, "name": "short", "window": spec.window // 2},
        {**stream, "name": "fast", "rate_hz": spec.rate_hz * 2},
        {**stream, "name": "twice", "channels": [spec.channels[0]] * len(spec.channels)}]
    gw["http"]["host"] = "0.0.0.0"  # and an exposed API without a token
    cfg = tmp_path / "gw.toml"
    cfg.write_text(to_toml(gw))
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGETOK_API_TOKEN", "CREDENTIALS_DIRECTORY")}
    out = run_cli("gateway", "--config", str(cfg), "--check-config", env=env)
    assert out.returncode == 2
    for line in ("streams.0.channels:", "streams.1.window:", "streams.2.rate_hz:",
                 "streams.3.channels:", "listed more than once", "without a bearer token"):
        assert line in out.stderr, (line, out.stderr)
    gw["http"]["host"] = "127.0.0.1"
    gw["streams"] = gw["streams"][:1]
    cfg.write_text(to_toml(gw))
    out = run_cli("gateway", "--config", str(cfg), env=env)
    assert out.returncode == 2 and "streams.0.channels:" in out.stderr, out.stderr
    gw["streams"] = [stream]
    cfg.write_text(to_toml(gw))
    assert run_cli("gateway", "--config", str(cfg), "--check-config", env=env).returncode == 0
