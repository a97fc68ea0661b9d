"""Shared fixtures: a real mosquitto on a free loopback port, and a tiny real bundle."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A running mosquitto that a test may stop and start again on the same port."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_conf: str = ""

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.workdir}/\n"
            # Deep queue: the default 1000 drops QoS 1 messages for a slow subscriber.
            "max_queued_messages 100000\nmax_inflight_messages 0\n" + self.extra_conf)
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A private broker for one test."""
    broker = Broker(port=free_port(), workdir=tmp_path / "broker")
    broker.workdir.mkdir()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle from the tiny recipe (scratch backbone, two layers), built once."""
    from edgetok.models.build.recipe import run

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return run(ROOT / "configs/models/tiny.toml", out, force=True, progress=False)
