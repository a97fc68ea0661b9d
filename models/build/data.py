"""Toolchain datasets: UCR/UEA by aeon name or .ts path, or an .npz; tokenized by edgetok."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgetok.models.build import BuildError
from edgetok.tokenizers.patch import PatchConfig

log = logging.getLogger(__name__)

# Facts about datasets the recipe may name without spelling them out. BasicMotions: UEA
# archive description (a smartwatch's 3-axis accelerometer and gyroscope, sampled at 10 Hz).
KNOWN: dict[str, dict[str, Any]] = {
    "basicmotions": {"rate_hz": 10.0,
                     "channels": ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]},
}
# Sample rate written to the manifest when neither the recipe nor KNOWN has one.
DEFAULT_RATE_HZ = 1.0


class DataError(BuildError, ValueError):
    """A dataset could not be found, read, or used as it is."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """A classification dataset's own train and test splits, as float32 (N, C, T) arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]
    channels: list[str]
    rate_hz: float

    @property
    def window(self) -> int:
        """Samples per window, T."""
        return int(self.x_train.shape[2])


def _aeon(name: str, split: str) -> tuple[Any, np.ndarray, dict[str, Any]]:
    from aeon.datasets import load_classification

    try:
        x, y, meta = load_classification(name, split=split, return_metadata=True)
    except Exception as exc:  # aeon raises a mix of IOError/ValueError/URLError here
        raise DataError(f"aeon could not load {name!r} ({split}): {exc}") from exc
    return x, np.asarray(y), meta


def _ts(path: Path, split: str) -> tuple[Any, np.ndarray, dict[str, Any]]:
    from aeon.datasets import load_from_ts_file

    target = path
    if split == "test" and "_TRAIN" in path.name:
        target = path.with_name(path.name.replace("_TRAIN", "_TEST"))
    if not target.is_file():
        raise DataError(f"{target}: no such .ts file (a TRAIN path implies its TEST twin)")
    x, y, meta = load_from_ts_file(str(target), return_meta_data=True)
    return x, np.asarray(y), meta


def _npz(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """X (N, C, T) and y from an .npz; the split from its `split` array or a _TEST twin file."""
    def read(p: Path) -> Any:
        if not p.is_file():
            raise DataError(f"{p}: no such .npz file")
        arrays = np.load(p, allow_pickle=False)
        if not {"X", "y"} <= set(arrays.files):
            raise DataError(f"{p}: an .npz needs arrays X (N, C, T) and y (N,)")
        return arrays

    arrays = read(path)
    if "split" in arrays.files:
        split = arrays["split"].astype(str)
        return ({s: arrays["X"][split == s] for s in ("train", "test")},
                {s: arrays["y"][split == s] for s in ("train", "test")})
    if "_TRAIN" not in path.name:
        raise DataError(f"{path}: give a `split` array ('train'/'test') or name the file "
                        "*_TRAIN.npz beside its *_TEST.npz twin")
    test = read(path.with_name(path.name.replace("_TRAIN", "_TEST")))
    return {"train": arrays["X"], "test": test["X"]}, {"train": arrays["y"], "test": test["y"]}


def _as_array(x: Any, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        raise DataError(f"{where}: series of unequal length are not supported; resample them "
                        "to one length first")
    return x.astype(np.float32)


def load(name: str | None = None, path: str | None = None, *, channels: list[str] | None = None,
         rate_hz: float | None = None) -> Dataset:
    """Load train and test splits by aeon name, .ts path or .npz path."""
    if (name is None) == (path is None):
        raise DataError("give exactly one of a dataset name or a path")
    class_order: list[str] = []
    if path is not None and path.endswith(".npz"):
        xs, ys = _npz(Path(path))
        dname = Path(path).stem.replace("_TRAIN", "")
    else:
        loader = _aeon if path is None else _ts
        src: Any = name if path is None else Path(path)
        got = {s: loader(src, s) for s in ("train", "test")}
        xs = {s: got[s][0] for s in got}
        ys = {s: got[s][1] for s in got}
        class_order = [str(c) for c in got["train"][2].get("class_values") or []]
        dname = name if name is not None else Path(path or "").stem.replace("_TRAIN", "")
    x_train, x_test = _as_array(xs["train"], "train"), _as_array(xs["test"], "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"train {x_train.shape} and test {x_test.shape} differ in shape")
    y_tr, y_te = np.asarray(ys["train"]).astype(str), np.asarray(ys["test"]).astype(str)
    labels = class_order or sorted(set(y_tr) | set(y_te))
    missing = (set(y_tr) | set(y_te)) - set(labels)
    if missing:
        raise DataError(f"labels {sorted(missing)} are not among the declared classes")
    index = {lab: i for i, lab in enumerate(labels)}
    known = KNOWN.get(dname.lower(), {})
    n_ch = int(x_train.shape[1])
    chans = channels or known.get("channels") or [f"ch{i}" for i in range(n_ch)]
    if len(chans) != n_ch:
        raise DataError(f"{len(chans)} channel names for a dataset with {n_ch} channels")
    rate = rate_hz or known.get("rate_hz") or DEFAULT_RATE_HZ
    log.info("dataset %s: train %s, test %s, %d classes", dname, x_train.shape, x_test.shape,
             len(labels))
    return Dataset(dname, x_train, np.array([index[v] for v in y_tr], np.int64), x_test,
                   np.array([index[v] for v in y_te], np.int64), labels, list(chans),
                   float(rate))


def tokenize(cfg: PatchConfig, x: np.ndarray, rate_hz: float) -> np.ndarray:
    """Model input for (B, C, T) windows: exactly what the gateway computes at run time."""
    t = np.broadcast_to(np.arange(x.shape[2], dtype=np.float64) / rate_hz,
                        (x.shape[0], x.shape[2]))
    return cfg.build().tokenize_array(x.astype(np.float32), np.ascontiguousarray(t)).model_input()


def augment(x: np.ndarray, rng: np.random.Generator, jitter: float, scale: float,
            shift: int) -> np.ndarray:
    """Jitter, per-channel scaling and a circular time shift: cheap variety for tiny datasets."""
    b, c, _ = x.shape
    std = x.std(axis=2, keepdims=True) + 1e-6
    out = x * (1.0 + scale * rng.standard_normal((b, c, 1)))
    out = out + jitter * std * rng.standard_normal(x.shape)
    if shift > 0:
        rolls = np.asarray(rng.integers(-shift, shift + 1, size=b))
        out = np.stack([np.roll(out[i], int(rolls[i]), axis=1) for i in range(b)])
    return out.astype(np.float32)
