"""Issue #13 follow-up: the recipe comparison with the recipes trained on pairs the base never saw.

The default run upcycles on the same 2,000 pairs the base was trained on (which it fits: training loss 0.02).
CLIP-MoE itself upcycles OpenAI CLIP on new data (ShareGPT4V, Recap-DataComp). This script keeps everything of
the default comparison (world, cached base, preset, steps, learning-rate sweep, evaluation sets) and changes one
thing: the recipes train on the world's other 2,000 pairs (pairs 2,001-4,000 of ``clip_train``), 200 of which
are held out for the sweep's choice.

    python docs/experiments/fresh_pairs.py --seeds 0 1 2 --output runs/fresh-pairs

It uses the default run's worlds and bases (cached; built first if missing).
Each seed gets a view of its world (``{output}/worlds/shapes-seed{S}``: the evaluation sets linked, the fresh
pairs as a JSONL with absolute image paths), so the evaluation reads the world's own sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def world_view(world: Path, view: Path, first: int, count: int) -> Path:
    """A folder that looks like ``world`` to the evaluation, whose training JSONL holds ``count`` pairs from the
    ``first``-th (0-based) of the world's training pairs."""
    view.mkdir(parents=True, exist_ok=True)
    for name in ("encoder_eval", "eval", "manifest.json"):
        link = view / name
        if not link.exists():
            link.symlink_to((world / name).resolve())
    source = world / "clip_train" / "captions.jsonl"
    lines = source.read_text().splitlines()[first:first + count]
    if len(lines) < count:
        raise SystemExit(f"{source}: has {first + len(lines)} pairs, need {first + count}")
    records = []
    for line in lines:
        record = json.loads(line)
        record["image"] = str((source.parent / record["image"]).resolve())
        records.append(json.dumps(record))
    target = view / "clip_fresh" / "captions.jsonl"
    target.parent.mkdir(exist_ok=True)
    target.write_text("\n".join(records) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    from upcycle.cli import main as upcycle_main
    from upcycle.cli import parse_config
    from upcycle.default_run import resolve_defaults
    from upcycle.reproduce import differences, machine, summarize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output", default="runs/fresh-pairs")
    p.add_argument("--lr-sweep", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    args = p.parse_args(argv)
    out = Path(args.output)
    accelerator = Accelerator(cpu=True)
    per_seed, chosen, started = {}, {}, time.time()
    for seed in args.seeds:
        default = resolve_defaults(parse_config(["--seed", str(seed)]), accelerator)  # the default run's world
        base = Path(default.base)                                                        # and base (cached)
        data = world_view(Path(default.data[0]).parents[1], out / "worlds" / f"shapes-seed{seed}", 2000, 2000)
        run = out / f"seed{seed}" / "clip-moe"
        upcycle_main(["--config", "upcycle/presets/shapes.yaml", "--data", str(data), "--base", str(base),
                      "--compare", "--seed", str(seed), "--output", str(run),
                      "--lr-sweep", *[f"{f:g}" for f in args.lr_sweep]])
        comparison = json.loads((run / "comparison.json").read_text())
        per_seed[seed], chosen[seed] = comparison["metrics"], comparison["chosen_factor"]
    text = (f"Command: `python docs/experiments/fresh_pairs.py {' '.join(argv or sys.argv[1:])}` "
            f"({(time.time() - started) / 60:.0f} minutes)\n\nMachine: {machine()}\n\n" + summarize(per_seed)
            + "\nPaired differences (points, mean ± s.e. over seeds):\n\n" + differences(per_seed)
            + "\nChosen learning-rate factors: " + "; ".join(f"seed {s}: {c}" for s, c in chosen.items()) + "\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"metrics": per_seed, "chosen_factor": chosen}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
