"""`edgetok plan`: decisions, explanations and errors, on synthetic and real bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetok.agent.coordinator.model import options_from_manifest
from edgetok.agent.coordinator.plan import EXIT_INFEASIBLE, EXIT_OK, EXIT_USAGE, main
from edgetok.agent.coordinator.synthetic import synthetic_manifest
from edgetok.models.bundle import read_manifest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "configs/scenarios").glob("*.toml"))
MANIFEST = synthetic_manifest(num_layers=4, ratios=(0.0, 0.25, 0.5), layer_ms=8.0)
WIFI = """
[link]
bandwidth_hz = 20e6
gain = 7.96e-12
noise_w_per_hz = 3.98e-20
p_max_w = 0.1
[device]
f_min_hz = 0.6e9
f_max_hz = 1.5e9
kappa = 2e-28
[server]
slowdown = 1.0
queue_ms = 2.0
[budget]
deadline_ms = 60.0
energy_mj = 20.0
privacy_min_split = 1
"""


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A bundle directory holding only a synthetic manifest (planning reads nothing else)."""
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "manifest.json").write_text(MANIFEST.model_dump_json())
    return d


def scenario(tmp_path: Path, text: str = WIFI) -> Path:
    """Write a scenario file and return its path."""
    p = tmp_path / "scenario.toml"
    p.write_text(text)
    return p


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    """Run `edgetok plan --json …` and parse what it printed."""
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_json_decision(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = plan_json(capsys, "--bundle", str(bundle), "--scenario", str(scenario(tmp_path)))
    assert code == EXIT_OK
    assert set(out) >= {"pruning_ratio", "split", "precision", "cpu_hz", "tx_power_w",
                        "predicted", "feasible"}
    assert set(out["predicted"]) == {"latency_ms", "energy_mj", "distortion", "accuracy"}
    assert out["feasible"] is True
    assert out["predicted"]["latency_ms"] <= 60.0 * (1 + 1e-9)
    assert out["predicted"]["energy_mj"] <= 20.0 * (1 + 1e-9)
    assert out["split"] >= 1
    assert 0.6e9 <= out["cpu_hz"] <= 1.5e9
    assert 0 < out["tx_power_w"] <= 0.1
    assert MANIFEST.variant(out["variant"]).pruning_ratio == out["pruning_ratio"]


def test_explain_lists_every_candidate(bundle: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    n = len(options_from_manifest(MANIFEST).options)
    code, out = plan_json(capsys, "--bundle", str(bundle), "--scenario", str(scenario(tmp_path)),
                          "--explain")
    assert code == EXIT_OK
    rows = out["candidates"]
    assert len(rows) == n
    assert sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["variant"] == out["variant"] and chosen["feasible"]
    for r in rows:
        assert {"c_head_cycles", "s_bytes", "t_tail_ms", "distortion", "cpu_hz", "tx_power_w",
                "feasible"} <= set(r)
        assert r["allowed"] == (r["split"] >= 1)
        if r["split"] == 4:
            assert r["s_bytes"] == 0 and r["t_tail_ms"] == 0 and r["tx_power_w"] == 0
    # Nothing allowed and feasible beats the choice on distortion.
    assert min(r["distortion"] for r in rows if r["feasible"] and r["allowed"]) == pytest.approx(
        chosen["distortion"])
    assert main(["--bundle", str(bundle), "--scenario", str(scenario(tmp_path)),
                 "--explain"]) == EXIT_OK
    text = capsys.readouterr().out
    assert text.count("\n  r0.") + text.count("\n* r0.") == n
    assert "C_head[Mcyc]" in text and "T_tail[ms]" in text


def test_infeasible_scenario_exits_1_with_least_overrun(
        bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hopeless = WIFI.replace("deadline_ms = 60.0", "deadline_ms = 1.0")
    code, out = plan_json(capsys, "--bundle", str(bundle), "--scenario",
                          str(scenario(tmp_path, hopeless)), "--explain")
    assert code == EXIT_INFEASIBLE
    assert out["feasible"] is False
    allowed = [r for r in out["candidates"] if r["allowed"]]
    assert out["predicted"]["latency_ms"] == pytest.approx(min(r["latency_ms"] for r in allowed))


def test_policy_flag(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    relaxed = WIFI.replace("deadline_ms = 60.0", "deadline_ms = 200.0").replace(
        "energy_mj = 20.0", "energy_mj = 100.0")
    path = str(scenario(tmp_path, relaxed))
    _, out = plan_json(capsys, "--bundle", str(bundle), "--scenario", path,
                       "--policy", "device-only")
    assert out["split"] == 4 and out["tx_power_w"] == 0
    assert main(["--bundle", str(bundle), "--scenario", path, "--policy",
                 "server-only"]) == EXIT_USAGE
    assert "privacy" in capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [
    (WIFI.replace("[link]\n", "[lnk]\n"), "link"),
    (WIFI.replace("p_max_w = 0.1", "p_max_w = 0.1\ncolour = 3"), "link.colour: unknown key"),
    (WIFI.replace("gain = 7.96e-12", 'gain = "strong"'), "link.gain"),
    (WIFI.replace("f_max_hz = 1.5e9", "f_max_hz = 1e8"), "f_max_hz"),
    (WIFI.replace("kappa = 2e-28", "kappa = -1.0"), "device.kappa"),
    (WIFI.replace("deadline_ms = 60.0", ""), "budget.deadline_ms"),
    (WIFI.replace("privacy_min_split = 1", "privacy_min_split = 9"), "privacy_min_split"),
    ("[link\n", "TOML syntax"),
])
def test_bad_scenario_is_reported_with_its_location(
        bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
        needle: str) -> None:
    code = main(["--bundle", str(bundle), "--scenario", str(scenario(tmp_path, text))])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert needle in err
    assert "scenario.toml" in err


def test_missing_files_are_clear_errors(bundle: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bundle", str(tmp_path / "nope"), "--scenario",
                 str(scenario(tmp_path))]) == EXIT_USAGE
    assert "no manifest" in capsys.readouterr().err
    assert main(["--bundle", str(bundle), "--scenario", str(tmp_path / "x.toml")]) == EXIT_USAGE
    assert "file not found" in capsys.readouterr().err
    # --verify checks file hashes: the synthetic bundle has no ONNX files.
    assert main(["--bundle", str(bundle), "--scenario", str(scenario(tmp_path)),
                 "--verify"]) == EXIT_USAGE
    assert "missing bundle file" in capsys.readouterr().err


def test_help_documents_the_scenario_tables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("bandwidth_hz", "noise_w_per_hz", "f_min_hz", "kappa", "slowdown", "queue_ms",
                "deadline_ms", "energy_mj", "privacy_min_split", "--explain"):
        assert key in out


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenarios_plan(bundle: Path, path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out = plan_json(capsys, "--bundle", str(bundle), "--scenario", str(path))
    assert code in (EXIT_OK, EXIT_INFEASIBLE)
    assert out["feasible"] is (code == EXIT_OK)


def test_plans_a_real_bundle(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = read_manifest(tiny_bundle)
    for path in SCENARIOS:
        code, out = plan_json(capsys, "--bundle", str(tiny_bundle), "--scenario", str(path),
                              "--verify", "--explain")
        assert code in (EXIT_OK, EXIT_INFEASIBLE)
        v = manifest.variant(out["variant"])
        assert (v.pruning_ratio, v.split) == (out["pruning_ratio"], out["split"])
        assert len(out["candidates"]) == len(options_from_manifest(manifest).options)
        heads = [r for r in out["candidates"] if r["split"] > 0]
        assert all(r["c_head_cycles"] > 0 for r in heads)
