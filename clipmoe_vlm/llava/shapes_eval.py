"""Per-question-type accuracy of a LLaVA folder on held-out Shapes questions.

The questions come from scenes drawn with their own split name (``"llava_heldout"``), so none of them is in
``llava/instruct.json``; each is asked in the short-answer style the instruction data uses
(``"{question}\\nAnswer the question using a single word or phrase."``) and answered greedily. An answer is
correct when, lower-cased and stripped of a final period, it equals one of the question's accepted answers.

    python -m clipmoe_vlm.llava.shapes_eval --model runs/llava-finetune --n 400
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..data.shapes import QA_KINDS, SHORT_ANSWER_PROMPT, item_rng, make_qa, render_scene, sample_scene

__all__ = ["heldout_questions", "main", "score"]


def heldout_questions(n: int, *, seed: int = 0, image_size: int = 64) -> list[dict[str, Any]]:
    """``n`` held-out questions, cycling through the question kinds: ``{"kind", "image", "question", "answers"}``."""
    rows = []
    for index in range(n):
        rng = item_rng(seed, "llava_heldout", index)
        scene = sample_scene(rng)
        kinds = [k for k in QA_KINDS if k != "relation" or scene.count >= 2]
        kind = kinds[index % len(kinds)]
        qa = make_qa(scene, kind, rng)
        rows.append({"kind": qa.kind, "image": render_scene(scene, image_size),
                     "question": f"{qa.question}\n{SHORT_ANSWER_PROMPT}", "answers": list(qa.alternatives)})
    return rows


def _normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def score(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for answer, row in zip(answers, rows):
        total[row["kind"]] += 1
        correct[row["kind"]] += _normalise(answer) in {_normalise(a) for a in row["answers"]}
    per_kind = {kind: round(correct[kind] / total[kind], 4) for kind in sorted(total)}
    overall = round(sum(correct.values()) / max(1, sum(total.values())), 4)
    return {"overall": overall, "per_kind": per_kind, "counts": dict(sorted(total.items()))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import clipmoe_vlm  # noqa: F401

    from .builder import load_llava
    from .inference import answer_questions

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="runs/llava-finetune")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    torch.set_grad_enabled(False)
    model, processor = load_llava(args.model)
    model.eval()
    size = model.config.vision_config.image_size
    rows = heldout_questions(args.n, seed=args.seed, image_size=size)
    answers: list[str] = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        answers += answer_questions(model, processor, [r["question"] for r in chunk], [r["image"] for r in chunk],
                                    max_new_tokens=8)
    result = {"model": str(args.model), "n": args.n, **score(answers, rows),
              "examples": [{"kind": r["kind"], "question": r["question"].split("\n")[0], "answer": a,
                            "expected": r["answers"][0]} for r, a in list(zip(rows, answers))[:8]]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
