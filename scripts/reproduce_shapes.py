"""Run the Shapes comparison (dense base, dense, clip-up, dmu) over several seeds into docs/results.md.

    python scripts/reproduce_shapes.py --seeds 0 1 2
"""

from upcycle.reproduce import main

if __name__ == "__main__":
    main()
