"""Answer questions about images with a trained LLaVA folder (``scripts/llava_infer.py``).

The prompt is LLaVA-1.5's (``vicuna_v1`` template): ``"{system} USER: <image>\\n{question} ASSISTANT:"``; the
processor expands ``<image>`` to the model's ``image_seq_length`` tokens. Decoding is greedy by default, and only
the new tokens are decoded (``skip_special_tokens``, stripped), as LLaVA's ``model_vqa_loader`` does.

Batch mode reads a JSONL of questions, one object a line: ``{"question_id": ..., "image": "relative/path.png",
"text": "question"}`` (``question`` is accepted for ``text``; ``image`` may be absent for a text-only question) and
writes ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`` lines (LLaVA's answer format).
A question whose image is missing or unreadable does not stop the others: they are answered and written, and
then the run fails naming the unanswered ones (`UnansweredQuestions`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.conversation import DEFAULT_IMAGE_TOKEN, Turn, get_template

__all__ = ["UnansweredQuestions", "answer_questions", "build_prompt", "main", "run_batch"]


def build_prompt(question: str, *, with_image: bool = True, template: str = "vicuna_v1") -> str:
    """LLaVA-1.5's generation prompt (no BOS; the processor adds it)."""
    text = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if with_image else question
    return get_template(template).generation_prompt([Turn("human", text)])


@torch.no_grad()
def answer_questions(model, processor, questions: Sequence[str], images: Sequence[Image.Image | None], *,
                     template: str = "vicuna_v1", max_new_tokens: int = 128, temperature: float = 0.0,
                     num_beams: int = 1) -> list[str]:
    """Answer a batch of questions (``images[i]`` may be None for a text-only question; a batch is either all
    image questions or all text-only ones)."""
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    with_image = [image is not None for image in images]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch must not mix questions with and without images")
    prompts = [build_prompt(q, with_image=w, template=template) for q, w in zip(questions, with_image)]
    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if all(with_image):
            inputs = processor(images=[image.convert("RGB") for image in images], text=prompts, padding=True,
                               return_tensors="pt")
        else:
            inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous_side
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampling = temperature > 0
    generated = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=num_beams,
        temperature=temperature if sampling else None, top_p=None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _read_questions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"--questions {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON: {error}") from error
            text = row.get("text", row.get("question"))
            if not isinstance(text, str):
                raise ValueError(f"{path}: line {number} has no 'text' (or 'question') string")  # noqa: TRY004
            row["text"] = text
            row.setdefault("question_id", number - 1)
            rows.append(row)
    return rows


class UnansweredQuestions(ValueError):
    """Some questions of a batch could not be answered (missing or unreadable image); the others were answered
    and written. ``answers``: what was written; ``failures``: ``(question_id, reason)`` per unanswered question.
    A ``ValueError``, so ``clipmoe infer`` reports it as one ``error:`` line and exits non-zero."""

    def __init__(self, answers: list[dict[str, Any]], failures: list[tuple[Any, str]], total: int,
                 answers_file: Path) -> None:
        shown = "; ".join(f"question {qid}: {reason}" for qid, reason in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        ids = ", ".join(str(qid) for qid, _ in failures[:20]) + (", ..." if len(failures) > 20 else "")
        super().__init__(f"{len(failures)} of {total} questions not answered (question_id {ids}): {shown}{more}; "
                         f"the {len(answers)} answers are in {answers_file}")
        self.answers, self.failures = answers, failures


def _open_image(path: Path) -> Image.Image:
    """The RGB image at ``path``; a missing, unreadable or truncated file is a ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"image {path} not found")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # decodes now, so a truncated file fails here and not in the batch
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"image {path} cannot be read: {error}") from error


def run_batch(model, processor, questions_file: str | os.PathLike[str], answers_file: str | os.PathLike[str], *,
              image_folder: str | os.PathLike[str] | None = None, batch_size: int = 8, model_id: str = "llava",
              **generate_kwargs) -> list[dict[str, Any]]:
    """Answer every question of a JSONL file and write the answers as JSONL (see the module docstring).

    A question whose image is missing or unreadable is left out; the others are still answered and written
    (in the questions' order), then `UnansweredQuestions` names the ones left out."""
    rows = _read_questions(Path(questions_file))
    image_root = Path(image_folder) if image_folder is not None else Path(questions_file).parent
    groups = {True: [r for r in rows if r.get("image")], False: [r for r in rows if not r.get("image")]}
    by_id: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    for has_image, group in groups.items():
        for start in range(0, len(group), batch_size):
            chunk, images = [], []
            for row in group[start:start + batch_size]:
                if has_image:
                    try:
                        images.append(_open_image(image_root / row["image"]))
                    except ValueError as error:
                        failures[id(row)] = str(error)
                        continue
                else:
                    images.append(None)
                chunk.append(row)
            if not chunk:
                continue
            texts = answer_questions(model, processor, [r["text"] for r in chunk], images, **generate_kwargs)
            for row, text in zip(chunk, texts):
                by_id[id(row)] = {"question_id": row["question_id"], "prompt": row["text"], "text": text,
                                  "answer_id": f"{row['question_id']}", "model_id": model_id, "metadata": {}}
    answers = [by_id[id(row)] for row in rows if id(row) in by_id]
    answers_path = Path(answers_file)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    with answers_path.open("w", encoding="utf-8") as handle:
        for answer in answers:
            handle.write(json.dumps(answer) + "\n")
    if failures:
        raise UnansweredQuestions(answers, [(row["question_id"], failures[id(row)]) for row in rows
                                            if id(row) in failures], len(rows), answers_path)
    return answers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer questions about images with a "
                                     "LLaVA folder (full, or a LoRA adapter folder).")
    parser.add_argument("--model", default="runs/llava-finetune", help="LLaVA folder (or LoRA adapter folder)")
    parser.add_argument("--base", help="base LLaVA folder of a LoRA adapter (default: the one it records)")
    parser.add_argument("--image", help="one image file")
    parser.add_argument("--question", help="one question (with --image, or alone for a text-only question)")
    parser.add_argument("--questions", help="JSONL of questions (batch mode)")
    parser.add_argument("--image-folder", help="folder the JSONL's image paths are relative to")
    parser.add_argument("--answers-file", default="answers.jsonl", help="batch mode output (JSONL)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | str:
    """Entry point of ``scripts/llava_infer.py``: prints the answer (single mode) or writes the answers file."""
    import clipmoe_vlm  # noqa: F401  (registers the CLIP-MoE tower)

    from .builder import load_llava
    from .lora import load_lora_llava

    args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
    if (args.question is None) == (args.questions is None):
        raise SystemExit("error: give either --question (with --image) or --questions FILE.jsonl")
    dtype = torch.bfloat16 if args.bf16 else None
    model_dir = Path(args.model)
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        model, processor = load_lora_llava(model_dir, base=args.base, dtype=dtype, merge=True)
    else:
        model, processor = load_llava(model_dir, dtype=dtype)
    model.to(args.device).eval()
    options = {"template": args.template, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "num_beams": args.num_beams}
    if args.question is not None:
        image = None
        if args.image:
            try:
                image = _open_image(Path(args.image))
            except ValueError as error:
                raise SystemExit(f"error: --image: {error}") from None
        (text,) = answer_questions(model, processor, [args.question], [image], **options)
        print(text)
        return text
    try:
        answers = run_batch(model, processor, args.questions, args.answers_file, image_folder=args.image_folder,
                            batch_size=args.batch_size, model_id=model_dir.name, **options)
    except UnansweredQuestions as incomplete:
        print(f"wrote {len(incomplete.answers)} answers to {args.answers_file}")
        raise  # clipmoe_cli.main prints the one error line (count and ids) and exits 2
    print(f"wrote {len(answers)} answers to {args.answers_file}")
    return answers
