"""Topic filter validation: what a broker would answer by dropping the connection."""

from __future__ import annotations

import pytest

from edgetok.topics import filter_problem


@pytest.mark.parametrize("f", [
    "#", "+", "sensors/#", "sensors/+/temp", "+/+/#", "/", "a//b", "sensors/ü/+",
    "$share/grp/edgetok/uplink/+", "$SYS/#", "x" * 65535])
def test_valid_filters(f: str) -> None:
    assert filter_problem(f) is None


@pytest.mark.parametrize(("f", "why"), [
    ("", "empty"),
    ("sensors/#/bad", "'#' must be alone in the last level"),
    ("sensors#", "'#' must be alone in the last level"),
    ("sensors/a#", "'#' must be alone in the last level"),
    ("sensors/+x", "'+' must be alone in its level"),
    ("a+/b", "'+' must be alone in its level"),
    ("a/\0/b", "NUL"),
    ("a/\ud800", "not valid UTF-8"),
    ("ü" * 32768, "over MQTT's 65535"),
    ("$share//t", "share name"),
    ("$share/g+/t", "share name"),
    ("$share/g", "a filter after its share name"),
    ("$share/g/t/#/x", "'#' must be alone"),
])
def test_invalid_filters_say_why(f: str, why: str) -> None:
    problem = filter_problem(f)
    assert problem is not None and why in problem
