"""The embedded default (`upcycle_encoder.py` with no --data) end to end at small sizes, and the reproduction table."""

from __future__ import annotations

import json

from upcycle.cli import main
from upcycle.reproduce import summarize


def test_default_run_compares_recipes_on_the_shapes_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "clip-moe"
    main(["--output", str(out), "--shapes-scale", "0.04", "--base-epochs", "1", "--num-workers", "0",
          "--batch-size", "16"])
    assert (tmp_path / "cache" / "base-shapes-seed0-x0.04" / "model.safetensors").is_file()
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
    assert table in capsys.readouterr().out
    # a second run reuses the cached world and base
    main(["--output", str(tmp_path / "again"), "--shapes-scale", "0.04", "--base-epochs", "1", "--num-workers", "0",
          "--batch-size", "16", "--no-compare", "--recipe", "dense"])
    assert "cached at" in capsys.readouterr().out


def test_reproduction_table_mean_and_std():
    per_seed = {0: {"dmu": {"a": 0.5}, "dense": {"a": 0.25}}, 1: {"dmu": {"a": 0.7}, "dense": {"a": 0.25}}}
    table = summarize(per_seed)
    assert "| metric | dmu | dense |" in table
    assert "| a | 60.0 ± 14.1 | 25.0 ± 0.0 |" in table
