"""Answer questions about images with a LLaVA folder: `clipmoe infer` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("infer"))
