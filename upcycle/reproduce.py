"""Micro-reproduction: the embedded comparison (dense base, dense, clip-up, dmu) over several seeds.

``python scripts/reproduce_shapes.py --seeds 0 1 2`` runs ``scripts/upcycle_encoder.py`` with no data (the Shapes
world) once per seed, each seed with its own world, base and training seed, collects every run's
``comparison.json`` and writes markdown tables: mean ± standard error over seeds per metric and model, and the
paired per-seed differences of dmu against each baseline, with the command and the machine.
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


def _mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) / len(values) ** 0.5:.1f}"


def _metrics(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    metrics: list[str] = []
    for rows in per_seed.values():
        for m in rows.values():
            metrics += [k for k, v in m.items() if isinstance(v, (int, float)) and not k.endswith("/se")
                        and k not in metrics]
    return metrics


def summarize(per_seed: dict[int, dict[str, dict]]) -> str:
    """Markdown table: metric rows, model columns, mean ± standard error over seeds (percent)."""
    models = list(next(iter(per_seed.values())))
    lines = ["| metric | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for metric in _metrics(per_seed):
        cells = []
        for model in models:
            values = [100 * rows[model][metric] for rows in per_seed.values() if metric in rows.get(model, {})]
            cells.append(_mean_se(values) if values else "-")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences(per_seed: dict[int, dict[str, dict]], model: str = "dmu",
                against: tuple[str, ...] = ("dense", "clip-up", "dense base")) -> str:
    """Paired differences ``model`` minus each other model, per seed, as mean ± standard error over seeds.

    A difference is counted as a win (or loss) when its mean is more than two standard errors from zero.
    """
    others = [o for o in against if all(o in rows for rows in per_seed.values())]
    lines = ["| metric | " + " | ".join(f"{model} − {o}" for o in others) + " |", "| --- |" + " --- |" * len(others)]
    for metric in _metrics(per_seed):
        cells = []
        for other in others:
            diffs = [100 * (rows[model][metric] - rows[other][metric]) for rows in per_seed.values()
                     if metric in rows[model] and metric in rows[other]]
            if len(diffs) < 2:
                cells.append(_mean_se(diffs) if diffs else "-")
                continue
            mean, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
            mark = " (win)" if mean > 2 * se else " (loss)" if mean < -2 * se else ""
            cells.append(f"{mean:+.1f} ± {se:.1f}{mark}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    from .cli import main as upcycle_main

    args = build_parser().parse_args(argv)
    per_seed, sweeps, started = {}, {}, time.time()
    for seed in args.seeds:
        out = Path(args.output) / f"seed{seed}" / "clip-moe"
        upcycle_main(["--seed", str(seed), "--output", str(out), *args.extra])
        comparison = json.loads((out / "comparison.json").read_text())
        per_seed[seed] = comparison["metrics"]
        sweeps[seed] = {"lr_sweep": comparison.get("lr_sweep"), "chosen_factor": comparison.get("chosen_factor")}
    minutes = (time.time() - started) / 60
    command = "python scripts/reproduce_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"## Shapes micro-reproduction ({len(args.seeds)} seeds)\n\n"
            f"Command: `{command.strip()}` ({minutes:.0f} minutes in all)\n\nMachine: {machine()}\n\n"
            "Mean ± standard error over seeds, in percent. Columns: the tiny dense base trained from scratch, the "
            "dense recipe (continued training, same number of steps), clip-up (sparse upcycling) and dmu "
            "(CLIP-MoE).\n\n" + summarize(per_seed)
            + "\nPaired differences per seed (percentage points, mean ± standard error over seeds; win / loss: more "
              "than two standard errors from zero):\n\n" + differences(per_seed)
            + "\nLearning-rate factor chosen per recipe on the held-out validation pairs, per seed: "
            + "; ".join(f"seed {seed}: {s['chosen_factor']}" for seed, s in sweeps.items()) + "\n")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "results.json").write_text(json.dumps({"metrics": per_seed, "sweeps": sweeps}, indent=1))
    marker = "<!-- shapes-reproduction -->"
    old = results.read_text() if results.is_file() else "# Results\n"
    head = old.split(marker)[0].rstrip() + "\n\n"
    results.write_text(head + marker + "\n" + text)
    print(text)
    return results
