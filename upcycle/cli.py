"""``python scripts/upcycle_encoder.py``: turn a dense CLIP into a CLIP-MoE folder.

This first version performs sparse upcycling (experts = copies of the dense FFN, new routers) and writes a
transformers folder with a model card; the training recipes (dmu, clip-up, dense) build on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .convert import sparse_upcycle
from .sources import BASE_SPECS, load_base


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle_encoder.py",
        description="Turn a dense CLIP into a sparse Mixture-of-Experts CLIP (CLIP-MoE) folder that "
                    "transformers loads with AutoModel after `import clipmoe_vlm`.",
    )
    parser.add_argument("--base", default="tiny-random",
                        help="the dense CLIP to start from: " + "; ".join(BASE_SPECS) + " (default: tiny-random)")
    parser.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default: 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts each token is routed to (default: 2)")
    parser.add_argument("--moe-layers", default="all",
                        help="which layers become MoE in both towers: all, every-2, last-N, or indices like 0,2,4 "
                             "(default: all, as CLIP-MoE)")
    parser.add_argument("--seed", type=int, default=0, help="seed for new router weights and random bases")
    parser.add_argument("--output", default="runs/clip-moe", help="output folder (default: runs/clip-moe)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if not 1 <= args.top_k <= args.num_experts:
        raise SystemExit(f"error: --top-k {args.top_k} must be between 1 and --num-experts {args.num_experts}")
    dense = load_base(args.base, seed=args.seed)
    info = {"source": args.base, "recipe": "sparse-upcycle", "seed": args.seed}
    moe = sparse_upcycle(dense, num_experts=args.num_experts, top_k=args.top_k, moe_layers=args.moe_layers,
                         upcycling_info=info)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out)
    (out / "run_config.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
    n_params = sum(p.numel() for p in moe.parameters())
    (out / "README.md").write_text(
        f"# CLIP-MoE ({args.num_experts} experts, top-{args.top_k})\n\n"
        f"Sparse-upcycled from `{args.base}`: every expert is a copy of the dense FFN, routers are new and "
        f"untrained, so the model computes the dense function until it is trained.\n\n"
        f"- MoE layers: {args.moe_layers}\n- parameters: {n_params:,}\n\n"
        "Load with:\n\n```python\nimport clipmoe_vlm\nfrom transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(out)!r})\n```\n"
    )
    print(f"wrote {out} ({n_params:,} parameters)", file=sys.stderr)
    return out
