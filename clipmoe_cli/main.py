"""``clipmoe <command> [flags]``: one way in to every job of the toolkit.

Each command is a ``main(argv)`` function elsewhere, imported only when it runs (so ``clipmoe --help`` is
instant); the scripts in ``scripts/`` call the same functions. ``clipmoe <command> --help`` explains every flag.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main", "run_command"]

# command -> (module:function, one line for `clipmoe --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "upcycle": ("upcycle.cli:main", "turn a dense CLIP into a CLIP-MoE (recipes dmu, clip-up, dense); no flags: "
                                    "the embedded Shapes comparison"),
    "reproduce": ("upcycle.reproduce:main", "the Shapes comparison over several seeds, with standard errors"),
    "eval-encoder": ("clipmoe_cli.eval_encoder:main", "retrieval, zero-shot and MMVP-style metrics of a CLIP or "
                                                      "CLIP-MoE"),
    "analyze-routing": ("clipmoe_cli.analyze_routing:main", "expert usage of a CLIP-MoE per layer, attribute and "
                                                            "image, with plots"),
    "generate-shapes": ("clipmoe_cli.generate_shapes:main", "write the Shapes world (pairs, LLaVA data, benchmark "
                                                            "sets)"),
    "train-llava": ("clipmoe_cli.llava:train", "LLaVA-1.5 stage 1 (projector) or 2 (LM: full, LoRA, QLoRA) with a "
                                               "CLIP-MoE tower"),
    "infer": ("clipmoe_vlm.llava.inference:main", "answer questions about images with a LLaVA folder"),
    "merge-lora": ("clipmoe_vlm.llava.lora:main", "merge a LoRA adapter folder into a full LLaVA folder"),
    "prepare-eval": ("clipmoe_vlm.lmms.prepare:main", "write the parquet files of the local MMBench / MM-Vet / "
                                                      "VizWiz tasks"),
    "eval": ("clipmoe_vlm.lmms.runner:main", "evaluate a LLaVA folder with lmms-eval (exits non-zero on a failed "
                                             "task)"),
    "eval-llava-shapes": ("clipmoe_vlm.llava.shapes_eval:main", "a LLaVA folder on held-out Shapes questions, per "
                                                                "question kind"),
    "benchmark": ("clipmoe_cli.benchmarks:main", "side-by-side speed benchmarks (MoE layer, tower, training, "
                                                 "generation, data)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clipmoe <command> [flags]   (clipmoe <command> --help explains the flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(command: str):
    """The ``main(argv)`` function of ``command``."""
    target, _ = COMMANDS[command]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clipmoe: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"clipmoe {command}", *rest]  # argparse names the command in its usage line
    result = resolve(command)(rest)
    return result if isinstance(result, int) else 0


def run_command(command: str, argv: Sequence[str] | None = None) -> int:
    """``clipmoe <command> ARGV`` (ARGV: the process's own arguments by default); what the scripts call."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
