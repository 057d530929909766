"""The embedded default (`upcycle_encoder.py` with no --data) end to end at small sizes, and the reproduction table."""

from __future__ import annotations

import json

import pytest

from upcycle.cli import main
from upcycle.reproduce import summarize


def test_default_run_compares_recipes_on_the_shapes_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "clip-moe"
    main(["--output", str(out), "--shapes-scale", "0.04", "--base-epochs", "1", "--num-workers", "0",
          "--batch-size", "16"])
    assert (tmp_path / "cache" / "base-shapes-seed0-x0.04-e1-lr0.002" / "model.safetensors").is_file()
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["metrics"]) == {"dense base", "dense", "clip-up", "dmu"}
    for metrics in comparison["metrics"].values():
        assert "retrieval/i2t_R@1" in metrics and "mmvp/average" in metrics
        assert any(k.startswith("zeroshot/color") for k in metrics)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    for recipe in ("dense", "clip-up"):
        assert (tmp_path / "runs" / f"clip-moe-{recipe}" / "model.safetensors").is_file()
    table = (out / "comparison.md").read_text()
    assert "| metric | dense base | dense | clip-up | dmu |" in table and "Expert usage" in table
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


def test_reproduction_table_mean_and_std():
    per_seed = {0: {"dmu": {"a": 0.5}, "dense": {"a": 0.25}}, 1: {"dmu": {"a": 0.7}, "dense": {"a": 0.25}}}
    table = summarize(per_seed)
    assert "| metric | dmu | dense |" in table
    assert "| a | 60.0 ± 14.1 | 25.0 ± 0.0 |" in table


def test_plateau_criterion_reads_the_last_quarter_of_the_curve():
    from upcycle.default_run import _plateau, convergence_text

    rising = [{"epoch": e, "i2t_R@1": 0.1 * e / 8, "t2i_R@1": 0.1 * e / 8} for e in (2, 4, 6, 8)]
    flat = [{"epoch": e, "i2t_R@1": min(0.5, 0.2 * e), "t2i_R@1": min(0.5, 0.2 * e)} for e in (2, 4, 6, 8)]
    assert _plateau(rising, 8)["last_quarter_gain_points"] == 2.5 and _plateau(rising, 8)["reached"] is False
    assert _plateau(flat, 8)["last_quarter_gain_points"] == 0.0 and _plateau(flat, 8)["reached"] is True
    text = convergence_text({"curve": flat, "plateau": _plateau(flat, 8)})
    assert text.startswith("tiny dense base convergence (plateau reached)") and "e8:50.0" in text
