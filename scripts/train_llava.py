"""Train LLaVA-1.5 (stage 1 or 2) with a CLIP-MoE tower: `clipmoe train-llava` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("train-llava"))
