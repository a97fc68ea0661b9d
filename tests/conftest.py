"""Shared fixtures: a real mosquitto on a free loopback port, and a tiny real bundle."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgetok.procs import free_port, start_mosquitto

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["Broker", "free_port"]


@dataclass
class Broker:
    """A running mosquitto that a test may stop and start again on the same port."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_conf: str = ""

    def start(self) -> None:
        self.proc = start_mosquitto(self.workdir, self.port, self.extra_conf)

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
