"""`python -m edgetok.models.build --recipe R --out D [--force]`: the build without the CLI."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edgetok.models.build import BuildError
from edgetok.models.build.recipe import run


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build, print the bundle path; 2 on an error the user can fix."""
    ap = argparse.ArgumentParser(prog="edgetok build", description=__doc__)
    ap.add_argument("--recipe", type=Path, required=True, help="recipe TOML")
    ap.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    ap.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = run(args.recipe, args.out, force=args.force, progress=not args.quiet)
    except BuildError as exc:
        print(f"edgetok build: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
