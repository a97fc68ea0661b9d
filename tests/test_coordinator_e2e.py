"""Coordinator in the loop: a real gateway and server across a tbf-shaped veth link.

When the link is forced down, the decisions must move toward fewer transmitted bytes, and
every window must still get exactly one result.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from harness import gateway_config, server_config

from edgetok.procs import to_toml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from testbed import Testbed, available

pytestmark = [pytest.mark.slow, pytest.mark.root]

PORT = 1883


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and tc"
    return available()


def _results(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=5)) as con:
            rows = con.execute("SELECT body FROM results ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the gateway is still creating its schema
        return []
    return [json.loads(b) for (b,) in rows]


def _wait(db: Path, n: int, timeout: float = 90) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows = _results(db)
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.3)
        rows = _results(db)
    return rows


def _bytes(manifest: dict[str, Any], row: dict[str, Any]) -> int:
    v = next(v for v in manifest["variants"] if v["id"] == row["variant"]["id"])
    return int(v["profile"]["feature_bytes"][row["variant"]["precision"]])


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_slow_link_moves_decisions_to_fewer_bytes_without_loss(
        tmp_path: Path, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    with Testbed(1) as tb:
        host = tb.hosts[0]
        tb.start_broker(tmp_path / "broker", PORT)
        srv = server_config(tiny_bundle, PORT)
        srv["coordinator"] = {
            "policy": "joint", "resolve_interval_s": 1.0, "switch_cost": 0.0,
            # A power-hungry CPU makes transmitting the cheaper choice while the link is fast.
            "link": {"bandwidth_hz": 20e6, "gain": 7.96e-12, "noise_w_per_hz": 3.98e-20,
                     "p_max_w": 0.1},
            "device": {"f_min_hz": 0.6e9, "f_max_hz": 1.5e9, "kappa": 1e-25},
            "budget": {"deadline_ms": 1000.0}}
        (tmp_path / "server.toml").write_text(to_toml(srv))
        gw = gateway_config(tmp_path, tiny_bundle, PORT, 8080, variant="r0.00-s1",
                            precision="fp32", deadline_ms=1500.0,
                            extra={"telemetry_interval_s": 0.5})
        gw["mqtt"]["host"] = host.server_address
        (tmp_path / "gateway.toml").write_text(to_toml(gw))
        py = [sys.executable, "-m", "edgetok"]
        tb.popen(tb.server_ns, [*py, "server", "--config", str(tmp_path / "server.toml")],
                 log_path=tmp_path / "server.log")
        tb.popen(host.netns, [*py, "gateway", "--config", str(tmp_path / "gateway.toml")],
                 log_path=tmp_path / "gateway.log")
        db = tmp_path / "state" / "edgetok.db"

        replay = tb.popen(tb.server_ns, [*py, "replay", "--port", str(PORT), "--limit", "40",
                                         "--speed", "10", "--chunk", "10"],
                          log_path=tmp_path / "replay.log")
        fast = _wait(db, 16)
        assert len(fast) >= 16, (tmp_path / "gateway.log").read_text()[-2000:]
        fast_bytes = [_bytes(manifest, r) for r in fast[-5:]]
        assert all(b > 0 for b in fast_bytes), f"fast link should transmit: {fast[-5:]}"
        tb.set_rate(0, 0.02)  # 20 kbit/s, mid-replay
        assert replay.wait(timeout=120) == 0
        rows = _wait(db, 40)
        slow_bytes = [_bytes(manifest, r) for r in rows[-5:]]
        assert sum(slow_bytes) < sum(fast_bytes), (fast[-5:], rows[-5:])
        windows = [r["window"] for r in rows]
        assert len(windows) == len(set(windows)) == 40
