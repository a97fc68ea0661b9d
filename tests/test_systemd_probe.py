"""Not tests: the daemon stand-in that test_systemd_manager.py runs as the unit's ExecStart=.

`probe.py serve PORT` does what the daemon does at start under systemd (load an ONNX model,
connect to the broker, then READY=1, then health-driven WATCHDOG=1) and reports what the
sandbox allowed; `probe.py tc` tries the link-shaping actuator's tc call. Every event is one
JSON line on stdout. A file named `stall` next to the probe freezes the pipeline's progress.
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# The pipeline counts as stalled this long after its last progress.
STALL_LIMIT_S = 0.5


def emit(event: str, **kw: Any) -> None:
    """One JSON line per event, with the monotonic time systemd's timestamps also use."""
    record = {"event": event, "t": time.monotonic(), "pid": os.getpid(), **kw}
    print(json.dumps(record), flush=True)


def attempt(fn: Callable[[], object]) -> str:
    """'ok', or the errno name the sandbox answered with."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def write(path: str) -> None:
    """Create (or overwrite) a small file."""
    with open(path, "w") as f:
        f.write("x")


def wx_mapping() -> None:
    """Map memory that is writable and executable at once."""
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()


def sandbox_facts() -> dict[str, Any]:
    """Run the model and try what the unit's sandbox should allow or refuse."""
    import numpy as np
    import onnxruntime as ort

    from edgetok import sdnotify

    state = os.environ.get("STATE_DIRECTORY", "")
    sess = ort.InferenceSession(os.path.join(HERE, "m.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((2, 16), np.float32)})[0]
    return {
        "uid": os.getuid(),
        "write_state": attempt(lambda: write(os.path.join(state, "probe"))),
        "write_etc": attempt(lambda: write("/etc/edgetok-probe")),
        "write_usr": attempt(lambda: write("/usr/edgetok-probe")),
        "netlink": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
        "wx_memory": attempt(wx_mapping),
        "ort_output": list(y.shape),
        "ort_sum": float(y.sum()),
        "credentials": os.environ.get("CREDENTIALS_DIRECTORY"),
        "watchdog_s": sdnotify.watchdog_interval_s(),
    }


async def serve(port: int) -> None:
    """Model, broker, READY=1, then pings while the pipeline progresses, until SIGTERM."""
    from edgetok import sdnotify
    from edgetok.mqttlink import MqttSession
    from edgetok.settings import MqttSettings

    emit("start", **sandbox_facts())
    settings = MqttSettings(
        host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=0.5, session_expiry_s=0
    )
    session = MqttSession(settings, f"etk-probe-{os.getpid()}", password=None, manual_ack=False)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    progress = time.monotonic()

    def stalled() -> bool:
        """True while the test holds the pipeline still (a cheap stat, fine on the loop)."""
        return os.path.exists(os.path.join(HERE, "stall"))

    async def pipeline() -> None:
        nonlocal progress
        while True:
            if not stalled():
                progress = time.monotonic()
            await asyncio.sleep(0.05)

    dog = sdnotify.Watchdog(lambda: time.monotonic() - progress < STALL_LIMIT_S)
    async with asyncio.TaskGroup() as tg:
        mqtt = tg.create_task(session.run())
        emit("connecting")
        await session.connected.wait()
        emit("mqtt_connected")
        sdnotify.notify(sdnotify.READY, sdnotify.status("probe: broker connected, model loaded"))
        emit("ready_sent")
        work = tg.create_task(pipeline())
        ping = tg.create_task(dog.run())
        await stop.wait()
        sdnotify.notify(sdnotify.STOPPING)
        emit("stopping", pings=dog.pings)
        work.cancel()
        ping.cancel()
        await session.close()
        await mqtt


def shape_link() -> None:
    """What the link-shaping actuator does: put a rate limit on an interface with tc."""
    from edgetok import sdnotify

    cmd = ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", "1mbit",
           "burst", "32kbit", "latency", "400ms"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    emit("tc", rc=proc.returncode, stderr=proc.stderr.strip(), uid=os.getuid())
    sdnotify.notify(sdnotify.READY)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        shape_link()
