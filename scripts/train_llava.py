"""Train LLaVA-1.5 with a CLIP-MoE (or dense CLIP) vision tower.

    python scripts/train_llava.py --stage pretrain                       # tiny CPU default (Shapes world)
    python scripts/train_llava.py --stage finetune                       # from runs/llava-pretrain
    python scripts/train_llava.py --stage finetune --lora [--bits 4]     # LoRA / QLoRA
    python scripts/train_llava.py --config configs/llava/finetune.yaml   # YAML, flags override
    python scripts/train_llava.py --help                                 # every option
"""

from clipmoe_vlm.llava.train import main

if __name__ == "__main__":
    main()
