"""Byte-level text, categorical states and location tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetok.tokenizers import (
    MISSING_ID,
    NUM_SPECIAL,
    PAD_ID,
    ByteConfig,
    CategoricalConfig,
    LabelWindow,
    LocationConfig,
    LocationWindow,
    Modality,
    Payload,
    TokenizeError,
    geohash,
)
from edgetok.tokenizers.location import BASE32, geohash_codes
from edgetok.tokenizers.text import UNKNOWN_ID

# --- bytes -------------------------------------------------------------------------------


def test_bytes_are_utf8_ids_padded() -> None:
    text = "température 21°C"
    batch = ByteConfig(max_tokens=32).build().tokenize(
        [Payload(text.encode(), 7.0), "ok", b"\xe2\x9c\x93"])
    assert batch.ids is not None and batch.ids.shape == (3, 32)
    raw = list(text.encode("utf-8"))
    assert batch.ids[0, :len(raw)].tolist() == [b + NUM_SPECIAL for b in raw]
    assert (batch.ids[0, len(raw):] == PAD_ID).all()
    assert batch.mask.sum(axis=1).tolist() == [len(raw), 2, 3]
    assert batch.timestamps[0, 0] == 7.0 and (batch.modality == Modality.TEXT).all()
    assert batch.ids.max() < ByteConfig().vocab_size


@given(st.binary(min_size=1, max_size=600))
@settings(max_examples=100, deadline=None)
def test_bytes_roundtrip_any_payload(data: bytes) -> None:
    cfg = ByteConfig(max_tokens=256, validate_utf8=False, modality="event")
    batch = cfg.build().tokenize([data])
    assert batch.ids is not None
    kept = batch.ids[0][batch.mask[0]] - NUM_SPECIAL
    assert bytes(kept.astype(np.uint8)) == data[:256]  # truncation keeps the start
    assert (batch.modality == Modality.EVENT).all()


@pytest.mark.parametrize(("cfg", "payload", "reason"), [
    (ByteConfig(), b"", "empty"),
    (ByteConfig(), b"\xff\xfe bad", "undecodable"),
    (ByteConfig(), "lone \ud800 surrogate", "undecodable"),
    (ByteConfig(max_tokens=4, overflow="reject"), b"hello", "too_large"),
    (ByteConfig(max_bytes=10), b"x" * 11, "too_large"),
    (ByteConfig(max_bytes=10), "y" * 11, "too_large"),
])
def test_bytes_refusals(cfg: ByteConfig, payload: bytes | str, reason: str) -> None:
    with pytest.raises(TokenizeError) as e:
        cfg.build().tokenize(["fine", payload])
    assert (e.value.reason, e.value.window) == (reason, 1)


# --- categorical -------------------------------------------------------------------------

def test_categorical_ids_missing_unknown_and_padding() -> None:
    cfg = CategoricalConfig(states=("idle", "run", "fault"), max_len=6)
    w = LabelWindow(("idle", None, "fault", "melted", "run"), np.arange(5.0))
    batch = cfg.build().tokenize([w])
    assert batch.ids is not None
    assert batch.ids[0].tolist() == [3, MISSING_ID, 5, UNKNOWN_ID, 4, PAD_ID]
    assert batch.mask[0].tolist() == [True, False, True, True, True, False]
    assert cfg.vocab_size == 6 and batch.ids.max() < cfg.vocab_size
    np.testing.assert_array_equal(batch.timestamps[0, :5], np.arange(5.0))


def test_categorical_overflow_keeps_latest_and_policies() -> None:
    cfg = CategoricalConfig(states=("a", "b"), max_len=3)
    w = LabelWindow(("a", "a", "b", "b", "a"), np.arange(5.0))
    batch = cfg.build().tokenize([w])
    assert batch.ids is not None and batch.ids[0].tolist() == [4, 4, 3]
    np.testing.assert_array_equal(batch.timestamps[0], [2.0, 3.0, 4.0])
    strict = CategoricalConfig(states=("a", "b"), max_len=3, overflow="reject", unknown="reject")
    for window, reason in [(w, "too_large"), (LabelWindow(("a", "z"), np.zeros(2)),
                                             "unknown_value"),
                           (LabelWindow((), np.zeros(0)), "empty"),
                           (LabelWindow(("a",), np.zeros(2)), "bad_shape")]:
        with pytest.raises(TokenizeError) as e:
            strict.build().tokenize([window])
        assert e.value.reason == reason
    with pytest.raises(ValueError, match="unique"):
        CategoricalConfig(states=("a", "a"))


# --- location ----------------------------------------------------------------------------

def _textbook_geohash(lat: float, lon: float, precision: int) -> str:
    """Reference: the original character-at-a-time interval bisection."""
    lat_lo, lat_hi, lon_lo, lon_hi = -90.0, 90.0, -180.0, 180.0
    out: list[str] = []
    bits, ch, even = 0, 0, True
    while len(out) < precision:
        if even:
            mid = (lon_lo + lon_hi) / 2
            if lon >= mid:
                ch, lon_lo = ch * 2 + 1, mid
            else:
                ch, lon_hi = ch * 2, mid
        else:
            mid = (lat_lo + lat_hi) / 2
            if lat >= mid:
                ch, lat_lo = ch * 2 + 1, mid
            else:
                ch, lat_hi = ch * 2, mid
        even, bits = not even, bits + 1
        if bits == 5:
            out.append("0123456789bcdefghjkmnpqrstuvwxyz"[ch])
            bits, ch = 0, 0
    return "".join(out)


@pytest.mark.parametrize(("lat", "lon", "expected"), [
    (42.6, -5.6, "ezs42"),  # Wikipedia, "Geohash", worked example
    (57.64911, 10.40744, "u4pruydqqvj"),  # Wikipedia / geohash.org example
    (0.0, 0.0, "s0000"),  # both bisections start at/above the midpoint
])
def test_geohash_published_values(lat: float, lon: float, expected: str) -> None:
    assert geohash(lat, lon, len(expected)) == expected


@given(st.floats(-90, 90), st.floats(-180, 180), st.integers(1, 12))
@settings(max_examples=300, deadline=None)
def test_geohash_matches_textbook_bisection(lat: float, lon: float, precision: int) -> None:
    assert geohash(lat, lon, precision) == _textbook_geohash(lat, lon, precision)


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(1, 20),
       st.integers(1, 12))
@settings(max_examples=200, deadline=None)
def test_geohash_on_exact_cell_boundaries(i: int, j: int, depth: int, precision: int) -> None:
    lat = -90.0 + (i % (1 << depth + 1)) * 180.0 / (1 << depth)  # grid lines, both ends too
    lon = -180.0 + (j % (1 << depth + 1)) * 360.0 / (1 << depth)
    lat, lon = min(lat, 90.0), min(lon, 180.0)
    assert geohash(lat, lon, precision) == _textbook_geohash(lat, lon, precision)


def test_location_geohash_chars_and_cells() -> None:
    w = LocationWindow(np.array([42.6, 57.64911]), np.array([-5.6, 10.40744]),
                       np.array([1.0, 2.0]))
    chars = LocationConfig(precision=5, max_fixes=3).build().tokenize([w])
    assert chars.ids is not None and chars.ids.shape == (1, 15)
    want = [BASE32.index(c) + NUM_SPECIAL for c in "ezs42" + "u4pru"]
    assert chars.ids[0, :10].tolist() == want and (chars.ids[0, 10:] == PAD_ID).all()
    assert chars.mask[0].tolist() == [True] * 10 + [False] * 5
    np.testing.assert_array_equal(chars.timestamps[0, :10], [1.0] * 5 + [2.0] * 5)
    cell = LocationConfig(encoding="geohash_cell", precision=4, max_fixes=2).build().tokenize([w])
    assert cell.ids is not None
    codes = [sum(BASE32.index(c) << (5 * (3 - k)) for k, c in enumerate(h)) + NUM_SPECIAL
             for h in ("ezs4", "u4pr")]
    assert cell.ids[0].tolist() == codes
    assert cell.ids.max() < LocationConfig(encoding="geohash_cell", precision=4).vocab_size
    assert geohash_codes(np.array([42.6]), np.array([-5.6]), 4)[0] == codes[0] - NUM_SPECIAL


def test_location_normalized_and_bad_fixes() -> None:
    w = LocationWindow(np.array([45.0, np.nan, -90.0]), np.array([-90.0, 3.0, 180.0]),
                       np.arange(3.0))
    batch = LocationConfig(encoding="normalized", max_fixes=4).build().tokenize([w])
    assert batch.vectors is not None and batch.vectors.shape == (1, 4, 2)
    want = np.array([[0.5, -0.5], [0, 0], [-1, 1], [0, 0]])
    np.testing.assert_allclose(batch.vectors[0], want)
    assert batch.mask[0].tolist() == [True, False, True, False]
    ids = LocationConfig(precision=2, max_fixes=4).build().tokenize([w]).ids
    assert ids is not None and ids[0, 2:4].tolist() == [MISSING_ID, MISSING_ID]
    assert ids[0, 6:].tolist() == [PAD_ID, PAD_ID]
    cases = [(LocationConfig(nan_policy="reject"), w, "non_finite"),
             (LocationConfig(), LocationWindow(np.array([91.0]), np.zeros(1), np.zeros(1)),
              "out_of_range"),
             (LocationConfig(), LocationWindow(np.zeros(2), np.zeros(1), np.zeros(2)),
              "bad_shape"),
             (LocationConfig(), LocationWindow(np.zeros(0), np.zeros(0), np.zeros(0)), "empty"),
             (LocationConfig(max_fixes=2, overflow="reject"), w, "too_large")]
    for cfg, window, reason in cases:
        with pytest.raises(TokenizeError) as e:
            cfg.build().tokenize([window])
        assert e.value.reason == reason
    with pytest.raises(ValueError):
        LocationConfig(encoding="geohash_cell", precision=6)
