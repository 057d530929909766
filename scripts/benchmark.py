"""Side-by-side benchmarks of CLIP-MoE against its dense counterparts (every figure a ratio measured in one run).

    python scripts/benchmark.py --quick --json runs/bench-quick.json      # about a minute
    python scripts/benchmark.py --json runs/bench.json                    # the full sizes (docs/performance.md)
    python scripts/benchmark.py --items moe_layer tower --dtypes fp32     # a subset
    python scripts/benchmark.py --help                                    # every flag

Items: moe_layer (sparse block vs FLOP-equal dense MLP and the naive per-expert loop), tower (CLIP-MoE vs CLIP
vision tower vs the FLOP-ideal ratio), train (router / MCL step FLOP/s over the peak matmul FLOP/s), generate
(LLaVA tokens/s, CLIP-MoE vs dense tower), data (DataLoader samples/s vs training-step samples/s). The library
behind it is `clipmoe_vlm.benchmark`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser() -> argparse.ArgumentParser:
    from clipmoe_vlm.benchmark import ITEMS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", nargs="+", choices=ITEMS, default=list(ITEMS),
                        help="which benchmarks to run (default: all, in this order)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (about a minute); the default runs the ViT-B/16 and "
                             "ViT-L/14-336 sizes")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="precisions of the moe_layer and tower items (bf16 = torch.autocast on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per item (default: the plan's, 3 to 7); the median round is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's choice)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one sparse-block forward per size/dtype (torch.profiler) and record "
                             "the ops that cost the time")
    parser.add_argument("--json", metavar="OUT", default=None, help="write every measurement to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for inputs and random weights")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from clipmoe_vlm.benchmark import run_benchmarks

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_benchmarks(items=args.items, quick=args.quick, dtypes=args.dtypes, json_out=args.json,
                          repeats=args.repeats, profile=args.profile)


if __name__ == "__main__":
    main()
