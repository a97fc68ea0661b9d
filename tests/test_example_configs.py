"""The example configs work together: configs/mosquitto.conf's broker admits the gateway and
server of configs/gateway.toml and configs/server.toml once their users exist."""

from __future__ import annotations

import asyncio
import getpass
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from harness import spawn

from edgetok.procs import free_port, mosquitto_path, stop, wait_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORDS = {"gateway": "gw-secret", "server": "srv-secret"}


def example(name: str) -> dict:
    return tomllib.loads((ROOT / "configs" / name).read_text())


@pytest.fixture
def example_broker(tmp_path: Path) -> Iterator[int]:
    """mosquitto on configs/mosquitto.conf, moved to a free port and a private password file
    holding the users the example configs log in as."""
    work = tmp_path / "broker"
    work.mkdir()
    passwd = work / "edgetok.passwd"
    for role, name in (("gateway", "gateway.toml"), ("server", "server.toml")):
        user = example(name)["mqtt"]["username"]
        subprocess.run(["mosquitto_passwd", *([] if passwd.exists() else ["-c"]), "-b",
                        str(passwd), user, PASSWORDS[role]], check=True, capture_output=True)
    port = free_port()
    conf = (ROOT / "configs/mosquitto.conf").read_text()
    conf = re.sub(r"(?m)^listener 1883 ", f"listener {port} ", conf)
    conf = re.sub(r"(?m)^password_file .*$", f"password_file {passwd}", conf)
    # Root would switch to a user who cannot read this directory.
    conf += f"\npersistence_location {work}/\nuser {getpass.getuser()}\n"
    (work / "mosquitto.conf").write_text(conf)
    with (work / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([mosquitto_path(), "-c", str(work / "mosquitto.conf")],
                                stdout=log, stderr=log)
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop(proc)


async def connect(port: int, username: str | None, password: str | None) -> None:
    async with aiomqtt.Client("127.0.0.1", port, username=username, password=password):
        pass


def test_examples_log_in_and_anonymous_is_refused(example_broker: int, tmp_path: Path,
                                                  tiny_bundle: Path) -> None:
    with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
        asyncio.run(connect(example_broker, None, None))
    gw = example("gateway.toml")
    gw.update(state_dir=str(tmp_path / "gw-state"))
    gw["mqtt"]["port"] = example_broker
    gw["bundle"]["path"] = str(tiny_bundle)
    gw["http"]["port"] = free_port()
    srv = example("server.toml")
    srv["bundles"] = [str(tiny_bundle)]
    srv["mqtt"]["port"] = example_broker
    srv["http"]["port"] = free_port()
    procs = [spawn(role, cfg, tmp_path, role) for role, cfg in
             (("server", srv), ("gateway", gw))]
    for proc in procs:
        # The password comes from the environment, as README "Configuration" says.
        proc.env["EDGETOK_MQTT_PASSWORD"] = PASSWORDS[proc.role]
    try:
        for proc in procs:
            proc.start()  # waits for /readyz, which needs the broker session
            assert proc.get("/readyz")[0] == 200
    finally:
        for proc in procs:
            proc.stop()
