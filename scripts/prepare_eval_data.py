#!/usr/bin/env python
"""Write eval/data/{mmbench_en_dev,mmvet,vizwiz_vqa_val}.parquet for the offline lmms-eval tasks.

    python scripts/prepare_eval_data.py shapes                       # all three from the Shapes world
    python scripts/prepare_eval_data.py mmbench --tsv MMBench_DEV_EN.tsv
    python scripts/prepare_eval_data.py mmvet --folder mm-vet/      # mm-vet.json + images/
    python scripts/prepare_eval_data.py vizwiz --json val.json --images val/
    python scripts/prepare_eval_data.py check                        # columns of the files in --out_dir
"""

from __future__ import annotations

import sys

from clipmoe_vlm.lmms.prepare import main

if __name__ == "__main__":
    sys.exit(main())
