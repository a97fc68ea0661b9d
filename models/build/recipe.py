"""`edgetok build`: a recipe to a verified bundle of pruned, split ONNX variants and a report."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgetok.models.build import data as datasets
from edgetok.models.build import export, profile, prune, train
from edgetok.models.build.backbone import Encoder, EncoderShape, count_params, flops
from edgetok.models.build.spec import TOOLCHAIN_VERSION, Recipe, RecipeError, load_recipe
from edgetok.models.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    BundleError,
    Manifest,
    Profile,
    Variant,
    read_manifest,
    sha256_file,
)
from tqdm import tqdm

log = logging.getLogger(__name__)

# Where trained checkpoints are kept between runs, unless EDGETOK_CACHE says otherwise:
# beside the bundle, so a rebuild after an interrupt resumes and nothing lands in $HOME.
CACHE_ENV = "EDGETOK_CACHE"
# Clock assumed when the machine does not say (the DESIGN's default reference).
DEFAULT_HZ = 3.0e9


def reference_hz() -> float:
    """This machine's CPU clock in Hz, from /proc/cpuinfo when it is there."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_HZ


class Build:
    """One build: data, model, cached checkpoints, the bundle directory being written."""

    def __init__(self, recipe: Recipe, stage: Path, cache: Path, bar: tqdm) -> None:
        self.recipe = recipe
        self.stage = stage
        self.cache = cache
        self.bar = bar
        r = recipe
        self.data = datasets.load(r.dataset.name, r.dataset.path, channels=r.dataset.channels,
                                  rate_hz=r.dataset.rate_hz)
        self.tok = r.tokenizer
        self.x_train = datasets.tokenize(self.tok, self.data.x_train, self.data.rate_hz)
        self.x_test = datasets.tokenize(self.tok, self.data.x_test, self.data.rate_hz)
        rng = np.random.default_rng(r.seed)
        self.calib = np.sort(rng.permutation(len(self.x_train))[: r.profile.calibration])
        self.x_calib = self.x_train[self.calib]
        self.facts: dict[str, Any] = {}
        self._initial: Encoder | None = None

    def fresh(self) -> Encoder:
        """An untrained model as the recipe describes it (pretrained weights loaded)."""
        if self._initial is None:
            self._initial = self._make()
        return copy.deepcopy(self._initial)

    def _make(self) -> Encoder:
        r, b = self.recipe, self.recipe.backbone
        dim, k = int(self.x_train.shape[2]), len(self.data.labels)
        torch.manual_seed(r.seed)
        if b.kind == "pretrained":
            from edgetok.models.build.pretrained import load_bert, package_dir

            root = Path(b.path) if b.path is not None else package_dir(b.package or "")
            model = load_bert(root, token_dim=dim, num_classes=k, pool=r.task.pool,
                              dropout=b.dropout, sha256=b.sha256, seed=r.seed)
        else:
            model = Encoder(EncoderShape(
                token_dim=dim, hidden=b.hidden, layers=b.layers, heads=b.heads,
                head_dim=b.hidden // b.heads, ffn=b.ffn, num_classes=k,
                max_positions=b.max_positions, dropout=b.dropout, pool=r.task.pool))
        need = int(self.x_train.shape[1]) + 1
        if need > model.shape.max_positions:
            raise RecipeError(f"{need - 1} tokens per window exceed the backbone's "
                              f"{model.shape.max_positions - 1} positions; use longer patches")
        return model

    def _epoch_tokens(self, seed: int) -> Callable[[int], np.ndarray]:
        ft = self.recipe.finetune
        if not ft.augment:
            return lambda _epoch: self.x_train
        rng = np.random.default_rng(seed)

        def tokens(_epoch: int) -> np.ndarray:
            x = datasets.augment(self.data.x_train, rng, ft.jitter, ft.scale, ft.shift)
            return datasets.tokenize(self.tok, x, self.data.rate_hz)
        return tokens

    def _train(self, model: Encoder, epochs: int, lr: float, seed: int) -> list[float]:
        ft = self.recipe.finetune
        params = train.configure(model, ft)
        sched = train.Schedule(epochs, ft.batch_size, lr, ft.weight_decay, ft.warmup,
                               ft.label_smoothing)
        losses = train.fit(model, params, self._epoch_tokens(seed), self.data.y_train, sched,
                           seed, progress=self.bar.update)
        train.merge(model)
        return losses

    def _cached(self, name: str,
                make: Callable[[], tuple[Encoder, dict[str, Any]]]) -> tuple[Encoder, dict[str, Any]]:
        """A checkpoint and the facts measured while making it, from the cache or `make`."""
        path = self.cache / f"{name}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = self.fresh()
            prune.restore_structure(model, saved["kept"])
            model.load_state_dict(saved["state"])
            model.eval()
            log.info("reused cached checkpoint %s", path)
            return model, dict(saved.get("meta", {}))
        model, meta = make()
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "kept": prune.kept_units(model), "meta": meta},
                   tmp)
        tmp.replace(path)
        return model, meta

    def finetuned(self) -> Encoder:
        """The fine-tuned, unpruned model (from the cache when the recipe is unchanged)."""
        r = self.recipe
        key = r.digest("seed", "backbone", "dataset", "tokenizer", "task", "finetune")

        def make() -> tuple[Encoder, dict[str, Any]]:
            model = self.fresh()
            losses = self._train(model, r.finetune.epochs, r.finetune.lr, r.seed)
            return model, {"losses": [round(v, 5) for v in losses]}
        model, meta = self._cached(f"finetuned-{key}", make)
        self.facts["finetune_losses"] = meta.get("losses", [])
        return model

    def pruned(self, base: Encoder, ratio: float) -> Encoder:
        """`base` pruned at `ratio` and recovered (cached)."""
        r = self.recipe
        if ratio == 0:
            return base
        key = r.digest("seed", "backbone", "dataset", "tokenizer", "task", "finetune", "prune")

        def make() -> tuple[Encoder, dict[str, Any]]:
            model = copy.deepcopy(base)
            scores = prune.importance(model, self.x_calib, self.data.y_train[self.calib],
                                      r.prune.importance)
            prune.prune(model, ratio, scores)
            # The pruning-aware bound concerns θ_ρ before any retraining: record it too.
            reference = {n: p.detach().clone() for n, p in base.named_parameters()}
            before = {
                "param_distortion": prune.param_distortion(model, reference),
                "output_distortion": profile.output_distortion(
                    train.predict(base, self.x_calib), train.predict(model, self.x_calib)),
                "accuracy": train.accuracy(train.predict(model, self.x_test),
                                           self.data.y_test)}
            if r.prune.recovery_epochs:
                self._train(model, r.prune.recovery_epochs,
                            r.prune.recovery_lr or r.finetune.lr / 2,
                            r.seed + int(ratio * 1000))
            return model, before
        model, before = self._cached(f"pruned-{key}-r{ratio:.2f}", make)
        self.facts.setdefault("before_recovery", {})[f"{ratio:.2f}"] = before
        return model

    def variants(self, model: Encoder, base: Encoder, ratio: float,
                 base_calib: np.ndarray) -> list[Variant]:
        """Export, verify and profile every split of one pruned model."""
        r = self.recipe
        num_layers = model.num_layers
        splits = r.export.splits if r.export.splits is not None else list(range(num_layers + 1))
        bad = [s for s in splits if not 0 <= s <= num_layers]
        if bad:
            raise RecipeError(f"split points {bad} are outside 0..{num_layers}")
        reference = {n: p.detach().clone() for n, p in base.named_parameters()}
        p_dist = prune.param_distortion(model, reference)
        o_dist = profile.output_distortion(base_calib, train.predict(model, self.x_calib))
        # Past the distortion figures, which compare against the untrimmed base model.
        model = trim_positions(model, int(self.x_test.shape[1]) + 1)
        made = export.export_splits(model, ratio, splits, self.stage, self.x_test,
                                    r.export.opset, r.export.shared_weights)
        structure = model.structure()
        n_tok = int(self.x_test.shape[1])
        one = self.x_test[:1]
        out = []
        for f in made:
            head_t = (profile.latency(self.stage / f.head, one, r.profile.repeats,
                                      r.profile.warmup) if f.head else profile.Timing(0, 0))
            mid = one if f.head is None else export.run_split(
                self.stage, export.SplitFiles(f.variant_id, ratio, f.split, f.head, None,
                                              f.feature_shape), one)
            tail_t = (profile.latency(self.stage / f.tail, mid, r.profile.repeats,
                                      r.profile.warmup) if f.tail else profile.Timing(0, 0))
            wire = profile.wire_quality(self.stage, f, self.x_test, self.data.y_test,
                                        list(r.export.precisions))
            prof = Profile(
                params_head=count_params(model.part(0, f.split)) if f.split else 0,
                params_tail=(count_params(model.part(f.split, num_layers))
                             if f.split < num_layers else 0),
                flops_head=flops(model.shape, structure, n_tok, 0, f.split) if f.split else 0.0,
                flops_tail=(flops(model.shape, structure, n_tok, f.split, num_layers)
                            if f.split < num_layers else 0.0),
                head_ms=head_t.default_ms, tail_ms=tail_t.default_ms,
                head_ms_1t=head_t.single_ms, tail_ms_1t=tail_t.single_ms,
                feature_bytes=profile.feature_bytes(f, num_layers, list(r.export.precisions)),
                accuracy=wire.accuracy, param_distortion=p_dist, output_distortion=o_dist,
                int8_scale=wire.int8_scale, int8_zero_point=wire.int8_zero_point)
            out.append(Variant(id=f.variant_id, pruning_ratio=ratio, split=f.split,
                               head=f.head, tail=f.tail, feature_shape=f.feature_shape,
                               profile=prof))
            self.bar.update(1)
        self.facts.setdefault("structure", {})[f"{ratio:.2f}"] = structure
        self.facts.setdefault("params", {})[f"{ratio:.2f}"] = count_params(model)
        return out


def trim_positions(model: Encoder, positions: int) -> Encoder:
    """A copy whose position table holds only the rows a bundle's fixed token count uses."""
    trimmed = copy.deepcopy(model)
    trimmed.embed.pos = torch.nn.Parameter(model.embed.pos.detach()[:positions].clone())
    return trimmed


def _cache_dir(out: Path) -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else out.parent / ".edgetok-cache"


def _up_to_date(out: Path, digest: str) -> bool:
    try:
        manifest = read_manifest(out)
    except BundleError:
        return False
    return bool(manifest.build.get("recipe_digest") == digest)


def run(recipe: Path, out: Path, force: bool = False, progress: bool = True) -> Path:
    """Build the bundle a recipe describes into `out`; returns `out`.

    An existing bundle from the same recipe is kept unless `force`; any other content in
    `out` is refused unless `force`. Checkpoints are cached, so an interrupted build resumes.
    """
    started = time.monotonic()
    recipe, out = Path(recipe), Path(out)
    r = load_recipe(recipe)
    digest = r.digest()
    if out.exists() and not force:
        if _up_to_date(out, digest):
            log.info("%s is up to date with %s", out, recipe)
            return out
        raise RecipeError(f"{out} exists and is not a build of this recipe; pass force")
    if r.threads:
        torch.set_num_threads(r.threads)
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    ratios = r.prune.ratios
    with tqdm(disable=not progress, desc=f"build {r.name}", unit="step") as bar:
        b = Build(r, stage, _cache_dir(out) / r.name, bar)
        num_layers = b.fresh().num_layers
        n_splits = len(r.export.splits) if r.export.splits is not None else num_layers + 1
        bar.total = (r.finetune.epochs + sum(r.prune.recovery_epochs for x in ratios if x > 0)
                     + len(ratios) * n_splits)
        base = b.finetuned()
        base_calib = train.predict(base, b.x_calib)
        variants: list[Variant] = []
        summary: dict[str, Any] = {}
        for ratio in ratios:
            bar.set_postfix_str(f"ratio {ratio:.2f}")
            model = b.pruned(base, ratio)
            vs = b.variants(model, base, ratio, base_calib)
            variants += vs
            summary[f"{ratio:.2f}"] = vs[0].profile.accuracy.get("fp32", 0.0)
            log.info("ratio %.2f: test accuracy %.3f", ratio, summary[f"{ratio:.2f}"])
    created = dt.datetime.now(dt.UTC)
    files = {p.name: sha256_file(p) for p in sorted(stage.iterdir())
             if p.suffix in (".onnx", ".bin")}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        bundle_id=f"{r.name}-{digest[:8]}-{created:%Y%m%dT%H%M%S}",
        created=created.isoformat(timespec="seconds"), num_layers=num_layers,
        labels=b.data.labels,
        input={"modality": "series", "channels": b.data.channels, "window": b.data.window,
               "rate_hz": b.data.rate_hz, "tokenizer": r.tokenizer.model_dump(mode="json")},
        variants=variants, files=files, reference_hz=reference_hz(),
        build={"recipe": r.model_dump(mode="json"), "recipe_digest": digest,
               "recipe_file": str(recipe), "toolchain_version": TOOLCHAIN_VERSION,
               "torch": torch.__version__, "dataset": b.data.name,
               "train_windows": len(b.x_train), "test_windows": len(b.x_test),
               "accuracy_by_ratio": summary, "build_seconds": 0.0, **b.facts})
    (stage / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    from edgetok.models.build import report

    report.write(stage, manifest)
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    seconds = time.monotonic() - started
    # Build time goes in last, after the report; it is not covered by any file checksum.
    data = json.loads((out / MANIFEST).read_text())
    data["build"]["build_seconds"] = round(seconds, 2)
    (out / MANIFEST).write_text(json.dumps(data, indent=1))
    log.info("built %s in %.1f s: %d variants", out, seconds, len(variants))
    return out
