"""Issue #13: does training the embedded base longer still pay? The 80-epoch base against a 120-epoch one.

The plateau criterion printed with the base compares two probes of 200 held-out pairs (one s.e. of their
difference is about 3 points). This check asks the criterion's question with the evaluation sets, whose
standard errors are 0.5-2.5 points: the same world, seed, data, batch and peak rate, trained 1.5x longer
(its own cosine schedule), evaluated on the world's held-out encoder sets next to the cached 80-epoch base.

    python docs/experiments/base_longer.py --seeds 0 1 --epochs 120 --output runs/base-longer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from accelerate import Accelerator
    from transformers import AutoModel

    from upcycle.cli import parse_config
    from upcycle.default_run import comparison_table, evaluate_on_world, resolve_defaults

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=120, help="the longer base's epochs (the preset's: 80)")
    p.add_argument("--output", default="runs/base-longer")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    results = {}
    for seed in args.seeds:
        rows = {}
        for epochs in (None, args.epochs):  # None: the preset's base (cached by the default run)
            flags = ["--seed", str(seed)] + ([] if epochs is None else ["--base-epochs", str(epochs)])
            started = time.time()
            cfg = resolve_defaults(parse_config(flags), accelerator)
            world = Path(cfg.data[0]).parents[1]
            label = f"e{cfg.shapes.base_epochs}"
            rows[label] = evaluate_on_world(AutoModel.from_pretrained(cfg.base).eval(), world)
            rows[label]["minutes"] = round((time.time() - started) / 60, 1)
            convergence = json.loads((Path(cfg.base) / "convergence.json").read_text())
            rows[label]["last_quarter_gain_points"] = convergence["plateau"].get("last_quarter_gain_points")
        results[seed] = rows
        (out / "results.json").write_text(json.dumps(results, indent=1))
        extra = ("minutes", "last_quarter_gain_points")
        print(f"\nseed {seed}: " + "; ".join(f"{k}: {r['minutes']} min, probe gain over the last quarter "
                                             f"{r['last_quarter_gain_points']}" for k, r in rows.items()))
        print(comparison_table({k: {m: v for m, v in r.items() if m not in extra} for k, r in rows.items()}))


if __name__ == "__main__":
    main()
