"""Micro-reproduction: the embedded comparison (dense base, dense, clip-up, dmu) over several seeds.

``python scripts/reproduce_shapes.py --seeds 0 1 2`` runs ``scripts/upcycle_encoder.py`` with no data (the Shapes
world) once per seed, each seed with its own world, base and training seed, collects every run's
``comparison.json`` and writes a markdown table of mean ± std per metric, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main", "summarize"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full comparison per seed")
    p.add_argument("--output", default="runs/reproduce", help="folder for the per-seed runs")
    p.add_argument("--results", default="docs/results.md", help="markdown file the table is written to")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further flags passed to upcycle_encoder.py for every seed (after --extra)")
    return p


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}")


def summarize(per_seed: dict[int, dict[str, dict]]) -> str:
    """Markdown table: metric rows, model columns, mean ± std over seeds (percent)."""
    models = list(next(iter(per_seed.values())))
    metrics = []
    for rows in per_seed.values():
        for m in rows.values():
            metrics += [k for k, v in m.items() if isinstance(v, (int, float)) and k not in metrics]
    lines = ["| metric | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for metric in metrics:
        cells = []
        for model in models:
            values = [100 * rows[model][metric] for rows in per_seed.values() if metric in rows.get(model, {})]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    from .cli import main as upcycle_main

    args = build_parser().parse_args(argv)
    per_seed, started = {}, time.time()
    for seed in args.seeds:
        out = Path(args.output) / f"seed{seed}" / "clip-moe"
        upcycle_main(["--seed", str(seed), "--output", str(out), *args.extra])
        per_seed[seed] = json.loads((out / "comparison.json").read_text())["metrics"]
    minutes = (time.time() - started) / 60
    command = "python scripts/reproduce_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"## Shapes micro-reproduction ({len(args.seeds)} seeds)\n\n"
            f"Command: `{command.strip()}` ({minutes:.0f} minutes in all)\n\nMachine: {machine()}\n\n"
            "Mean ± std over seeds, in percent. Columns: the tiny dense base trained from scratch, the dense recipe "
            "(continued training, same number of steps), clip-up (sparse upcycling) and dmu (CLIP-MoE).\n\n"
            + summarize(per_seed))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "results.json").write_text(json.dumps(per_seed, indent=1))
    marker = "<!-- shapes-reproduction -->"
    old = results.read_text() if results.is_file() else "# Results\n"
    head = old.split(marker)[0].rstrip() + "\n\n"
    results.write_text(head + marker + "\n" + text)
    print(text)
    return results
