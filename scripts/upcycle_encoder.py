"""Turn a dense CLIP into a CLIP-MoE.

    python scripts/upcycle_encoder.py                      # tiny random base, runs anywhere
    python scripts/upcycle_encoder.py --base path/to/clip --num-experts 4 --top-k 2 --output runs/clip-moe
    python scripts/upcycle_encoder.py --help               # every flag
"""

from upcycle.cli import main

if __name__ == "__main__":
    main()
