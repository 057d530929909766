"""The default LLaVA (`bash scripts/finetune_llava.sh`, no arguments) scores above chance through lmms-eval.

Slow (4 min 8 s measured on 2 cores with ``runs/clip-moe`` present; the default upcycling run first when it is not):
``python -m pytest -m slow tests/test_default_llava_scores.py``. It trains both stages into a temporary folder,
exactly as the script's CPU default does (same world, same tower, same flags), and scores the result on the
Shapes MMBench and VizWiz sets with `scripts/eval_lmms.py`'s `main`. Measured: MMBench 46.7 (chance 32.5), VizWiz 0.603
(docs/results.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_finetune_scores_above_chance_on_shapes_mmbench_and_vizwiz(tmp_path, monkeypatch):
    from clipmoe_vlm.defaults import ensure_world
    from clipmoe_vlm.lmms.runner import main as eval_main

    cache = Path(os.environ.get("CLIPMOE_CACHE", REPO / ".cache" / "clipmoe-vlm"))
    env = dict(os.environ, CLIPMOE_CACHE=str(cache))
    # stage 1 runs first into --model (missing), as the no-argument script does into runs/llava-pretrain
    subprocess.run(["bash", str(REPO / "scripts" / "finetune_llava.sh"), "--model", str(tmp_path / "pretrain"),
                    "--output-dir", str(tmp_path / "finetune")], cwd=REPO, env=env, check=True, timeout=3600)
    model = tmp_path / "finetune"
    assert (model / "config.json").is_file() and (model / "README.md").is_file()

    monkeypatch.setenv("CLIPMOE_CACHE", str(cache))
    data = Path(ensure_world(0)) / "eval" / "data"
    code = eval_main([str(model), "--tasks", "mmbench_en_dev_local,vizwiz_vqa_val_local", "--data_dir", str(data),
                      "--batch_size", "16", "--device", "cpu", "--output_path", str(tmp_path / "eval")])
    assert code == 0
    scores = {task: entry["value"] for task, entry in
              json.loads((tmp_path / "eval" / "summary.json").read_text())["tasks"].items()}

    rows = pd.read_parquet(data / "mmbench_en_dev.parquet")
    chance = 100 * (1 / rows[list("ABCD")].notna().sum(axis=1)).mean()
    standard_error = 100 * (0.25 / len(rows)) ** 0.5  # the largest binomial error at n rows
    assert scores["mmbench_en_dev_local"] > chance + 2 * standard_error, (scores, chance)
    vizwiz = pd.read_parquet(data / "vizwiz_vqa_val.parquet")
    always_unanswerable = float((vizwiz["category"] == "unanswerable").mean())
    assert scores["vizwiz_vqa_val_local"] > 2 * always_unanswerable, (scores, always_unanswerable)
