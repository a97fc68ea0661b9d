"""Fine-tuning modes train what they say they train; the build CLI reports user errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgetok.models.build import train  # noqa: E402
from edgetok.models.build.__main__ import main  # noqa: E402
from edgetok.models.build.backbone import Encoder, EncoderShape  # noqa: E402
from edgetok.models.build.spec import FinetuneSpec  # noqa: E402

SHAPE = EncoderShape(token_dim=4, hidden=16, layers=2, heads=2, head_dim=8, ffn=24,
                     num_classes=2, max_positions=12, dropout=0.0)


def _data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by the sign of the mean token: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = rng.standard_normal((n, 5, 4)).astype(np.float32) + (2 * y - 1)[:, None, None] * 1.5
    return x.astype(np.float32), y.astype(np.int64)


def _fit(mode: str, epochs: int = 6) -> tuple[Encoder, Encoder]:
    torch.manual_seed(0)
    model = Encoder(SHAPE)
    before = copy.deepcopy(model)
    spec = FinetuneSpec(mode=mode, epochs=epochs, lr=1e-2, warmup=0.0)  # type: ignore[arg-type]
    params = train.configure(model, spec)
    x, y = _data()
    sched = train.Schedule(epochs, 8, spec.lr, 0.0, 0.0, 0.0)
    train.fit(model, params, lambda _e: x, y, sched, seed=0)
    train.merge(model)
    return before, model


def _changed(a: Encoder, b: Encoder) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def test_lightweight_trains_only_mapping_norms_positions_and_head() -> None:
    """GPT4TS-style: attention and FFN matrices stay as they were."""
    before, after = _fit("lightweight")
    changed = _changed(before, after)
    assert "embed.proj.weight" in changed and "head.fc.weight" in changed
    assert "embed.pos" in changed and "layers.0.ln1.weight" in changed
    frozen = [k for k in before.state_dict() if any(
        f".{m}." in k for m in ("query", "key", "value", "out", "inter", "output"))]
    assert frozen and not (set(frozen) & changed)


def test_lora_changes_query_and_value_only_among_matrices() -> None:
    """LoRA adapters fold into Q and V; K, out and FFN stay put; no adapter is left."""
    before, after = _fit("lora")
    changed = _changed(before, after)
    assert {"layers.0.attn.query.weight", "layers.1.attn.value.weight"} <= changed
    assert not {"layers.0.attn.key.weight", "layers.0.inter.weight",
                "layers.1.attn.out.weight"} & changed
    assert set(after.state_dict()) == set(before.state_dict())
    assert all(p.requires_grad for p in after.parameters())


def test_full_fine_tuning_learns_the_task() -> None:
    """Full mode moves every layer and separates the two classes."""
    before, after = _fit("full", epochs=10)
    assert "layers.1.inter.weight" in _changed(before, after)
    x, y = _data()
    assert train.accuracy(train.predict(after, x), y) >= 0.9


def test_cli_reports_a_bad_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe error exits 2 with the reason, not a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[backbone]\nkind = "nope"\n')
    assert main(["--recipe", str(bad), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "invalid recipe" in capsys.readouterr().err
