"""Merge a LoRA adapter folder into a full LLaVA folder: `clipmoe merge-lora` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("merge-lora"))
