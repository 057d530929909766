"""Evaluate a CLIP or CLIP-MoE as an encoder: `clipmoe eval-encoder` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("eval-encoder"))
