"""Recipes: validation, datasets by path (.ts, .npz), up-to-date bundles, checkpoint cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edgetok.models.build import data as datasets
from edgetok.models.build.recipe import run
from edgetok.models.build.spec import RecipeError, load_recipe
from edgetok.models.bundle import load_manifest

ROOT = Path(__file__).resolve().parent.parent

SYNTH = """
name = "synth"
seed = 0
[backbone]
kind = "scratch"
hidden = 16
layers = 2
heads = 2
ffn = 32
dropout = 0.0
[dataset]
path = "data/Synth_TRAIN.npz"
[tokenizer]
type = "patch"
patch_len = 8
stride = 8
normalize = false
[finetune]
epochs = 25
lr = 5e-3
augment = false
[prune]
ratios = [0.0, 0.5]
recovery_epochs = 3
[export]
splits = [0, 1, 2]
[profile]
repeats = 2
warmup = 0
calibration = 16
"""


def _synth(folder: Path, seed: int = 0) -> None:
    """Two channels, three classes told apart by amplitude: an easy, learnable npz pair."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("TRAIN", 48), ("TEST", 30)):
        y = np.repeat(np.array(["low", "mid", "high"]), n // 3)
        amp = np.select([y == "low", y == "mid"], [0.5, 2.0], 6.0)[:, None, None]
        t = np.arange(32)[None, None, :]
        x = amp * np.sin(t / 3.0 + rng.random((n, 2, 1)) * 6) + 0.1 * rng.standard_normal(
            (n, 2, 32))
        np.savez(folder / f"Synth_{split}.npz", X=x.astype(np.float32), y=y)


@pytest.fixture
def synth_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe over a synthetic .npz dataset, with a private checkpoint cache."""
    _synth(tmp_path / "data")
    path = tmp_path / "synth.toml"
    path.write_text(SYNTH)
    monkeypatch.setenv("EDGETOK_CACHE", str(tmp_path / "cache"))
    return path


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    """extra="forbid" and field bounds reach the user as a RecipeError naming the field."""
    base = (ROOT / "configs/models/tiny.toml").read_text()
    cases = {"[finetune]\n": "[finetune]\nepochz = 3\n",
             "ratios = [0.0, 0.5]": "ratios = [0.0, 1.5]",
             'name = "BasicMotions"': 'name = "BasicMotions"\npath = "x.npz"'}
    for old, new in cases.items():
        assert old in base
        bad = tmp_path / "bad.toml"
        bad.write_text(base.replace(old, new, 1))
        with pytest.raises(RecipeError, match="invalid recipe"):
            load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe"):
        load_recipe(tmp_path / "absent.toml")


def test_shipped_recipes_validate() -> None:
    """Every recipe in configs/models parses; the reference pins MiniLM's digest."""
    for path in sorted((ROOT / "configs/models").glob("*.toml")):
        load_recipe(path)
    ref = load_recipe(ROOT / "configs/models/reference.toml")
    assert ref.backbone.kind == "pretrained" and ref.backbone.sha256 is not None
    assert len(ref.backbone.sha256) == 64


def test_ts_path_loads_like_the_aeon_name() -> None:
    """A *_TRAIN.ts path finds its TEST twin and yields the same arrays as the name."""
    from importlib.util import find_spec

    spec = find_spec("aeon")
    assert spec is not None and spec.submodule_search_locations
    ts = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/GunPoint"
    by_name = datasets.load("GunPoint")
    by_path = datasets.load(path=str(ts / "GunPoint_TRAIN.ts"))
    np.testing.assert_array_equal(by_name.x_test, by_path.x_test)
    np.testing.assert_array_equal(by_name.y_train, by_path.y_train)
    assert by_path.channels == ["ch0"] and by_path.window == 150


def test_npz_without_split_is_refused(tmp_path: Path) -> None:
    """An .npz with neither a split array nor a _TEST twin is refused with the fix."""
    np.savez(tmp_path / "all.npz", X=np.zeros((4, 1, 8)), y=np.array(["a", "b", "a", "b"]))
    with pytest.raises(datasets.DataError, match="split"):
        datasets.load(path=str(tmp_path / "all.npz"))


def test_npz_recipe_builds_a_bundle(synth_recipe: Path, tmp_path: Path) -> None:
    """The same recipe format builds any dataset: channels, window and labels come from it."""
    out = run(synth_recipe, tmp_path / "bundles/synth", progress=False)
    m = load_manifest(out)
    assert m.input.channels == ["ch0", "ch1"] and m.input.window == 32
    assert m.labels == ["high", "low", "mid"]
    assert m.variant("r0.00-s1").feature_shape == [5, 16]  # 4 patches + CLS
    assert m.variant("r0.00-s0").profile.accuracy["fp32"] >= 0.8
    report = json.loads((out / "report.json").read_text())
    assert report["build"]["dataset"] == "Synth"


def test_rebuild_is_skipped_then_resumed_from_cache(synth_recipe: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Same recipe: kept as is; forced: rebuilt from cached checkpoints to the same files."""
    out = tmp_path / "bundles/synth"
    first = load_manifest(run(synth_recipe, out, progress=False))
    again = load_manifest(run(synth_recipe, out, progress=False))
    assert again.bundle_id == first.bundle_id
    with caplog.at_level(logging.INFO, logger="edgetok.models.build.recipe"):
        forced = load_manifest(run(synth_recipe, out, force=True, progress=False))
    assert sum("reused cached checkpoint" in r.message for r in caplog.records) == 2
    assert forced.files == first.files


def test_other_content_needs_force(synth_recipe: Path, tmp_path: Path) -> None:
    """A bundle of a different recipe in `out` is not overwritten silently."""
    out = tmp_path / "bundles/synth"
    run(synth_recipe, out, progress=False)
    synth_recipe.write_text(SYNTH.replace("epochs = 25", "epochs = 24"))
    with pytest.raises(RecipeError, match="force"):
        run(synth_recipe, out, progress=False)
