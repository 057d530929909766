"""Expert usage of a CLIP-MoE, with plots: `clipmoe analyze-routing` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("analyze-routing"))
