"""Answer questions about images with a LLaVA folder (greedy, LLaVA-1.5's vicuna_v1 prompt).

    python scripts/llava_infer.py --model runs/llava-finetune --image img.png --question "What color is the circle?"
    python scripts/llava_infer.py --model runs/llava-finetune --questions q.jsonl --image-folder imgs --answers-file a.jsonl
"""

from clipmoe_vlm.llava.inference import main

if __name__ == "__main__":
    main()
