"""The embedded default (`upcycle_encoder.py` with no --data) end to end at small sizes, and the reproduction table."""

from __future__ import annotations

import json

import pytest
import yaml

from upcycle.cli import main
from upcycle.reproduce import summarize


def test_default_run_compares_recipes_on_the_shapes_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "clip-moe"
    main(["--output", str(out), "--shapes-scale", "0.04", "--base-epochs", "1", "--num-workers", "0",
          "--batch-size", "16", "--lr-sweep", "1", "3"])
    assert (tmp_path / "cache" / "base-shapes-seed0-x0.04-n2000-val0.1-e1-lr0.002" / "model.safetensors").is_file()
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["metrics"]) == {"dense base", "dense", "clip-up", "dmu"}
    for metrics in comparison["metrics"].values():
        assert "retrieval/i2t_R@1" in metrics and "mmvp/average" in metrics
        assert any(k.startswith("zeroshot/color") for k in metrics)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    for recipe in ("dense", "clip-up"):
        assert (tmp_path / "runs" / f"clip-moe-{recipe}" / "model.safetensors").is_file()
    # the sweep: every recipe also ran at 3x its rates, and the table compares each recipe's best held-out run
    scaled = yaml.safe_load((tmp_path / "runs" / "clip-moe-dmu-x3" / "run_config.yaml").read_text())["optim"]
    assert scaled["mcl_lr"] == pytest.approx(3 * 5e-4) and scaled["router_lr"] == pytest.approx(3 * 1e-3)
    folders = {"dmu": {"1": out, "3": tmp_path / "runs" / "clip-moe-dmu-x3"}}
    for recipe in ("dense", "clip-up"):
        folders[recipe] = {"1": tmp_path / "runs" / f"clip-moe-{recipe}",
                           "3": tmp_path / "runs" / f"clip-moe-{recipe}-x3"}
    for recipe, runs in folders.items():
        held_out = {f: json.loads((p / "summary.json").read_text())["validation"]["result"] for f, p in runs.items()}
        scores = {f: (r["i2t_R@1"] + r["t2i_R@1"]) / 2 for f, r in held_out.items()}
        assert comparison["lr_sweep"][recipe] == {f: pytest.approx(v, abs=1e-4) for f, v in scores.items()}
        best = max(scores, key=lambda f: (scores[f], f == "1"))
        assert comparison["chosen_factor"][recipe] == float(best)
        assert comparison["runs"][recipe] == str(runs[best])
    table = (out / "comparison.md").read_text()
    assert "| metric | dense base | dense | clip-up | dmu |" in table and "Expert usage" in table
    assert "Learning-rate sweep" in table and "| dmu | mcl_lr 0.0005, router_lr 0.001 |" in table
    assert table.startswith("tiny dense base convergence") and " ± " in table  # evidence, standard errors
    printed = capsys.readouterr().out
    assert table in printed and "What each MCL stage changed" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stage_diagnostics"]) == ["base", "mcl-1", "mcl-2", "mcl-3"]
    assert all("mmvp/average" in m and "held_out/i2t_R@1" in m for m in summary["stage_diagnostics"].values())
    held_out = summary["stage_diagnostics"]["base"]
    p, n = held_out["held_out/i2t_R@1"], held_out["held_out/n"]  # the held-out recall carries its standard error
    assert held_out["held_out/i2t_R@1/se"] == pytest.approx((p * (1 - p) / n) ** 0.5, abs=1e-4)
    cosines = summary["expert_diversity"]["image"]["output_cosine"]
    assert len(cosines) == 4 and all(-1.0 <= c <= 1.0 for c in cosines)  # one per MoE layer of the image tower
    # a second run reuses the cached world and base
    main(["--output", str(tmp_path / "again"), "--shapes-scale", "0.04", "--base-epochs", "1", "--num-workers", "0",
          "--batch-size", "16", "--no-compare", "--recipe", "dense"])
    assert "cached at" in capsys.readouterr().out


def test_reproduction_table_mean_and_standard_error():
    per_seed = {0: {"dmu": {"a": 0.5, "a/se": 0.1}, "dense": {"a": 0.25}},
                1: {"dmu": {"a": 0.7, "a/se": 0.1}, "dense": {"a": 0.25}}}
    table = summarize(per_seed)
    assert "| metric | dmu | dense |" in table and "a/se" not in table
    assert "| a | 60.0 ± 10.0 | 25.0 ± 0.0 |" in table  # std 14.14 over 2 seeds -> standard error 10.0


def test_paired_differences_mark_wins_beyond_two_standard_errors():
    from upcycle.reproduce import differences

    # dmu - dense per seed: +10, +12, +14 -> mean 12, se 2/sqrt(3) = 1.15: a win; dmu - clip-up: +4, -6, -1 -> neither
    per_seed = {s: {"dmu": {"a": 0.5 + d / 100}, "dense": {"a": 0.5}, "clip-up": {"a": 0.5 + (d - c) / 100}}
                for s, (d, c) in enumerate([(10, 4), (12, -6), (14, -1)])}
    table = differences(per_seed, against=("dense", "clip-up"))
    assert "| metric | dmu − dense | dmu − clip-up |" in table
    assert "| a | +12.0 ± 1.2 (win) | -1.0 ± 2.9 |" in table


def test_plateau_criterion_reads_the_last_quarter_of_the_curve():
    from upcycle.default_run import _plateau, convergence_text

    rising = [{"epoch": e, "i2t_R@1": 0.1 * e / 8, "t2i_R@1": 0.1 * e / 8} for e in (2, 4, 6, 8)]
    flat = [{"epoch": e, "i2t_R@1": min(0.5, 0.2 * e), "t2i_R@1": min(0.5, 0.2 * e)} for e in (2, 4, 6, 8)]
    assert _plateau(rising, 8)["last_quarter_gain_points"] == 2.5 and _plateau(rising, 8)["reached"] is False
    assert _plateau(flat, 8)["last_quarter_gain_points"] == 0.0 and _plateau(flat, 8)["reached"] is True
    # with the probes' standard errors the verdict carries the standard error of the gain
    probed = [{**c, "i2t_R@1/se": 0.03, "t2i_R@1/se": 0.04} for c in rising]
    assert _plateau(probed, 8)["last_quarter_gain_se_points"] == pytest.approx(100 * (2 * 0.025 ** 2) ** 0.5, abs=0.01)
    assert "+2.50 ± 3.54 (one s.e. of the probes)" in convergence_text({"curve": probed, "plateau": _plateau(probed, 8)})
    # a flat curve measured by probes too small to resolve the criterion says so
    flat_probed = [{**c, "i2t_R@1/se": 0.03, "t2i_R@1/se": 0.04} for c in flat]
    assert convergence_text({"curve": flat_probed, "plateau": _plateau(flat_probed, 8)}).startswith(
        "tiny dense base convergence (plateau reached, but the probes cannot resolve 1 point)")
    text = convergence_text({"curve": flat, "plateau": _plateau(flat, 8)})
    assert text.startswith("tiny dense base convergence (plateau reached)") and "e8:50.0" in text
