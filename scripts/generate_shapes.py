"""Write the Shapes world: `clipmoe generate-shapes` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("generate-shapes"))
