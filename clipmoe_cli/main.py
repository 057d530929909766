"""``clipmoe <command> [flags]``: one way in to every job of the toolkit.

Each command is a ``main(argv)`` function elsewhere, imported only when it runs (so ``clipmoe --help`` is
instant); the scripts in ``scripts/`` call the same functions. ``clipmoe <command> --help`` explains every flag.

Errors: a bad input (a value, setting or path: `USER_ERRORS`, or a command's own ``SystemExit("message")``) prints
one ``error: <message>`` line to stderr and exits 2, as argparse's usage errors do. ``--traceback`` (anywhere
before a ``--``) or ``CLIPMOE_TRACEBACK=1`` adds the traceback. Any other exception is a bug or an environment
failure and keeps Python's traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence

__all__ = ["COMMANDS", "TRACEBACK_ENV", "TRACEBACK_FLAG", "USER_ERRORS", "end_process_group", "main", "run_command"]

# What the toolkit raises for input it cannot use (run_config.ConfigError is a ValueError; json's decode errors
# are ValueErrors too). Left out on purpose: KeyError (what a buggy dict lookup raises, and its message is a bare
# repr), a generic OSError (disk or device failures), RuntimeError / TypeError / AssertionError (bugs).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "CLIPMOE_TRACEBACK"
EXIT_USER_ERROR = 2  # argparse's status for usage errors

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
    lines = ["usage: clipmoe [--traceback] <command> [flags]   (clipmoe <command> --help explains the flags)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", (f"A bad input prints one 'error: ...' line (exit status {EXIT_USER_ERROR}); {TRACEBACK_FLAG} or "
                   f"{TRACEBACK_ENV}=1 also prints the traceback.")]
    return "\n".join(lines)


def _pop_traceback_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """Removes ``--traceback`` wherever it is before a ``--`` (the scripts pass their own arguments through, so it
    may follow the command); what follows ``--`` belongs to another program."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [arg for arg in argv[:end] if arg != TRACEBACK_FLAG]
    return len(kept) != end, kept + argv[end:]


def _traceback_wanted(flag: bool) -> bool:
    return flag or os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _report(error: BaseException, message: str, show_traceback: bool) -> int:
    if show_traceback:
        traceback.print_exception(error)
    # commands that already say "error: " (upcycle, infer) must not read "error: error: "
    message = message.removeprefix("error: ").strip() or type(error).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def resolve(command: str):
    """The ``main(argv)`` function of ``command``."""
    target, _ = COMMANDS[command]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    flag, argv = _pop_traceback_flag(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clipmoe: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"clipmoe {command}", *rest]  # argparse names the command in its usage line
    try:
        result = resolve(command)(rest)
        end_process_group()
    except USER_ERRORS as error:
        return _report(error, str(error), _traceback_wanted(flag))
    except SystemExit as stop:
        # SystemExit("message") is a command's own one-line error; an int (argparse, --help, a status) passes
        if stop.code is None or isinstance(stop.code, int):
            raise
        return _report(stop, str(stop.code), _traceback_wanted(flag))
    return result if isinstance(result, int) else 0


def end_process_group() -> None:
    """Under ``accelerate launch`` / ``torchrun``: leaves the process group once the command is done (torch asks for
    it; a group left to interpreter shutdown has aborted a gloo process after its work was saved)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_command(command: str, argv: Sequence[str] | None = None) -> int:
    """``clipmoe <command> ARGV`` (ARGV: the process's own arguments by default); what the scripts call."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
