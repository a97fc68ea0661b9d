"""Every dead-letter reason the gateway can emit has a row in README's reason table."""

from __future__ import annotations

import re
from pathlib import Path

from edgetok.tokenizers.base import REASONS

ROOT = Path(__file__).resolve().parent.parent
# Where reasons are born: a raised decode/tokenize/inference error, a direct dead letter, or
# the catch-all for an unexpected failure.
SOURCES = [r'(?:DecodeError|TokenizeError|InferenceError)\(\s*"([a-z_]+)"',
           r'deadletter\(\s*[\w.]+,\s*"([a-z_]+)"',
           r'reason, detail = "([a-z_]+)"']


def emitted() -> set[str]:
    found = set(REASONS)
    for folder in ("gateway", "tokenizers"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in SOURCES:
                found.update(re.findall(pattern, text))
    return found


def documented() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Dead-letter reasons", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {code for row in rows for code in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


def test_every_reason_is_documented() -> None:
    codes = emitted()
    # The scan itself must find the reasons it is meant to guard.
    assert {"bad_json", "late", "empty", "inference_error", "unknown_topic"} <= codes
    assert codes - documented() == set(), "add these reasons to README's table"


def test_http_docs_point_at_the_table() -> None:
    assert '"Dead-letter reasons"' in (ROOT / "docs/http-api.md").read_text()
