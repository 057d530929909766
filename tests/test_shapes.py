"""Tests for the synthetic Shapes world (clipmoe_vlm/data/shapes/) and its CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipmoe_cli import generate_shapes
from clipmoe_vlm.data import shapes as S
from clipmoe_vlm.data.shapes import generate, language, questions

SMALL: dict[str, Any] = {
    "n_train": 24,
    "n_pretrain": 8,
    "n_instruct": 12,
    "n_eval": 21,
    "n_mmvet": 12,
    "n_retrieval": 6,
    "n_zeroshot_per_class": 2,
    "n_mmvp_pairs": 2,
    "image_size": 48,
    "progress": False,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("shapes") / "world"
    manifest = S.generate_world(root, seed=0, **SMALL)
    return root, manifest


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _nearest_color(rgb: np.ndarray, config: S.ShapesConfig = S.DEFAULT_CONFIG) -> str:
    """The palette color whose blend with the background (anti-aliased edges) best explains ``rgb``."""
    names = list(config.color_names)
    background = np.array(config.background, dtype=np.float64)
    residuals = []
    for name in names:
        direction = np.array(config.color_rgb[name], dtype=np.float64) - background
        alpha = np.clip((rgb - background) @ direction / (direction @ direction), 0.0, 1.0)
        residuals.append(float(np.sum((background + alpha * direction - rgb) ** 2)))
    return names[int(np.argmin(residuals))]


def _foreground(image: Image.Image, config: S.ShapesConfig = S.DEFAULT_CONFIG) -> np.ndarray:
    """Boolean mask of pixels clearly different from the background."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    return np.abs(pixels - np.array(config.background)).sum(axis=-1) > 60


def _dominant_color(image: Image.Image) -> str:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    mask = _foreground(image)
    assert mask.sum() > 0, "image has no foreground pixels"
    votes = Counter(_nearest_color(p) for p in pixels[mask])
    return votes.most_common(1)[0][0]


# ------------------------------------------------------------------ determinism and caching


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(world, tmp_path):
    root, _ = world
    again = tmp_path / "again"
    S.generate_world(again, seed=0, **SMALL)
    reference, repeat = _hashes(root), _hashes(again)
    assert len(reference) > 100
    assert reference == repeat

    other = tmp_path / "other"
    S.generate_world(other, seed=1, **SMALL)
    changed = _hashes(other)
    assert set(changed) == set(reference)  # same layout ...
    differing = [k for k in reference if reference[k] != changed[k]]
    for key in ("clip_train/captions.jsonl", "llava/instruct.json", "eval/data/mmbench_en_dev.parquet"):
        assert key in differing  # ... different content
    assert len(differing) > 0.8 * len(reference)


def test_manifest_cache_skips_work_and_rerun_removes_stale_files(tmp_path, monkeypatch):
    root = tmp_path / "w"
    first = S.generate_world(root, seed=3, **SMALL)
    assert first["complete"] and first["version"] == S.GENERATOR_VERSION and first["params"]["seed"] == 3
    assert first["counts"]["clip_train"] == SMALL["n_train"]
    assert json.loads((root / "manifest.json").read_text()) == first
    for entry in first["files"].values():
        assert (root / entry).is_file()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("cache hit expected: nothing should be regenerated")

    monkeypatch.setattr(generate, "write_clip_pairs", boom)
    assert S.generate_world(root, seed=3, **SMALL) == first
    monkeypatch.undo()

    smaller = {**SMALL, "n_train": 5}
    second = S.generate_world(root, seed=3, **smaller)
    assert second["counts"]["clip_train"] == 5
    assert len(list((root / "clip_train" / "images").glob("*.png"))) == 5  # no stale images left
    assert not (root / ".shapes_in_progress.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 16}, "image_size"),
        ({"image_size": 128}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"n_eval": -3}, "n_eval"),
        ({"n_mmvp_pairs": 1.5}, "n_mmvp_pairs"),
        ({"seed": -1}, "seed"),
        ({"mmbench_answer": "word"}, "mmbench_answer"),
    ],
)
def test_generate_world_rejects_bad_input_naming_the_parameter(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        S.generate_world(tmp_path / "bad", **{**SMALL, **kwargs})
    assert not (tmp_path / "bad").exists()  # validation happens before anything is written


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="colors"):
        S.ShapesConfig(colors=(("red", (255, 0, 0)),))
    with pytest.raises(ValueError, match="shapes"):
        S.ShapesConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="mention_fill"):
        S.ShapesConfig(mention_fill=1.5)
    custom = S.ShapesConfig(
        colors=(("red", (230, 20, 20)), ("white", (240, 240, 240)), ("cyan", (0, 200, 220))),
        shapes=("star", "diamond", "circle"),
        count_weights=(0.5, 0.5),
    )
    assert S.ShapesConfig.from_dict(custom.to_dict()) == custom
    rng = S.item_rng(0, "custom", 0)
    scene = S.sample_scene(rng, custom, n_objects=2)
    assert all(o.color in ("red", "white", "cyan") and o.shape in custom.shapes for o in scene.objects)
    assert S.render_scene(scene, 32, custom).size == (32, 32)


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize("color", S.DEFAULT_CONFIG.color_names)
def test_rendered_single_object_shows_its_color(color):
    for shape in S.DEFAULT_SHAPES:
        scene = S.Scene((S.ShapeObject(color, shape, "large", "filled", "center", (9, -9, 9)),))
        assert _dominant_color(S.render_scene(scene, 64)) == color


def test_generated_captions_name_the_rendered_color(world):
    root, _ = world
    rows = [json.loads(line) for line in (root / "clip_train" / "captions.jsonl").read_text().splitlines()]
    scenes = [json.loads(line) for line in (root / "clip_train" / "scenes.jsonl").read_text().splitlines()]
    checked = 0
    for row, scene in zip(rows, scenes):
        assert row["image"] == scene["image"]
        for obj in scene["objects"]:
            assert obj["color"] in row["caption"].lower()
            assert any(w in row["caption"].lower() for w in language._SHAPE_WORDS[obj["shape"]])
        if scene["count"] == 1:
            image = Image.open(root / "clip_train" / row["image"])
            assert _dominant_color(image) == scene["objects"][0]["color"]
            checked += 1
    assert checked >= 3


def test_subtle_attributes_are_visually_decidable():
    config = S.DEFAULT_CONFIG
    for shape in S.SUPPORTED_SHAPES:
        area = {}
        for size in config.size_names:
            for fill in S.FILLS:
                scene = S.Scene((S.ShapeObject("green", shape, size, fill, "center"),))
                area[size, fill] = int(_foreground(S.render_scene(scene, 64)).sum())
        assert area["large", "filled"] > 1.5 * area["small", "filled"], shape
        assert area["large", "outlined"] > 1.3 * area["small", "outlined"], shape
        assert area["small", "filled"] > 1.15 * area["small", "outlined"], shape
        assert area["large", "filled"] > 1.3 * area["large", "outlined"], shape
    for position, (ax, ay) in config.anchors.items():
        mask = _foreground(
            S.render_scene(S.Scene((S.ShapeObject("red", "triangle", "large", "filled", position),)), 64)
        )
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() / 64 - ax) < 0.05 and abs(ys.mean() / 64 - ay) < 0.05, position


def test_objects_of_a_scene_do_not_touch():
    config = S.DEFAULT_CONFIG
    for i in range(200):
        scene = S.sample_scene(S.item_rng(0, "overlap", i), config, n_objects=3)
        masks = [_foreground(S.render_scene(S.Scene((obj,)), 64)) for obj in scene.objects]
        for a in range(3):
            for b in range(a + 1, 3):
                assert not (masks[a] & masks[b]).any()


# ------------------------------------------------------------------ language


def test_refer_is_unique_and_hides_the_excluded_attribute():
    for i in range(100):
        rng = S.item_rng(0, "refer", i)
        scene = S.sample_scene(rng)
        for index, obj in enumerate(scene.objects):
            for excluded in ("color", "shape", "size", "fill", "position"):
                phrase = S.refer(scene, index, rng, exclude={excluded})
                value = obj.attribute(excluded)
                if excluded == "position":
                    assert language._position_phrase(value) not in phrase
                else:
                    assert value not in phrase.split()
                matching = [
                    o
                    for o in scene.objects
                    if all(
                        w in (o.color, o.shape, "shape", "object") or w in language._position_phrase(o.position).split()
                        for w in phrase.split()
                    )
                ]
                assert matching == [obj], (phrase, scene)


def test_make_qa_answers_match_the_scene():
    for i in range(150):
        rng = S.item_rng(0, "qa", i)
        scene = S.sample_scene(rng)
        for kind in questions._available_kinds(scene, S.QA_KINDS):
            qa = S.make_qa(scene, kind, rng)
            assert qa.mc_answer in qa.mc_candidates
            if kind == "count":
                assert qa.answer == str(scene.count)
            elif kind == "existence":
                named = qa.question.removeprefix("Is there ").removesuffix(" in the image?").split()[-2:]
                present = any([o.color, o.shape] == named for o in scene.objects)
                assert qa.answer == ("yes" if present else "no")
                assert qa.mc_answer in {f"{o.color} {o.shape}" for o in scene.objects}
                absent = [c for c in qa.mc_candidates if c != qa.mc_answer]
                assert not set(absent) & {f"{o.color} {o.shape}" for o in scene.objects}
            elif kind in ("color", "shape", "size", "fill", "position"):
                assert qa.answer in {o.attribute(kind) for o in scene.objects}
    with pytest.raises(ValueError, match="two objects"):
        S.make_qa(S.sample_scene(S.item_rng(0, "one", 0), n_objects=1), "relation", S.item_rng(0, "one", 1))


# ------------------------------------------------------------------ file formats


def test_clip_pairs_jsonl_and_csv(world):
    root, _ = world
    folder = root / "clip_train"
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    with open(folder / "captions.csv", newline="", encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(rows) == SMALL["n_train"]
    assert [set(r) for r in rows] == [{"image", "caption"}] * len(rows)
    assert [(r["image"], r["caption"]) for r in rows] == [(r["image"], r["caption"]) for r in csv_rows]
    assert len({r["caption"] for r in rows}) > 0.8 * len(rows)  # varied captions
    for row in rows:
        assert not Path(row["image"]).is_absolute()
        with Image.open(folder / row["image"]) as image:
            assert image.size == (SMALL["image_size"], SMALL["image_size"]) and image.mode == "RGB"


def test_llava_json(world):
    root, manifest = world
    folder = root / "llava"
    pretrain = json.loads((folder / "pretrain.json").read_text())
    instruct = json.loads((folder / "instruct.json").read_text())
    assert len(pretrain) == SMALL["n_pretrain"]
    with_image = [s for s in instruct if "image" in s]
    text_only = [s for s in instruct if "image" not in s]
    assert (
        len(with_image) == SMALL["n_instruct"] and len(text_only) == manifest["counts"]["llava_instruct_text_only"] >= 1
    )
    assert len({s["id"] for s in pretrain + instruct}) == len(pretrain) + len(instruct)
    styles = Counter()
    for sample in pretrain + instruct:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) % 2 == 0
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        if "image" in sample:
            assert (folder / sample["image"]).is_file()
            assert turns[0]["value"].startswith("<image>\n") and turns[0]["value"].count("<image>") == 1
            assert all("<image>" not in t["value"] for t in turns[1:])
        else:
            assert all("<image>" not in t["value"] for t in turns)
    for sample in pretrain:
        assert len(sample["conversations"]) == 2
    for sample in with_image:
        turns = sample["conversations"]
        assert 2 <= len(turns) // 2 <= 4
        for human, gpt in zip(turns[::2], turns[1::2]):
            if human["value"].endswith(S.MC_ANSWER_PROMPT):
                styles["mc"] += 1
                if S.MMBENCH_OPTIONS_HEADER in human["value"]:  # MMBench format: the option's text (default)
                    options = [line[3:] for line in human["value"].split("\n") if line[1:3] == ". "]
                    assert gpt["value"] in options
                else:
                    assert gpt["value"] in "ABCD" and f"\n{gpt['value']}. " in human["value"]
            elif human["value"].endswith(S.SHORT_ANSWER_PROMPT):
                styles["short"] += 1
                assert len(gpt["value"].split()) <= 3
            else:
                styles["long"] += 1
                assert gpt["value"].endswith(".")
    assert styles["mc"] and styles["short"] and styles["long"]


def _load_parquet(path: Path, split: str, cache: Path):
    import datasets

    return datasets.load_dataset("parquet", data_files={split: str(path)}, cache_dir=str(cache))[split]


def test_parquet_files_load_with_datasets_and_expected_schema(world, tmp_path):
    import datasets

    root, _ = world
    data = root / "eval" / "data"
    string = datasets.Value("string")

    mmbench = _load_parquet(data / "mmbench_en_dev.parquet", "dev", tmp_path)
    expected = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
        "source",
        "L2-category",
        "comment",
        "split",
    ]
    assert list(mmbench.features) == expected
    assert mmbench.features["index"] == datasets.Value("int64")
    assert isinstance(mmbench.features["image"], datasets.Image)
    assert all(mmbench.features[c] == string for c in expected if c not in ("index", "image"))
    assert len(mmbench) == SMALL["n_eval"]
    assert set(mmbench["category"]) == {"color", "shape", "size", "fill", "position", "count", "relation"}
    assert set(mmbench["answer"]) <= set("ABCD")
    assert any(h is None for h in mmbench["hint"]) and any(h for h in mmbench["hint"])
    for row in mmbench:
        assert isinstance(row["image"], Image.Image)
        assert row[row["answer"]] is not None  # the answer letter names a real option

    vizwiz = _load_parquet(data / "vizwiz_vqa_val.parquet", "val", tmp_path)
    assert list(vizwiz.features) == ["question_id", "image", "question", "answers", "category"]
    assert vizwiz.features["answers"] == datasets.List(string)
    assert all(len(a) == 10 and all(isinstance(x, str) for x in a) for a in vizwiz["answers"])
    assert "unanswerable" in vizwiz["category"] and {"other", "yes/no"} <= set(vizwiz["category"])
    assert isinstance(vizwiz[0]["image"], Image.Image)

    mmvet = _load_parquet(data / "mmvet.parquet", "test", tmp_path)
    assert list(mmvet.features) == ["question_id", "image", "question", "answer", "image_source", "capability"]
    assert all(mmvet.features[c] == string for c in mmvet.features if c != "image")
    assert any("<AND>" in a for a in mmvet["answer"]) and any("<OR>" in a for a in mmvet["answer"])
    assert {"rec", "rec,spat"} <= set(mmvet["capability"])
    assert isinstance(mmvet[0]["image"], Image.Image)


# ------------------------------------------------------------------ upstream lmms-eval task functions


def test_upstream_mmbench_functions_accept_the_rows(world, tmp_path):
    en_utils = pytest.importorskip("lmms_eval.tasks.mmbench.en_utils")
    root, _ = world
    docs = _load_parquet(root / "eval" / "data" / "mmbench_en_dev.parquet", "dev", tmp_path)
    post = "\nAnswer with the option's letter from the given choices directly."
    right, wrong = [], []
    for doc in docs:
        visual = en_utils.mmbench_doc_to_visual(doc)
        assert len(visual) == 1 and visual[0].mode == "RGB"
        text = en_utils.mmbench_doc_to_text(doc, {"pre_prompt": "", "post_prompt": post})
        assert doc["question"] in text and f"A. {doc['A']}" in text and text.endswith(post)
        if doc["hint"] is not None:
            assert text.startswith(doc["hint"])
        right.append(en_utils.mmbench_process_results(doc, [doc["answer"]])["gpt_eval_score"])
        bad = next(letter for letter in "ABCD" if letter != doc["answer"] and doc[letter] is not None)
        wrong.append(en_utils.mmbench_process_results(doc, [bad])["gpt_eval_score"])
    args = SimpleNamespace(output_path=str(tmp_path / "out"))
    assert en_utils.mmbench_aggregate_dev_results_static(right, args) == pytest.approx(100.0)
    assert en_utils.mmbench_aggregate_dev_results_static(wrong, args) == pytest.approx(0.0)


def test_upstream_vizwiz_functions_score_the_rows(world, tmp_path):
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    from lmms_eval.tasks.vizwiz_vqa import utils as vizwiz

    root, _ = world
    docs = _load_parquet(root / "eval" / "data" / "vizwiz_vqa_val.parquet", "val", tmp_path)
    normalize = EvalAIAnswerProcessor()
    post = "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."
    seen_unanswerable = False
    for doc in docs:
        assert vizwiz.vizwiz_vqa_doc_to_visual(doc)[0].mode == "RGB"
        text = vizwiz.vizwiz_vqa_doc_to_text(doc, {"pre_prompt": "", "post_prompt": post})
        assert text.startswith(doc["question"][:1].upper()) and text.endswith(post)
        truth = Counter(normalize(a) for a in doc["answers"]).most_common(1)[0][0]
        if doc["category"] == "unanswerable":
            assert truth == "unanswerable"
            seen_unanswerable = True
        assert vizwiz.vizwiz_vqa_process_results(dict(doc, answers=list(doc["answers"])), [truth])["exact_match"] == 1.0
        score = vizwiz.vizwiz_vqa_process_results(dict(doc, answers=list(doc["answers"])), ["zebra"])["exact_match"]
        assert score == 0.0
    assert seen_unanswerable


def _mmbench_doc(question: str, options: list[str], hint: str | None, answer: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"index": 0, "question": question, "hint": hint, "answer": answer, "category": "color"}
    doc.update({"L2-category": "coarse_perception", "source": "shapes", "split": "dev", "comment": None})
    doc.update({letter: options[k] if k < len(options) else None for k, letter in enumerate("ABCD")})
    return doc


def test_benchmark_prompt_helpers_equal_upstream_doc_to_text(world, tmp_path):
    en_utils = pytest.importorskip("lmms_eval.tasks.mmbench.en_utils")
    from lmms_eval.tasks.vizwiz_vqa import utils as vizwiz

    root, _ = world
    mm_post = {"pre_prompt": "", "post_prompt": "\n" + S.MC_ANSWER_PROMPT}
    for doc in _load_parquet(root / "eval" / "data" / "mmbench_en_dev.parquet", "dev", tmp_path):
        options = [doc[letter] for letter in "ABCD" if doc[letter] is not None]
        assert S.mmbench_prompt(doc["question"], options, doc["hint"]) == en_utils.mmbench_doc_to_text(doc, mm_post)
    assert S.MMBENCH_OPTIONS_HEADER == en_utils.config["metadata"]["sys_prompt"]
    vz_post = {"pre_prompt": "", "post_prompt": S.VIZWIZ_POST_PROMPT}
    for doc in _load_parquet(root / "eval" / "data" / "vizwiz_vqa_val.parquet", "val", tmp_path):
        assert S.vizwiz_prompt(doc["question"]) == vizwiz.vizwiz_vqa_doc_to_text(doc, vz_post)


def test_instruct_has_benchmark_style_turns_as_upstream_renders_them(tmp_path):
    """The instruction data mirrors lmms-eval's MMBench and VizWiz prompts exactly (as LLaVA-1.5's mix has
    VQA-style and multiple-choice prompts), including VizWiz questions the image cannot answer."""
    en_utils = pytest.importorskip("lmms_eval.tasks.mmbench.en_utils")
    from lmms_eval.tasks.vizwiz_vqa import utils as vizwiz

    S.write_llava_instruct(tmp_path / "a", 60, seed=3, progress=False)
    S.write_llava_instruct(tmp_path / "b", 60, seed=3, progress=False)
    text = (tmp_path / "a" / "instruct.json").read_bytes()
    assert text == (tmp_path / "b" / "instruct.json").read_bytes()  # deterministic
    hints = set(questions._HINTS.values())
    mm_post = {"pre_prompt": "", "post_prompt": "\n" + S.MC_ANSWER_PROMPT}
    vz_post = {"pre_prompt": "", "post_prompt": S.VIZWIZ_POST_PROMPT}
    counts = Counter()
    for sample in json.loads(text):
        turns = sample["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            prompt = human["value"].removeprefix("<image>\n")
            header = f" {S.MMBENCH_OPTIONS_HEADER}\n"
            if header in prompt:
                head, tail = prompt.split(header)
                hint = next((h for h in hints if head.startswith(h + " ")), None)
                question = head[len(hint) + 1 :] if hint else head
                lines = tail.split("\n")
                assert lines[-2:] == ["", S.MC_ANSWER_PROMPT]
                options = [line[3:] for line in lines[:-2]]
                assert [line[:3] for line in lines[:-2]] == [f"{c}. " for c in "ABCD"[: len(options)]]
                assert gpt["value"] in options  # the default answer style: the option's text
                doc = _mmbench_doc(question, options, hint, "ABCD"[options.index(gpt["value"])])
                assert en_utils.mmbench_doc_to_text(doc, mm_post) == prompt
                counts["mmbench_hint" if hint else "mmbench"] += 1
            elif prompt.endswith(S.VIZWIZ_POST_PROMPT):
                question = prompt.removesuffix(S.VIZWIZ_POST_PROMPT)
                row_question = question[:1].lower() + question[1:]  # as write_vizwiz stores questions
                assert vizwiz.vizwiz_vqa_doc_to_text({"question": row_question}, vz_post) == prompt
                counts["vizwiz_unanswerable" if gpt["value"] == "unanswerable" else "vizwiz"] += 1
            else:
                counts["other"] += 1
    assert all(counts[k] for k in ("mmbench", "mmbench_hint", "vizwiz", "vizwiz_unanswerable", "other")), counts
    assert counts["vizwiz_unanswerable"] < counts["vizwiz"]


@pytest.mark.parametrize("style", ["text-letter", "text"])
def test_mmbench_answer_styles_change_only_the_mmbench_answers_and_upstream_reads_them(tmp_path, style):
    """``mmbench_answer`` rewrites the answers of MMBench-format turns and nothing else (same scenes, prompts
    and other answers), and upstream MMBench's rule-based matcher maps every such answer to the right letter."""
    mmbench_evals = pytest.importorskip("lmms_eval.tasks.mmbench.mmbench_evals")
    matcher = mmbench_evals.MMBench_Evaluator(sys_prompt=S.MMBENCH_OPTIONS_HEADER)
    S.write_llava_instruct(tmp_path / "letter", 60, seed=3, mmbench_answer="letter", progress=False)
    S.write_llava_instruct(tmp_path / style, 60, seed=3, mmbench_answer=style, progress=False)
    letters = json.loads((tmp_path / "letter" / "instruct.json").read_text())
    others = json.loads((tmp_path / style / "instruct.json").read_text())
    assert [s["id"] for s in letters] == [s["id"] for s in others]
    header = f" {S.MMBENCH_OPTIONS_HEADER}\n"
    changed = 0
    for a, b in zip(letters, others):
        assert [t["value"] for t in a["conversations"][::2]] == [t["value"] for t in b["conversations"][::2]]
        for human, old, new in zip(a["conversations"][::2], a["conversations"][1::2], b["conversations"][1::2]):
            if header not in human["value"]:
                assert new == old
                continue
            lines = human["value"].split(header)[1].split("\n")[:-2]
            options = {line[0]: line[3:] for line in lines}
            expected = {"text-letter": f"{options[old['value']]} ({old['value']})", "text": options[old["value"]]}
            assert new["value"] == expected[style]
            assert matcher.can_infer(new["value"], dict(options)) == old["value"]
            changed += 1
    assert changed > 10
    assert S.mmbench_target("B", "red circle", "text-letter") == "red circle (B)"
    with pytest.raises(ValueError, match="mmbench_answer"):
        S.write_llava_instruct(tmp_path / "bad", 2, mmbench_answer="word", progress=False)


def test_unanswerable_questions_cannot_be_answered_from_the_scene():
    config = S.DEFAULT_CONFIG
    templates = [t.split("{r}")[0] for t in questions._UNANSWERABLE_QUESTIONS]
    absent_seen = 0
    for i in range(200):
        rng = S.item_rng(0, "test_unanswerable", i)
        scene = S.sample_scene(rng, config)
        question = questions._unanswerable_question(scene, rng, config)
        if any(question.startswith(t) for t in templates):
            continue
        shape = question.split("the ", 1)[1].split(" ")[0].rstrip("?")
        assert shape in config.shapes and all(o.shape != shape for o in scene.objects), question
        absent_seen += 1
    assert absent_seen


def test_upstream_mmvet_functions_accept_the_rows(world, tmp_path, monkeypatch):
    monkeypatch.setenv("API_TYPE", "dummy")  # never build a networked judge client
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    mmvet = pytest.importorskip("lmms_eval.tasks.mmvet.utils")
    root, _ = world
    docs = _load_parquet(root / "eval" / "data" / "mmvet.parquet", "test", tmp_path)
    pre = (
        "First please perform reasoning, and think step by step to provide best answer to the following question: \n\n"
    )
    results = []
    for doc in docs:
        assert mmvet.mmvet_doc_to_visual(doc)[0].mode == "RGB"
        assert mmvet.doc_to_text(doc, {"pre_prompt": pre, "post_prompt": ""}) == pre + doc["question"]
        results.append({"question_id": doc["question_id"], "capabilities": doc["capability"], "score": 1.0})
    assert mmvet.mmvet_aggregate_results(results) == pytest.approx(100.0)


# ------------------------------------------------------------------ encoder evaluation sets


def test_coco_retrieval_has_five_distinct_captions_per_image(world):
    root, _ = world
    folder = root / "encoder_eval" / "retrieval"
    coco = json.loads((folder / "captions.json").read_text())
    assert len(coco["images"]) == SMALL["n_retrieval"]
    per_image: dict[int, list[str]] = {}
    for ann in coco["annotations"]:
        assert set(ann) == {"id", "image_id", "caption"}
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for image in coco["images"]:
        assert (folder / "images" / image["file_name"]).is_file()
        captions = per_image[image["id"]]
        assert len(captions) == 5 and len(set(captions)) == 5


def test_zeroshot_class_folders(world):
    root, _ = world
    folder = root / "encoder_eval" / "zeroshot"
    config = S.DEFAULT_CONFIG
    assert sorted(p.name for p in folder.iterdir()) == sorted(S.ATTRIBUTES)
    for attribute in S.ATTRIBUTES:
        classes = json.loads((folder / attribute / "classnames.json").read_text())
        templates = json.loads((folder / attribute / "templates.json").read_text())
        assert classes == sorted(p.name for p in (folder / attribute).iterdir() if p.is_dir())
        assert len(classes) == len(config.values(attribute)) and all("{}" in t for t in templates)
        # every prompt names the colour and shape every training caption states (the class fills one of them)
        for nuisance in {"color", "shape"} - {attribute} if attribute != "count" else ():
            assert all(any(f" {v} " in f" {t.rstrip('.')} " for v in config.values(nuisance)) for t in templates)
    assert json.loads((folder / "shape" / "templates.json").read_text()) == [
        f"the {c} {{}}." for c in config.values("color")]
    assert len(json.loads((folder / "size" / "templates.json").read_text())) == (
        len(config.values("color")) * len(config.values("shape")))
    for attribute in S.ATTRIBUTES:
        classes = json.loads((folder / attribute / "classnames.json").read_text())
        for name in classes:
            images = sorted((folder / attribute / name).glob("*.png"))
            assert len(images) == SMALL["n_zeroshot_per_class"]
            for path in images:
                image = Image.open(path)
                if attribute == "color":
                    assert _dominant_color(image) == name


def test_mmvp_vlm_pairs_differ_in_exactly_the_stated_attribute(world):
    root, _ = world
    folder = root / "encoder_eval" / "mmvp_vlm"
    with open(folder / "Questions.csv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["Question ID", "Type", "Statement"]
        rows = list(reader)
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(pairs) == 2 * SMALL["n_mmvp_pairs"] * len(S.ATTRIBUTES)
    types = {
        "color": "Color",
        "shape": "Shape",
        "size": "Size",
        "fill": "Fill",
        "position": "Position",
        "count": "Quantity",
    }
    for pair, first, second in zip(pairs, rows[::2], rows[1::2]):
        qid1, qid2 = int(first[0]), int(second[0])
        assert qid1 % 2 == 1 and qid2 == qid1 + 1 and (pair["qid1"], pair["qid2"]) == (qid1, qid2)
        assert first[1] == second[1] == pair["type"] == types[pair["attribute"]]
        image1 = folder / "MLLM_VLM Images" / first[1] / f"{qid1}.jpg"
        image2 = folder / "MLLM_VLM Images" / first[1] / f"{qid2}.jpg"
        assert image1.read_bytes() != image2.read_bytes()
        assert pair["value1"] != pair["value2"]
        words1, words2 = first[2].split(), second[2].split()
        assert len(words1) == len(words2) and first[2] != second[2]
        scene1, scene2 = pair["scene1"], pair["scene2"]
        if pair["attribute"] == "count":
            assert (scene1["count"], scene2["count"]) == (int(pair["value1"]), int(pair["value2"]))
            keep = ("color", "shape", "size", "fill")
            assert {tuple(o[k] for k in keep) for o in scene1["objects"] + scene2["objects"]} == {
                tuple(scene1["objects"][0][k] for k in keep)
            }
            assert words1[0] == language._count_word(scene1["count"])
            assert words2[0] == language._count_word(scene2["count"])
        else:
            (obj1,), (obj2,) = scene1["objects"], scene2["objects"]
            differing = [k for k in obj1 if obj1[k] != obj2[k]]
            assert differing == [pair["attribute"]]
            assert (obj1[pair["attribute"]], obj2[pair["attribute"]]) == (pair["value1"], pair["value2"])
            diff_words = [(a, b) for a, b in zip(words1, words2) if a != b]
            assert len(diff_words) == 1 or pair["attribute"] == "position"
            if pair["attribute"] == "color":
                assert _dominant_color(Image.open(image1)) == pair["value1"]
                assert _dominant_color(Image.open(image2)) == pair["value2"]


# ------------------------------------------------------------------ command line


def test_cli_help_lists_every_flag(capsys):
    cli = generate_shapes
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in cli.build_parser()._actions:
        assert action.help, action.dest
    for flag in ("--out", "--seed", "--n-train", "--n-eval", "--image-size", "--eval-dir", "--force", "--no-progress"):
        assert flag in text


def test_cli_writes_a_world(tmp_path, capsys):
    cli = generate_shapes
    argv = ["--out", str(tmp_path / "w"), "--seed", "5", "--n-train", "4", "--n-pretrain", "2", "--n-instruct", "2",
            "--n-eval", "8", "--n-mmvet", "2", "--n-retrieval", "2", "--n-zeroshot-per-class", "1",
            "--n-mmvp-pairs", "1", "--image-size", "32", "--eval-dir", str(tmp_path / "evaldata"), "--no-progress"]  # fmt: skip
    manifest = cli.main(argv)
    assert manifest["params"]["seed"] == 5 and manifest["counts"]["clip_train"] == 4
    assert (tmp_path / "evaldata" / "mmbench_en_dev.parquet").is_file()
    assert json.loads(capsys.readouterr().out)["counts"] == manifest["counts"]
    with pytest.raises(ValueError, match="image_size"):
        cli.main([*argv, "--image-size", "200"])  # the last occurrence of a flag wins
