"""Turn a dense CLIP into a CLIP-MoE (no flags: the embedded Shapes comparison): `clipmoe upcycle` (flags: --help)."""

from clipmoe_cli.main import run_command

if __name__ == "__main__":
    raise SystemExit(run_command("upcycle"))
