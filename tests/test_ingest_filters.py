"""Subscriptions: overlapping filters would make the broker deliver a message twice."""

from __future__ import annotations

import pytest

from edgetok.mqttlink import covers, minimal_filters


@pytest.mark.parametrize(("wide", "narrow", "expected"), [
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "$share/g/x", True),
    ("a/+", "a/b", True), ("a/+", "a/+", True), ("a/+", "a/#", False),
    ("a/b", "a/+", False), ("+/b", "a/c", False), ("a/+/c", "a/b", False),
])
def test_covers(wide: str, narrow: str, expected: bool) -> None:
    assert covers(wide, narrow) is expected


def test_minimal_filters_keep_one_of_each_overlap_in_order() -> None:
    assert minimal_filters(["sensors/imu", "sensors/imu/+", "gw/downlink", "sensors/#"]) == \
        ["gw/downlink", "sensors/#"]
    assert minimal_filters(["a/+", "a/b", "a/+"]) == ["a/+"]
    assert minimal_filters(["a/b", "c/d"]) == ["a/b", "c/d"]
    assert minimal_filters(["#", "$share/g/a/+"]) == ["#", "$share/g/a/+"]
