"""Time-series tokenizers: alignment, patching, the mean-scaled quantizer and SAX."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgetok.tokenizers import (
    MISSING_ID,
    NUM_SPECIAL,
    PAD_ID,
    PatchConfig,
    QuantizeConfig,
    SAXConfig,
    SeriesWindow,
    TokenizeError,
    align,
)
from edgetok.tokenizers.normal import gaussian_breakpoints, norm_ppf

RNG = np.random.default_rng(7)


def _grid(b: int, length: int, rate: float = 100.0) -> np.ndarray:
    """Regular timestamps (b, length)."""
    return np.tile(np.arange(length) / rate, (b, 1))


# --- alignment ---------------------------------------------------------------------------

def test_align_places_irregular_readings_in_nearest_slots() -> None:
    rate, length = 50.0, 20
    slots = np.array([0, 3, 4, 9, 19])
    jitter = RNG.uniform(-0.4, 0.4, size=slots.size) / rate  # under half a period
    ts = 10.0 + slots / rate + jitter
    vals = RNG.normal(size=(slots.size, 2))
    out, grid = align(ts, vals, start=10.0, rate_hz=rate, length=length)
    assert out.shape == (2, length)
    np.testing.assert_allclose(grid, 10.0 + np.arange(length) / rate)
    np.testing.assert_array_equal(out[:, slots], vals.T)
    gaps = np.setdiff1d(np.arange(length), slots)
    assert np.isnan(out[:, gaps]).all()  # gaps stay missing, never interpolated


def test_align_gaps_become_masked_tokens() -> None:
    ts = np.concatenate([np.arange(0, 10), np.arange(20, 40)]) / 100.0  # slots 10..19 missing
    vals = RNG.normal(size=(ts.size, 3))
    out, grid = align(ts, vals, start=0.0, rate_hz=100.0, length=40)
    batch = PatchConfig(patch_len=10, stride=10).build().tokenize([SeriesWindow(out, grid)])
    assert batch.mask.tolist() == [[True, False, True, True]]
    assert not batch.vectors[0, 1].any()  # the masked patch carries no invented values


def test_align_reorders_and_drops_duplicates() -> None:
    ts = np.arange(30) / 10.0
    vals = RNG.normal(size=(30, 2))
    ref, _ = align(ts, vals, start=0.0, rate_hz=10.0, length=30)
    perm = RNG.permutation(30)
    dup = RNG.choice(30, size=12)
    shuffled_ts = np.concatenate([ts[perm], ts[dup]])
    shuffled_vals = np.concatenate([vals[perm], vals[dup]])
    out, _ = align(shuffled_ts, shuffled_vals, start=0.0, rate_hz=10.0, length=30)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(ref, vals.T)


def test_align_partial_readings_merge_per_channel() -> None:
    ts = np.array([0.0, 0.0, 0.1])
    vals = np.array([[1.0, np.nan], [np.nan, 2.0], [3.0, 4.0]])
    out, _ = align(ts, vals, start=0.0, rate_hz=10.0, length=2)
    np.testing.assert_array_equal(out, [[1.0, 3.0], [2.0, 4.0]])


def test_align_ignores_unplaceable_readings() -> None:
    ts = np.array([np.nan, np.inf, -5.0, 1e300, 0.0])
    vals = np.arange(5, dtype=float)[:, None]
    out, _ = align(ts, vals, start=0.0, rate_hz=1.0, length=3)
    assert out[0, 0] == 4.0
    assert np.isnan(out[0, 1:]).all()


@pytest.mark.parametrize(("ts", "vals", "kw", "reason"), [
    (np.zeros(3), np.zeros((2, 1)), {}, "bad_shape"),
    (np.zeros(3), np.zeros(3), {}, "bad_shape"),
    (np.zeros(1), np.zeros((1, 1)), {"rate_hz": 0.0}, "bad_rate"),
    (np.zeros(1), np.zeros((1, 1)), {"length": 1 << 40}, "too_large"),
])
def test_align_refuses_bad_input(ts: np.ndarray, vals: np.ndarray, kw: dict[str, float],
                                 reason: str) -> None:
    args = {"start": 0.0, "rate_hz": 10.0, "length": 4} | kw
    with pytest.raises(TokenizeError) as e:
        align(ts, vals, **args)
    assert e.value.reason == reason


# --- patch tokenizer ---------------------------------------------------------------------

def test_patch_instance_norm_is_reversible() -> None:
    x = (RNG.normal(size=(3, 4, 60)) * [[[1.0], [50.0], [0.01], [7.0]]] + 3.0).astype(np.float32)
    cfg = PatchConfig(patch_len=12, stride=12, channels="independent")
    batch = cfg.build().tokenize_array(x, _grid(3, 60))
    z = batch.vectors.reshape(3, 4, 60)  # non-overlapping patches tile the window exactly
    np.testing.assert_allclose(z.mean(axis=2), 0.0, atol=1e-4)
    # Unit variance except where the variance floor NORM_EPS dominates (the 0.01 channel).
    np.testing.assert_allclose(z.std(axis=2)[:, [0, 1, 3]], 1.0, atol=1e-3)
    back = cfg.build().denormalize(z, dict(batch.aux))
    np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())


@given(length=st.integers(1, 80), patch_len=st.integers(1, 20), stride=st.integers(1, 20),
       pad=st.sampled_from(["none", "end"]), mode=st.sampled_from(["mixed", "independent"]),
       channels=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_patch_geometry_matches_slicing(length: int, patch_len: int, stride: int, pad: str,
                                        mode: str, channels: int) -> None:
    if stride > patch_len and pad == "end":
        return  # refused by the config, tested separately
    cfg = PatchConfig(patch_len=patch_len, stride=stride, pad=pad, channels=mode,
                      normalize=False)
    x = RNG.normal(size=(2, channels, length)).astype(np.float32)
    if pad == "end":  # independent count: smallest n whose patches reach the last sample
        expected = max(1, math.ceil(max(length - patch_len, 0) / stride) + 1)
    else:
        expected = (length - patch_len) // stride + 1 if length >= patch_len else 0
    if expected == 0:
        with pytest.raises(TokenizeError):
            cfg.build().tokenize_array(x, _grid(2, length))
        return
    batch = cfg.build().tokenize_array(x, _grid(2, length))
    per = expected * (channels if mode == "independent" else 1)
    assert batch.vectors.shape == (2, per, cfg.token_dim(channels))
    assert cfg.num_tokens(length, channels) == per
    for n in range(expected):
        lo = n * stride
        real = x[:, :, lo:lo + patch_len]
        want = np.zeros((2, channels, patch_len), np.float32)
        want[:, :, :real.shape[2]] = real  # padding reads as zeros
        got = (batch.vectors[:, n].reshape(2, channels, patch_len) if mode == "mixed"
               else batch.vectors[:, [c * expected + n for c in range(channels)]])
        np.testing.assert_array_equal(got, want)
        assert batch.mask[:, n].all()  # every patch starts inside the window
        np.testing.assert_allclose(batch.timestamps[:, n], lo / 100.0)


def test_patch_stride_gap_with_padding_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="stride"):
        PatchConfig(patch_len=4, stride=6, pad="end")


def test_patch_nan_policy() -> None:
    x = RNG.normal(size=(2, 2, 20)).astype(np.float32)
    x[1, 0, 5] = np.nan
    x[1, 1, 0:10] = np.inf
    batch = PatchConfig(patch_len=10, channels="independent").build().tokenize_array(
        x, _grid(2, 20))
    assert batch.mask.tolist() == [[True] * 4, [True, True, False, True]]
    assert np.isfinite(batch.vectors).all()
    with pytest.raises(TokenizeError) as e:
        PatchConfig(nan_policy="reject").build().tokenize_array(x, _grid(2, 20))
    assert (e.value.reason, e.value.window) == ("non_finite", 1)


@pytest.mark.parametrize(("cfg", "x", "reason"), [
    (PatchConfig(), np.full((1, 2, 20), np.nan, np.float32), "empty"),
    (PatchConfig(num_channels=3), np.zeros((1, 2, 20), np.float32), "bad_shape"),
    (PatchConfig(window_len=30), np.zeros((1, 2, 20), np.float32), "bad_shape"),
    (PatchConfig(), np.zeros((2, 20), np.float32), "bad_shape"),
    (PatchConfig(), np.zeros((1, 2, 0), np.float32), "bad_shape"),
    (PatchConfig(patch_len=30, pad="none"), np.zeros((1, 2, 20), np.float32), "bad_shape"),
])
def test_patch_refuses_bad_windows(cfg: PatchConfig, x: np.ndarray, reason: str) -> None:
    t = np.zeros((x.shape[0], x.shape[-1]))
    with pytest.raises(TokenizeError) as e:
        cfg.build().tokenize_array(x, t)
    assert e.value.reason == reason


def test_windows_of_different_shapes_are_refused_with_index() -> None:
    ws = [SeriesWindow(np.zeros((2, 10)), np.arange(10.0)),
          SeriesWindow(np.zeros((3, 10)), np.arange(10.0))]
    for cfg in (PatchConfig(), QuantizeConfig(), SAXConfig()):
        with pytest.raises(TokenizeError) as e:
            cfg.build().tokenize(ws)
        assert (e.value.reason, e.value.window) == ("bad_shape", 1)
        with pytest.raises(TokenizeError) as e:
            cfg.build().tokenize([])
        assert e.value.reason == "empty"


# --- quantizer ---------------------------------------------------------------------------

def _chronos_loop(x: list[float], cfg: QuantizeConfig) -> tuple[list[int], float]:
    """Reference: per-sample bucketing against midpoint edges, in plain Python."""
    finite = [v for v in x if math.isfinite(v)]
    scale = sum(abs(v) for v in finite) / max(len(finite), 1)
    scale = scale if scale > 1e-10 else 1.0
    centers = np.linspace(cfg.low, cfg.high, cfg.num_bins).tolist()  # the spec's centres
    edges = [(a + b) / 2 for a, b in itertools.pairwise(centers)]
    ids = []
    for v in x:
        if not math.isfinite(v):
            ids.append(MISSING_ID)
            continue
        k = sum(1 for e in edges if v / scale >= e)
        ids.append(k + NUM_SPECIAL)
    return ids, scale


@given(x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=3, max_dims=3, max_side=12),
                    elements=st.floats(-1e6, 1e6)),
       vocab=st.integers(4, 5000), high=st.floats(0.5, 20.0))
@settings(max_examples=150, deadline=None)
def test_quantizer_roundtrip_within_half_bin(x: np.ndarray, vocab: int, high: float) -> None:
    cfg = QuantizeConfig(vocab_size=vocab, low=-high, high=high)
    tok = cfg.build()
    ids, scale = tok.encode(x)
    assert ((ids >= NUM_SPECIAL) & (ids < vocab)).all()
    back = tok.decode(ids, scale)
    s = scale[..., None]
    inside = np.abs(x / s) <= high
    tol = cfg.bin_width / 2 * s * (1 + 1e-9) + 1e-12
    err = np.abs(back - x)
    assert (err[inside] <= np.broadcast_to(tol, x.shape)[inside]).all()
    # Outside the range values clip to the outermost bin centre.
    np.testing.assert_allclose(back[~inside], (np.sign(x) * high * s)[~inside], rtol=1e-9)


def test_quantizer_matches_python_loop_reference() -> None:
    cfg = QuantizeConfig(vocab_size=300, low=-4.0, high=4.0)
    x = RNG.standard_t(3, size=(3, 2, 40)) * [[[0.1], [100.0]]]
    x[0, 1, 3] = np.nan
    x[2, 0, :] = 0.0
    ids, scale = cfg.build().encode(x)
    for b in range(3):
        for c in range(2):
            want, want_scale = _chronos_loop(list(x[b, c]), cfg)
            assert ids[b, c].tolist() == want
            assert scale[b, c] == pytest.approx(want_scale, rel=1e-12)


def test_quantizer_specials_and_batch() -> None:
    cfg = QuantizeConfig(vocab_size=64)
    x = RNG.normal(size=(2, 3, 10)).astype(np.float32)
    x[0, 2, 4] = np.nan
    batch = cfg.build().tokenize_array(x, _grid(2, 10))
    assert batch.ids is not None
    assert batch.ids.shape == (2, cfg.num_tokens(10, 3))
    assert batch.ids[0, 2 * 10 + 4] == MISSING_ID and not batch.mask[0, 24]
    assert batch.mask.sum() == 59
    decoded = cfg.build().decode(np.array([[[PAD_ID, MISSING_ID, 2]]]), np.ones((1, 1)))
    assert np.isnan(decoded[0, 0, :2]).all() and decoded[0, 0, 2] == cfg.low
    with pytest.raises(TokenizeError) as e:
        QuantizeConfig(nan_policy="reject").build().tokenize_array(x, _grid(2, 10))
    assert e.value.reason == "non_finite"
    with pytest.raises(ValueError, match="low"):
        QuantizeConfig(low=1.0, high=1.0)


# --- SAX ---------------------------------------------------------------------------------

def test_normal_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    ps = np.concatenate([np.linspace(1e-6, 1 - 1e-6, 997), [1e-12, 0.02425, 0.5, 1 - 1e-9]])
    ours = np.array([norm_ppf(float(p)) for p in ps])
    np.testing.assert_allclose(ours, stats.norm.ppf(ps), rtol=1e-12, atol=1e-12)
    for a in (2, 3, 4, 7, 10, 26, 64, 256):
        np.testing.assert_allclose(gaussian_breakpoints(a),
                                   stats.norm.ppf(np.arange(1, a) / a), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError):
        norm_ppf(1.0)


@pytest.mark.slow  # aeon imports numba and compiles on a cold cache
@pytest.mark.parametrize(("length", "segments", "alphabet"),
                         [(100, 10, 4), (101, 8, 5), (64, 64, 3), (37, 5, 26), (50, 2, 3)])
def test_sax_symbols_match_aeon(length: int, segments: int, alphabet: int) -> None:
    sax_mod = pytest.importorskip("aeon.transformations.collection.dictionary_based")
    x = np.cumsum(RNG.normal(size=(6, 3, length)), axis=2) * 5.0 + 20.0
    x[0, 1] = 4.0  # a flat channel: centred, not scaled, in both
    ref = sax_mod.SAX(n_segments=segments, alphabet_size=alphabet,
                      znormalized=False).fit_transform(x)
    cfg = SAXConfig(segments=segments, alphabet=alphabet)
    np.testing.assert_array_equal(cfg.build().symbols(x), ref)
    batch = cfg.build().tokenize_array(x, _grid(6, length))
    assert batch.ids is not None
    np.testing.assert_array_equal(batch.ids.reshape(6, 3, segments), ref + NUM_SPECIAL)


def test_sax_missing_segments_and_errors() -> None:
    x = RNG.normal(size=(1, 2, 40))
    x[0, 0, 10:20] = np.nan  # exactly segment 1 of 4
    x[0, 1, 3] = np.nan  # one sample: the segment mean uses the rest
    cfg = SAXConfig(segments=4, alphabet=8)
    batch = cfg.build().tokenize_array(x, _grid(1, 40))
    assert batch.ids is not None
    assert batch.ids[0, 1] == MISSING_ID and batch.mask.tolist() == [[True, False] + [True] * 6]
    np.testing.assert_allclose(batch.timestamps[0, :4], [0.0, 0.1, 0.2, 0.3])
    assert cfg.vocab_size == 10 and batch.ids.max() < cfg.vocab_size
    with pytest.raises(TokenizeError) as e:
        SAXConfig(segments=50).build().tokenize_array(x, _grid(1, 40))
    assert e.value.reason == "bad_shape"


def test_sax_symbols_are_equiprobable_on_gaussian_noise() -> None:
    x = RNG.normal(size=(400, 1, 64))
    sym = SAXConfig(segments=64, alphabet=5, normalize=False).build().symbols(x)
    freq = np.bincount(sym.ravel(), minlength=5) / sym.size
    np.testing.assert_allclose(freq, 0.2, atol=0.01)


@given(u=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-40, 40)),
       vocab=st.integers(4, 9000), high=st.floats(0.1, 30.0))
@settings(max_examples=100, deadline=None)
def test_quantizer_bucketing_equals_binary_search(u: np.ndarray, vocab: int,
                                                  high: float) -> None:
    tok = QuantizeConfig(vocab_size=vocab, low=-high, high=high).build()
    edges_hit = np.concatenate([u, tok.edges[:: max(1, tok.edges.size // 50)]])  # exact ties
    np.testing.assert_array_equal(tok._bucket(edges_hit),
                                  np.searchsorted(tok.edges, edges_hit, side="right"))
