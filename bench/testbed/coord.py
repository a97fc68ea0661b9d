"""A stand-in coordinator for the test bed: the real OnlineController over MQTT.

Used until `edgetok server` runs the controller itself (a [coordinator] table in its
config). It does what the edge server will do: fold every gateway's telemetry into the
controller, re-solve on a tick, and publish each changed decision retained on
`edgetok/<gw>/control`. Runs in the server namespace, next to the broker.

    python -m testbed.coord --config controller.json --bundle bundles/reference --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from edgetok.agent.coordinator.online import ControllerConfig, OnlineController
from edgetok.control import ControlError, decode_telemetry, encode_decision
from edgetok.models.bundle import read_manifest
from edgetok.topics import Topics, telemetry_filter

log = logging.getLogger("testbed.coord")

PREFIX = "edgetok"
# Re-solve tick: the controller itself decides whether anything is due, so a short tick
# only costs a cheap check; it bounds how late a decision follows a telemetry report.
TICK_S = 0.25


async def serve(cfg: ControllerConfig, bundle: Path, host: str, port: int) -> None:
    """Run the controller until cancelled."""
    import aiomqtt

    from edgetok.mqttlink import NODELAY

    ctl = OnlineController(cfg, read_manifest(bundle))
    async with aiomqtt.Client(host, port, identifier=f"etk-coord-{cfg.policy}", timeout=30,
                              socket_options=NODELAY) as client:
        await client.subscribe(telemetry_filter(PREFIX), qos=0)

        async def tick() -> None:
            """Re-solve every TICK_S and publish what changed, retained."""
            while True:
                for d in ctl.step(time.time()):
                    await client.publish(Topics(PREFIX, d.gateway).control,
                                         encode_decision(d), qos=1, retain=True)
                await asyncio.sleep(TICK_S)

        ticker = asyncio.create_task(tick())
        try:
            async for msg in client.messages:
                try:
                    ctl.observe(decode_telemetry(bytes(msg.payload)), time.time())
                except ControlError as exc:
                    log.warning("bad telemetry on %s: %s", msg.topic, exc)
        finally:
            ticker.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the controller config (JSON) and serve."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="ControllerConfig as JSON")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ControllerConfig.model_validate(json.loads(args.config.read_text()))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg, args.bundle, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
