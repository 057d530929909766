"""Merge a LoRA run (adapter + non-LoRA trainables) into a full LLaVA folder.

    python scripts/merge_lora.py runs/llava-lora runs/llava-lora-merged [--base runs/llava-pretrain]
"""

from clipmoe_vlm.llava.lora import main

if __name__ == "__main__":
    main()
