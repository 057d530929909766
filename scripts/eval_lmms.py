#!/usr/bin/env python
"""Evaluate a LLaVA model folder on MMBench-EN dev, MM-Vet and VizWiz-VQA val through lmms-eval.

    python scripts/eval_lmms.py runs/llava-clipmoe [--batch_size 8 --dtype bfloat16 --num_processes 4] [-- LMMS_ARGS]

Exits 1 if any task failed or wrote no results. See docs/evaluation.md and `--help`.
"""

from __future__ import annotations

import sys

from clipmoe_vlm.lmms.runner import main

if __name__ == "__main__":
    sys.exit(main())
