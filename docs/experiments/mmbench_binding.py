"""Experiments behind "Why the tiny default LLaVA stays at chance on Shapes MMBench" in docs/results.md.

Not part of the package: these are the scripts that produced the numbers, kept so they can be rerun.

    python docs/experiments/mmbench_binding.py extra-turns  IN.json OUT.json --extra 3
    python docs/experiments/mmbench_binding.py text-mc      IN.json OUT.json --n 6000 --turns 2-3 --same-scene
    python docs/experiments/mmbench_binding.py probe        runs/llava-finetune --hint answer
    python docs/experiments/mmbench_binding.py lm           --tokenizer runs/llava-pretrain --layers 2 --hidden 128 \
                                                            --steps 3000 --hint answer --objects 1

``extra-turns`` appends MMBench-format turns (about the conversation's own image) to every image conversation of
a Shapes ``instruct.json``; ``text-mc`` appends text-only MMBench-format conversations whose hint holds the
answer (the scene's canonical caption, or "The answer is X."); ``probe`` asks a LLaVA folder 200 held-out
text-only such questions and prints its letter accuracy; ``lm`` trains a bare tiny Llama on those questions
(loss on the answer letter only) and prints held-out accuracy every 250 steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from clipmoe_vlm.data import shapes as S
from clipmoe_vlm.data.shapes.questions import _available_kinds, _format_turn, _mc_options

LETTERS = "ABCD"


def _kinds(scene, exclude=("existence",)):
    return [k for k in _available_kinds(scene, S.QA_KINDS) if k not in exclude]


def _question(rng, *, hint: str, objects: int | None, exclude=("existence",)):
    scene = S.sample_scene(rng, S.DEFAULT_CONFIG, n_objects=objects)
    kinds = _kinds(scene, exclude)
    qa = S.make_qa(scene, kinds[int(rng.integers(len(kinds)))], rng)
    options, letter = _mc_options(qa, rng)
    text = {"caption": S.canonical_caption(scene), "answer": f"The answer is {qa.mc_answer}.",
            "value": f"{qa.mc_answer}."}[hint]
    return S.mmbench_prompt(qa.mc_question, options, text), letter, qa.kind


def extra_turns(args):
    samples = json.loads(Path(args.input).read_text())
    rng = np.random.default_rng(args.seed)
    added = 0
    for sample in samples:
        if "image" not in sample:
            continue
        # write_llava_instruct draws image i's scene first from item_rng(seed, "llava_instruct", i)
        index = int(sample["id"].rsplit("_", 1)[1]) - 1
        scene = S.sample_scene(S.item_rng(args.world_seed, "llava_instruct", index), S.DEFAULT_CONFIG)
        kinds = _kinds(scene)
        for _ in range(args.extra):
            qa = S.make_qa(scene, kinds[int(rng.integers(len(kinds)))], rng)
            question, answer = _format_turn(qa, "mmbench", rng, scene=scene, config=S.DEFAULT_CONFIG)
            sample["conversations"] += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            added += 1
    Path(args.output).write_text(json.dumps(samples))
    print(f"added {added} MMBench-format turns -> {args.output}")


def text_mc(args):
    samples = json.loads(Path(args.input).read_text())
    rng = np.random.default_rng(args.seed)
    low, high = (int(v) for v in args.turns.split("-")) if "-" in args.turns else (int(args.turns),) * 2
    objects = None if args.objects == 0 else args.objects
    exclude = tuple(args.exclude.split(","))
    for j in range(args.n):
        conversation = []
        if args.same_scene:  # one scene per conversation, its caption as the first turn's hint only
            scene = S.sample_scene(rng, S.DEFAULT_CONFIG, n_objects=objects)
            kinds = _kinds(scene, exclude)
            for t in range(int(rng.integers(low, high + 1))):
                qa = S.make_qa(scene, kinds[int(rng.integers(len(kinds)))], rng)
                options, letter = _mc_options(qa, rng)
                prompt = S.mmbench_prompt(qa.mc_question, options, S.canonical_caption(scene) if t == 0 else None)
                conversation += [{"from": "human", "value": prompt}, {"from": "gpt", "value": letter}]
        else:  # a new scene and a hint in every turn
            for t in range(int(rng.integers(low, high + 1))):
                prompt, letter, _ = _question(rng, hint=args.hint, objects=objects, exclude=exclude)
                conversation += [{"from": "human", "value": prompt}, {"from": "gpt", "value": letter}]
        samples.append({"id": f"text_mc_{j}", "conversations": conversation})
    rng.shuffle(samples)
    Path(args.output).write_text(json.dumps(samples))
    print(f"{len(samples)} samples -> {args.output}")


def probe(args):
    from clipmoe_vlm.llava.builder import load_llava
    from clipmoe_vlm.llava.inference import answer_questions

    rng = np.random.default_rng(999)
    questions = [_question(rng, hint=args.hint, objects=None) for _ in range(args.n)]
    for folder in args.models:
        model, processor = load_llava(folder)
        model.eval()
        answers = []
        for i in range(0, len(questions), 25):
            chunk = [q for q, _, _ in questions[i : i + 25]]
            answers += answer_questions(model, processor, chunk, [None] * len(chunk), max_new_tokens=3)
        right = [a[:1] == letter for a, (_, letter, _) in zip(answers, questions)]
        per_kind = collections.defaultdict(list)
        for ok, (_, _, kind) in zip(right, questions):
            per_kind[kind].append(ok)
        print(folder, f"text-only letter accuracy {np.mean(right):.3f}",
              {k: round(float(np.mean(v)), 2) for k, v in sorted(per_kind.items())},
              dict(collections.Counter(a[:1] for a in answers)))


def lm(args):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.padding_side = "left"
    objects = None if args.objects == 0 else args.objects
    exclude = tuple(args.exclude.split(","))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    letter_ids = [tokenizer.convert_tokens_to_ids(c) for c in LETTERS]

    def batch(rng, n):
        rows = [_question(rng, hint=args.hint, objects=objects, exclude=exclude) for _ in range(n)]
        enc = tokenizer([f"USER: {q} ASSISTANT: " for q, _, _ in rows], return_tensors="pt", padding=True)
        return enc, torch.tensor([LETTERS.index(letter) for _, letter, _ in rows])

    test = batch(np.random.default_rng(123), 400)
    rng, start = np.random.default_rng(0), time.time()
    for step in range(args.steps + 1):
        if step % 250 == 0:
            with torch.no_grad():
                accuracy = (model(**test[0]).logits[:, -1, letter_ids].argmax(-1) == test[1]).float().mean()
            print(f"step {step} held-out accuracy {accuracy:.3f} ({time.time() - start:.0f} s)", flush=True)
        inputs, target = batch(rng, args.batch_size)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits[:, -1, letter_ids], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extra-turns", help="add MMBench-format turns to every image conversation")
    p.add_argument("input", help="a Shapes instruct.json")
    p.add_argument("output", help="where to write the new JSON")
    p.add_argument("--extra", type=int, default=3, help="turns added per image conversation")
    p.add_argument("--world-seed", type=int, default=0, help="seed the Shapes world was generated with")
    p.add_argument("--seed", type=int, default=123, help="seed for the added questions")
    p.set_defaults(run=extra_turns)
    p = sub.add_parser("text-mc", help="add text-only MMBench-format conversations whose hint holds the answer")
    p.add_argument("input", help="an instruct.json to extend")
    p.add_argument("output", help="where to write the new JSON")
    p.add_argument("--n", type=int, default=6000, help="conversations to add")
    p.add_argument("--turns", default="1-3", help="turns per conversation: N or LOW-HIGH")
    p.add_argument("--hint", choices=["caption", "answer"], default="caption",
                   help="caption: the scene's canonical caption; answer: 'The answer is X.'")
    p.add_argument("--objects", type=int, default=0, help="objects per scene (0: the world's mix)")
    p.add_argument("--exclude", default="existence", help="question kinds left out, comma-separated")
    p.add_argument("--same-scene", action="store_true",
                   help="one scene per conversation with its caption as the first turn's hint (--hint ignored)")
    p.add_argument("--seed", type=int, default=7, help="seed for the added conversations")
    p.set_defaults(run=text_mc)
    p = sub.add_parser("probe", help="letter accuracy of LLaVA folders on held-out text-only questions")
    p.add_argument("models", nargs="+", help="LLaVA folders")
    p.add_argument("--hint", choices=["caption", "answer"], default="answer", help="as for text-mc")
    p.add_argument("--n", type=int, default=200, help="questions")
    p.set_defaults(run=probe)
    p = sub.add_parser("lm", help="train a bare tiny Llama on the text-only questions (loss on the letter)")
    p.add_argument("--tokenizer", default="runs/llava-pretrain", help="folder with the Shapes tokenizer")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (heads = hidden / 32)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="questions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--hint", choices=["caption", "answer", "value"], default="answer",
                   help="as for text-mc; value: just 'X.'")
    p.add_argument("--objects", type=int, default=1, help="objects per scene (0: the world's mix)")
    p.add_argument("--exclude", default="existence", help="question kinds left out, comma-separated")
    p.add_argument("--save", help="save the trained LM and tokenizer to this folder")
    p.set_defaults(run=lm)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
