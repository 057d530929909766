"""Evaluate a LLaVA folder with lmms-eval: `clipmoe eval` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("eval"))
