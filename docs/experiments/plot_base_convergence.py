"""Plot the held-out retrieval curves of tiny Shapes bases (their ``convergence.json``) into one PNG.

    python docs/experiments/plot_base_convergence.py OUT.png BASE_DIR [BASE_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def main(argv: list[str]) -> None:
    out, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    figure = Figure(figsize=(6, 3.6))
    axes = figure.subplots()
    for folder in folders:
        record = json.loads((folder / "convergence.json").read_text())
        epochs = [c["epoch"] for c in record["curve"]]
        mean = [(c["i2t_R@1"] + c["t2i_R@1"]) * 50 for c in record["curve"]]
        gain = record["plateau"].get("last_quarter_gain_points")
        axes.plot(epochs, mean, marker="o", label=f"{folder.name}: {record['steps']} steps of batch "
                                                  f"{record['batch_size']} (last quarter {gain:+.1f} pts)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("held-out R@1, mean of I→T and T→I (%)")
    axes.set_title("Tiny Shapes base: held-out retrieval along training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
