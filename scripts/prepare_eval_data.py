"""Write the parquet files of the local lmms-eval tasks: `clipmoe prepare-eval` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("prepare-eval"))
