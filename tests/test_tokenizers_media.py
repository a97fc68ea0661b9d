"""Audio and image tokenizers: references, geometry and every refusal path."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgetok.tokenizers import ImageConfig, LogMelConfig, Modality, Payload, TokenizeError
from edgetok.tokenizers.mel import apply_filters, mel_filterbank, sparse_filters

RNG = np.random.default_rng(11)
SR = 16000
# Stated tolerance against librosa: float32 STFT and mel products agree to ~1e-5 dB here;
# 1e-3 dB leaves room for BLAS/FFT differences across machines and is far below what matters.
LOGMEL_TOL_DB = 1e-3


def _tone(seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    """A sine with a little noise, float32 in [-1, 1]."""
    t = np.arange(int(SR * seconds)) / SR
    y = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * RNG.normal(size=t.size)
    return y.astype(np.float32)


def _librosa_db(y: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """librosa's log-mel with the same parameters, as (frames, mels)."""
    librosa = pytest.importorskip("librosa")
    s = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        win_length=cfg.win_length, window="hann", center=cfg.center, pad_mode="constant",
        power=2.0, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, htk=False, norm="slaney")
    return np.asarray(librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=cfg.top_db).T)


# --- audio -------------------------------------------------------------------------------

@pytest.mark.slow  # librosa pulls in numba, which compiles on a cold cache
@pytest.mark.parametrize("kw", [
    {},
    {"n_fft": 512, "win_length": 400, "hop_length": 128, "n_mels": 40, "fmin": 50.0,
     "fmax": 7000.0, "center": False, "top_db": None},
    {"n_fft": 1024, "hop_length": 512, "n_mels": 128, "top_db": 60.0},
])
def test_logmel_matches_librosa(kw: dict[str, object]) -> None:
    cfg = LogMelConfig(sample_format="float32", normalize=False, patch_frames=1, **kw)
    y = _tone()
    ref = _librosa_db(y, cfg)
    ours = cfg.build().log_mel(y[None])[0]
    assert ours.shape == ref.shape == (cfg.frames, cfg.n_mels)
    np.testing.assert_allclose(ours, ref, atol=LOGMEL_TOL_DB, rtol=0)
    # The same through the full path: raw float32 PCM bytes in, one token per frame out.
    batch = cfg.build().tokenize([Payload(y.astype("<f4").tobytes(), 0.0, SR)])
    assert batch.vectors is not None
    np.testing.assert_allclose(batch.vectors[0, :cfg.frames], ref, atol=LOGMEL_TOL_DB, rtol=0)


@pytest.mark.slow
def test_int16_pcm_and_filterbank_match_librosa() -> None:
    librosa = pytest.importorskip("librosa")
    cfg = LogMelConfig(normalize=False, patch_frames=1)
    pcm = (_tone() * 32767).astype("<i2")
    batch = cfg.build().tokenize([pcm.tobytes()])
    assert batch.vectors is not None
    ref = _librosa_db(pcm.astype(np.float32) / 32768, cfg)
    np.testing.assert_allclose(batch.vectors[0, :cfg.frames], ref, atol=LOGMEL_TOL_DB, rtol=0)
    fb = librosa.filters.mel(sr=SR, n_fft=cfg.n_fft, n_mels=cfg.n_mels)
    np.testing.assert_allclose(cfg.build().filters.T, fb, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("n_fft", "n_mels", "fmin", "fmax"),
                         [(400, 64, 0.0, 8000.0), (64, 128, 0.0, 8000.0),
                          (2048, 40, 300.0, 3400.0), (256, 1, 0.0, 4000.0)])
def test_grouped_filterbank_equals_dense_product(n_fft: int, n_mels: int, fmin: float,
                                                 fmax: float) -> None:
    dense = mel_filterbank(SR, n_fft, n_mels, fmin, fmax).astype(np.float32)
    power = RNG.random((3, 7, n_fft // 2 + 1)).astype(np.float32)
    got = apply_filters(power, sparse_filters(dense), n_mels)
    np.testing.assert_allclose(got, power @ dense, rtol=1e-5, atol=1e-9)


def test_logmel_peak_band_follows_the_tone() -> None:
    cfg = LogMelConfig(sample_format="float32", normalize=False, patch_frames=1)
    tok = cfg.build()
    lo, hi = tok.log_mel(np.stack([_tone(freq=300.0), _tone(freq=3000.0)]))
    assert np.argmax(lo.mean(axis=0)) < np.argmax(hi.mean(axis=0))


def test_logmel_patches_shapes_timestamps_and_norm() -> None:
    cfg = LogMelConfig(sample_format="float32", patch_frames=4, n_mels=32)
    clips = [Payload(_tone().tobytes(), 100.0 + k, SR) for k in range(3)]
    batch = cfg.build().tokenize(clips)
    assert batch.vectors is not None
    n = -(-cfg.frames // 4)
    assert batch.vectors.shape == (3, n, 4 * 32) == (3, cfg.num_tokens(), cfg.token_dim())
    assert batch.mask.all() and (batch.modality == Modality.AUDIO).all()
    np.testing.assert_allclose(batch.timestamps[1, :3], 101.0 + np.arange(3) * 4 * 160 / SR)
    frames = batch.vectors.reshape(3, n * 4, 32)[:, :cfg.frames]
    np.testing.assert_allclose(frames.mean(axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(frames.std(axis=(1, 2)), 1.0, atol=1e-3)
    assert batch.aux["loc"].shape == (3,) and (batch.aux["scale"] > 0).all()


def test_short_clip_pads_with_masked_frames_and_stereo_downmixes() -> None:
    cfg = LogMelConfig(sample_format="float32", pcm_channels=2, patch_frames=1,
                       normalize=False)
    y = _tone(0.5)
    stereo = np.stack([y, y], axis=1).astype("<f4").tobytes()
    batch = cfg.build().tokenize([stereo])
    mono = LogMelConfig(sample_format="float32", patch_frames=1, normalize=False).build()
    ref = mono.tokenize([y.tobytes()])
    assert batch.vectors is not None and ref.vectors is not None
    np.testing.assert_allclose(batch.vectors, ref.vectors, atol=1e-4)
    real = 1 + y.size // cfg.hop_length  # frames whose centre lies within the half second
    assert batch.mask[0].tolist() == [True] * real + [False] * (cfg.frames - real)
    assert not batch.vectors[0, real:].any()


def test_non_finite_float_pcm_masks_or_rejects() -> None:
    y = _tone()
    y[8000] = np.nan
    cfg = LogMelConfig(sample_format="float32", patch_frames=1)
    batch = cfg.build().tokenize([y.tobytes()])
    assert batch.vectors is not None and np.isfinite(batch.vectors).all()
    hit = [f for f in range(cfg.frames) if abs(f * 160 - 8000) < 200]  # windows over it
    assert not batch.mask[0, hit].any() and batch.mask[0].sum() == cfg.frames - len(hit)
    with pytest.raises(TokenizeError) as e:
        LogMelConfig(sample_format="float32", nan_policy="reject").build().tokenize(
            [_tone().tobytes(), y.tobytes()])
    assert (e.value.reason, e.value.window) == ("non_finite", 1)


@pytest.mark.parametrize(("cfg", "payload", "reason"), [
    (LogMelConfig(), Payload(b"\x00\x01" * 100, 0.0, 8000), "bad_rate"),
    (LogMelConfig(), b"\x00\x01\x02", "undecodable"),
    (LogMelConfig(sample_format="float32"), b"\x00" * 6, "undecodable"),
    (LogMelConfig(), b"", "empty"),
    (LogMelConfig(max_bytes=1000), b"\x00" * 1002, "too_large"),
    (LogMelConfig(clip_samples=1000), b"\x00" * 2002, "too_large"),
    (LogMelConfig(sample_format="float32"), np.full(400, np.inf, "<f4").tobytes(), "empty"),
])
def test_audio_refusals(cfg: LogMelConfig, payload: Payload | bytes, reason: str) -> None:
    with pytest.raises(TokenizeError) as e:
        cfg.build().tokenize([payload])
    assert e.value.reason == reason


def test_audio_config_errors() -> None:
    with pytest.raises(ValueError):
        LogMelConfig(win_length=800, n_fft=400)
    with pytest.raises(ValueError):
        LogMelConfig(fmax=9000.0)
    with pytest.raises(ValueError):
        LogMelConfig(center=False, clip_samples=100)


# --- image -------------------------------------------------------------------------------

def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    """Encode a uint8 array with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims a huge size: a decompression bomb's header."""
    png = _encode(np.zeros((1, 1), np.uint8), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:8] + patched + png[8 + 25:]


def test_png_patches_are_exact_vit_layout() -> None:
    img = RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    cfg = ImageConfig(image_size=32, patch_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    batch = cfg.build().tokenize([Payload(_encode(img, "PNG"), 42.0)])
    assert batch.vectors is not None
    assert batch.vectors.shape == (1, 16, 192) == (1, cfg.num_tokens(), cfg.token_dim())
    for k in range(16):
        r, c = divmod(k, 4)  # row-major over the patch grid
        want = img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].reshape(-1) / 255.0
        np.testing.assert_allclose(batch.vectors[0, k], want, atol=1e-6)
    assert (batch.timestamps == 42.0).all() and (batch.modality == Modality.IMAGE).all()


@pytest.mark.parametrize(("shape", "fmt", "mode"), [
    ((300, 400, 3), "JPEG", "RGB"), ((224, 224, 3), "JPEG", "RGB"),
    ((224, 224, 4), "PNG", "RGBA"), ((100, 150), "PNG", "L")])
def test_decode_resize_normalise_match_pillow_pipeline(shape: tuple[int, ...], fmt: str,
                                                       mode: str) -> None:
    img = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    data = _encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    batch = ImageConfig().build().tokenize([data, data])
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (224, 224), Image.Resampling.BILINEAR), np.float32) / 255.0
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert batch.vectors is not None and Image.open(io.BytesIO(data)).mode == mode
    got = batch.vectors[1].reshape(14, 14, 16, 16, 3).transpose(0, 2, 1, 3, 4)
    np.testing.assert_allclose(got.reshape(224, 224, 3), ref, atol=1e-5)


def test_large_jpeg_uses_reduced_decode_close_to_full_decode() -> None:
    y, x = np.mgrid[0:1200, 0:1600]
    img = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    data = _encode(img, "JPEG", quality=95)
    ours = ImageConfig(image_size=64, patch_size=16).build().tokenize([data]).vectors
    full = ImageConfig(image_size=64, patch_size=16).build()
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (64, 64), Image.Resampling.BILINEAR), np.float32)
    assert ours is not None
    got = (ours[0].reshape(4, 4, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
           - full.offset) / full.gain
    assert np.abs(got - ref).mean() < 12.0  # gray levels: same picture, different filtering


def test_center_crop_and_gray() -> None:
    img = np.zeros((20, 60), np.uint8)
    img[:, 20:40] = 255  # white centre square, black sides
    # Nearest: bilinear would blend in the black just outside the crop box.
    cfg = ImageConfig(image_size=8, patch_size=4, color="gray", resize="center_crop",
                      resample="nearest", mean=(0.0,), std=(1.0,))
    batch = cfg.build().tokenize([_encode(img, "PNG")])
    assert batch.vectors is not None and batch.vectors.shape == (1, 4, 16)
    np.testing.assert_allclose(batch.vectors, 1.0, atol=1e-6)
    squash = ImageConfig(image_size=8, patch_size=4, color="gray", mean=(0.0,), std=(1.0,))
    flat = squash.build().tokenize([_encode(img, "PNG")]).vectors
    assert flat is not None and flat.min() == 0.0


@pytest.mark.parametrize(("cfg", "data", "reason"), [
    (ImageConfig(), b"", "empty"),
    (ImageConfig(), b"definitely not an image", "undecodable"),
    (ImageConfig(), _encode(np.zeros((40, 40, 3), np.uint8), "GIF"), "undecodable"),
    (ImageConfig(), _encode(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")[:400],
     "undecodable"),
    (ImageConfig(), _encode(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")[:-40],
     "undecodable"),
    (ImageConfig(max_bytes=100), _encode(np.zeros((64, 64), np.uint8), "PNG") + b"\0" * 100,
     "too_large"),
    (ImageConfig(max_pixels=1_000_000), _png_header_claiming(5000, 5000), "too_large"),
    (ImageConfig(), _png_header_claiming(60000, 60000), "too_large"),
    (ImageConfig(), _png_header_claiming(20000, 2), "too_large"),
])
def test_image_refusals(cfg: ImageConfig, data: bytes, reason: str) -> None:
    good = _encode(np.zeros((10, 10, 3), np.uint8), "PNG")
    with pytest.raises(TokenizeError) as e:
        cfg.build().tokenize([good, data])
    assert (e.value.reason, e.value.window) == (reason, 1)


def test_image_config_errors() -> None:
    with pytest.raises(ValueError):
        ImageConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError):
        ImageConfig(color="gray", mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        ImageConfig(max_pixels=10**9)
