"""The `edgetok` command line. Subcommands import their modules lazily (and never torch)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from edgetok import __version__
from edgetok.models.bundle import BundleError
from edgetok.settings import ConfigError

EXAMPLES = """\
examples:
  edgetok demo                                  everything on this machine, live results
  edgetok build --recipe configs/models/reference.toml --out bundles/reference
  edgetok server --config /etc/edgetok/server.toml
  edgetok gateway --config /etc/edgetok/gateway.toml --check-config
  edgetok replay --port 1883 --topic sensors/imu --speed 10
  edgetok plan --bundle bundles/reference --scenario configs/scenarios/wifi.toml --explain
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and action.nargs != 0 and action.default is not None \
            and action.default is not argparse.SUPPRESS  # flags say what they do instead
        return text + " (default: %(default)s)" if shown and "%(default)" not in text else text


LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _check(kind: str, path: Path) -> int:
    """Validate a config, its bundles, the streams against the bundle, and what the daemon
    checks before it starts (a token for an exposed API, readable TLS files); print every
    problem; 0 if all is well."""
    from edgetok.models.bundle import load_manifest

    try:
        if kind == "gateway":
            from edgetok.gateway.config import load as load_gw

            gcfg = load_gw(path)
            bundles = [gcfg.bundle.path]
        else:
            from edgetok.agent.config import load as load_srv

            scfg = load_srv(path)
            bundles = list(scfg.bundles)
    except ConfigError as exc:  # nothing further can be checked without a config
        return _problems(str(exc.source), exc.problems)
    problems: list[str] = []
    for b in bundles:
        try:
            manifest = load_manifest(b)
        except BundleError as exc:
            problems.append(f"bundle {b}: {exc}")
            continue
        if kind == "gateway":
            from edgetok.gateway.compat import stream_problems

            try:
                manifest.variant(gcfg.decision.variant)
            except BundleError as exc:
                problems.append(f"decision.variant: {exc}")
            problems += stream_problems(gcfg.streams, manifest)
    try:
        if kind == "gateway":
            from edgetok.gateway.http import preflight as gateway_preflight

            gateway_preflight(gcfg)
        else:
            from edgetok.agent.http import preflight as server_preflight

            server_preflight(scfg)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        return _problems(str(path), problems)
    print(f"{path}: OK ({kind}; bundles: {', '.join(str(b) for b in bundles)})")
    return 0


def _problems(source: str, problems: list[str]) -> int:
    """Print a config's problems, one per line; the exit status for them."""
    print(f"{source}: invalid config", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 2


def cmd_gateway(args: argparse.Namespace) -> int:
    if args.check_config:
        return _check("gateway", args.config)
    from edgetok.gateway.daemon import main

    return main(args.config)


def cmd_server(args: argparse.Namespace) -> int:
    if args.check_config:
        return _check("server", args.config)
    from edgetok.agent.server import main

    return main(args.config)


def cmd_build(args: argparse.Namespace) -> int:
    try:
        from edgetok.models.build.recipe import run
    except ImportError as exc:
        print(f"edgetok build needs the build extra (torch, onnx, aeon, safetensors): {exc}\n"
              "install with: pip install torch==2.13.0 && pip install 'edgetok[build]'",
              file=sys.stderr)
        return 2
    from edgetok.models.build import BuildError

    try:
        out = run(args.recipe, args.out, force=args.force, progress=not args.no_progress)
    except BuildError as exc:
        print(f"edgetok build: {exc}", file=sys.stderr)
        return 2
    print(f"bundle written to {out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from edgetok.replay import main

    return main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from edgetok.demo import main

    return main(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from edgetok.agent.coordinator.plan import main

    return main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per command."""
    p = argparse.ArgumentParser(
        prog="edgetok", formatter_class=_Help,
        description="IoT sensor-to-token gateway agent: sensor streams arrive over MQTT, "
        "become tokens, run through the head of a pruned transformer on the gateway and the "
        "tail on an edge server, and come back as results over local HTTP and MQTT.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"edgetok {__version__}")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                   help="log verbosity, before or after the command")
    # The same flag after the command: it only overrides when given there.
    level = argparse.ArgumentParser(add_help=False)
    level.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                       help="log verbosity (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            desc: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=desc, formatter_class=_Help,
                            parents=[level])
        sp.set_defaults(func=fn)
        return sp

    g = add("gateway", cmd_gateway, "run the device daemon",
            "Run the gateway daemon: MQTT ingest, journal, windows, head inference, uplink, "
            "results store and the local HTTP API. SIGTERM/SIGINT drain and exit 0.\n\n"
            "exit status: 0 after a clean stop; 1 when the system refuses (a taken port, an "
            "unwritable state_dir); 2 for a bad config or bundle.\n"
            "kill -USR1 <pid> prints every thread's stack (for a stuck daemon).\n"
            "example config: configs/gateway.toml")
    g.add_argument("--config", type=Path, required=True, help="gateway TOML config")
    g.add_argument("--check-config", action="store_true",
                   help="validate the config and bundle, and what the daemon checks before it "
                   "starts (a token for an exposed API, readable TLS files); print every "
                   "problem and exit: 0 if none, else 2")
    s = add("server", cmd_server, "run the edge-server side",
            "Run the edge server: take frames from the shared uplink subscription, run the "
            "tail variant each frame names, and answer on the gateway's downlink; with a "
            "[coordinator] table, also decide every gateway's variant, clock and power.\n\n"
            "exit status: as the gateway's. example config: configs/server.toml")
    s.add_argument("--config", type=Path, required=True, help="server TOML config")
    s.add_argument("--check-config", action="store_true",
                   help="validate the config and bundles, and what the daemon checks before "
                   "it starts; print every problem and exit: 0 if none, else 2")
    b = add("build", cmd_build, "build a model bundle from a recipe",
            "Train, prune, split and profile a model from a recipe; write a bundle directory "
            "(manifest.json + ONNX files + report). Needs the build extra (torch).")
    b.add_argument("--recipe", type=Path, required=True, help="recipe TOML, see configs/models")
    b.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    b.add_argument("--force", action="store_true",
                   help="rebuild even if a bundle of this recipe exists, and write into --out "
                   "even if it holds something else (cached checkpoints are reused)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = add("replay", cmd_replay, "publish a real dataset to MQTT as sensors would",
            "Replay a UCR/UEA dataset (default: BasicMotions test set, 6-axis IMU) as JSON "
            "readings over MQTT at QoS 1, timestamped on the stream's sample grid.")
    from edgetok.replay import add_arguments, positive

    add_arguments(r)
    d = add("demo", cmd_demo, "run everything on this machine",
            "Start a private mosquitto, an edge server and a gateway, replay BasicMotions, and "
            "print a line per result. Ctrl-C (or --duration) stops it cleanly.")
    d.add_argument("--duration", type=positive(float), default=None, metavar="SECONDS",
                   help="stop after this long (default: run until Ctrl-C)")
    d.add_argument("--http-port", type=int, default=None,
                   help="gateway HTTP port (default: 8080, or a free port when 8080 is taken)")
    d.add_argument("--mqtt-port", type=int, default=0, help="broker port (0: a free one)")
    d.add_argument("--bundle", type=Path, default=None,
                   help="bundle to run (default: bundles/reference, else bundles/quick)")
    d.add_argument("--speed", type=positive(float), default=10.0,
                   help="replay speed-up over the 10 Hz sensor rate")
    d.add_argument("--no-build-reference", dest="build_reference", action="store_false",
                   help="when only the quick bundle exists, do not build the reference "
                   "bundle in the background (and switch to it when ready)")
    d.add_argument("--check-config", action="store_true",
                   help="validate the demo's configs and bundle, then exit")
    pl = add("plan", cmd_plan, "print the coordinator's decision for one scenario",
             "Solve the pruning ratio / split / precision / CPU frequency / transmit power "
             "problem for one scenario. Run `edgetok plan --help` for its options.")
    pl.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the planner")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = 2 if argv[:1] == ["--log-level"] else 1 if argv[:1] and \
        argv[0].startswith("--log-level=") else 0
    if argv[first:first + 1] == ["plan"]:  # the planner owns its flags, --help included
        from edgetok.agent.coordinator.plan import main as plan_main

        return plan_main(argv[first + 1:])
    args = build_parser().parse_args(argv)
    # `kill -USR1 <pid>` prints every thread's stack: the first tool for a stuck daemon.
    faulthandler.register(signal.SIGUSR1)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"{exc.source}: invalid config", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except BundleError as exc:
        print(f"bundle problem: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the HTTP port is taken, or a path is not writable
        print(f"edgetok {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
