"""Command line: bring a test bed up and hold it, or clean up what dead runs left.

    .venv/bin/python bench/testbed up [--gateways N] [--rate-mbit R] [--cpu SHARE]
    .venv/bin/python bench/testbed --cleanup [--tag PID]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/testbed`: make `testbed` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.net import Testbed, available, cleanup


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    p = argparse.ArgumentParser(prog="testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["up", "check"], default=None,
                   help="up: create and hold until Ctrl-C; check: say whether one can be built")
    p.add_argument("--cleanup", action="store_true",
                   help="remove namespaces and cgroups left by test beds whose owner is dead")
    p.add_argument("--tag", default=None, help="with --cleanup: only this test bed (owner pid)")
    p.add_argument("--gateways", type=int, default=1, help="gateway namespaces")
    p.add_argument("--rate-mbit", type=float, default=None, help="uplink rate (tbf)")
    p.add_argument("--cpu", type=float, default=None, help="gateway CPU share of one core")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cleanup:
        removed = cleanup(args.tag)
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0
    if args.command == "check":
        why = available()
        print("ok" if why is None else f"unavailable: {why}")
        return 0 if why is None else 1
    if args.command != "up":
        p.print_help()
        return 2
    with Testbed(args.gateways) as tb:
        for i, h in enumerate(tb.hosts):
            tb.set_rate(i, args.rate_mbit)
            tb.set_cpu(i, args.cpu)
            print(f"gateway {i}: netns {h.netns}, {h.address} -> server {h.server_address}, "
                  f"cgroup {h.cpu.path}")
        print(f"server: netns {tb.server_ns}")
        print("no propagation delay is added (netem is unavailable): the veth round trip "
              "is tens of microseconds")
        print("run things with: ip netns exec <netns> <command>; Ctrl-C tears down")
        # Blocked, so sigwait (not a handler) takes them; teardown runs on the way out.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
