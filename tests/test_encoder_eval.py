"""Encoder evaluation: retrieval, zero-shot, MMVP-VLM and the Shapes one-call run, on stubs whose answers are known
and on a tiny random CLIP-MoE over a tiny Shapes world; bad layouts; `clipmoe eval-encoder` end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from clipmoe_cli import eval_encoder
from clipmoe_vlm.data.shapes import ATTRIBUTES
from clipmoe_vlm.evaluation import (
    EvalDataError,
    default_templates,
    evaluate_encoder,
    evaluate_shapes_encoder,
    load_coco_captions,
    load_flickr_karpathy,
    load_flickr_token,
    mmvp_vlm,
    retrieval_metrics,
    shapes_encoder_tasks,
    zeroshot_classification,
    zeroshot_classifier,
)
from clipmoe_vlm.loading import tiny_clip_config
from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------------
# A stub CLIP whose features are looked up from tables: each image carries an integer code in its colour, each
# text ends with an integer code, so every similarity (and hence every metric) is known in advance.


def code_image(code: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (10 * (code % 25), 10 * (code // 25), 0))


def decode_transform(image: Image.Image) -> torch.Tensor:
    r, g, _ = image.convert("RGB").getpixel((image.size[0] // 2, image.size[1] // 2))
    return torch.tensor([round(r / 10) + 25 * round(g / 10)])


class RecordingTokenizer:
    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen.extend(texts)
        return torch.tensor([[int(re.findall(r"\d+", t)[-1])] for t in texts])


class StubCLIP(torch.nn.Module):
    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor):
        super().__init__()
        self.register_buffer("image_table", image_table.float())
        self.register_buffer("text_table", text_table.float())
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def get_image_features(self, pixel_values):
        return SimpleNamespace(pooler_output=self.image_table[pixel_values[:, 0].long()])

    def get_text_features(self, input_ids):
        return SimpleNamespace(pooler_output=self.text_table[input_ids[:, 0]])


def brute_force_recall(img: torch.Tensor, txt: torch.Tensor, owner: list[int], k: int) -> tuple[float, float]:
    """Rank-based reference: the rank of the best matching caption (i2t) / of the right image (t2i)."""
    img = torch.nn.functional.normalize(img.double(), dim=-1)
    txt = torch.nn.functional.normalize(txt.double(), dim=-1)
    sims = img @ txt.T
    i2t = 0
    for i in range(img.shape[0]):
        ranks = [int((sims[i] > sims[i, j]).sum()) for j in range(txt.shape[0]) if owner[j] == i]
        i2t += min(ranks) < k
    t2i = sum(int((sims[:, j] > sims[owner[j], j]).sum()) < k for j in range(txt.shape[0]))
    return i2t / img.shape[0], t2i / txt.shape[0]


def write_coco(root: Path, captions_per_image: list[int]) -> tuple[Path, list[int]]:
    """Image i has code i; its captions have codes 100 + 10 * i + c. Returns the JSON and the caption codes kept."""
    (root / "images").mkdir(parents=True)
    images, annotations, kept = [], [], []
    for i, n in enumerate(captions_per_image):
        code_image(i).save(root / "images" / f"{i:03d}.png")
        images.append({"id": 1000 + i, "file_name": f"{i:03d}.png"})
        for c in range(n):
            annotations.append({"id": len(annotations), "image_id": 1000 + i, "caption": f"caption {100 + 10 * i + c}"})
            if c < 5:
                kept.append(100 + 10 * i + c)
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, kept


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def transform_and_tokenizer(tiny_moe):
    """What `clipmoe eval-encoder` builds for the model: its image size and its text context length."""
    config = tiny_moe.config
    return (clip_image_transform(config.vision_config.image_size),
            open_clip_tokenizer(config.text_config.max_position_embeddings))


@pytest.fixture(scope="module")
def shapes_metrics(world, tiny_moe, transform_and_tokenizer):
    return evaluate_shapes_encoder(tiny_moe, *transform_and_tokenizer, world, batch_size=16, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Retrieval


def test_retrieval_metrics_match_brute_force_reference_and_do_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(9, 8, generator=g)
    owner = [i // 3 for i in range(27)]
    txt = img[owner] + 1.2 * torch.randn(27, 8, generator=g)
    norm = torch.nn.functional.normalize
    whole = retrieval_metrics(norm(img, dim=-1), norm(txt, dim=-1), owner)
    chunked = retrieval_metrics(norm(img, dim=-1), norm(txt, dim=-1), owner, chunk_size=2)
    assert whole == chunked
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(img, txt, owner, k)
        assert whole[f"i2t_R@{k}"] == pytest.approx(i2t) and whole[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < whole["t2i_R@1"] < 1  # the noise makes the case non-trivial


def test_coco_retrieval_keeps_first_five_captions_and_matches_reference(tmp_path):
    path, kept = write_coco(tmp_path, [5, 6, 5, 0, 7, 5])  # image 3 has no caption: left out
    dataset = load_coco_captions(path)  # images/ next to the JSON is the default image folder
    assert [p.name for p in dataset.images] == ["000.png", "001.png", "002.png", "004.png", "005.png"]
    assert dataset.texts == [f"caption {c}" for c in kept] and len(dataset.texts) == 25
    assert dataset.text_to_image == [i // 5 for i in range(25)]

    g = torch.Generator().manual_seed(1)
    image_table = torch.randn(6, 16, generator=g)
    text_table = torch.randn(200, 16, generator=g)
    for c in kept:  # a caption is its image's feature plus noise
        text_table[c] = image_table[(c - 100) // 10] + 0.9 * torch.randn(16, generator=g)
    tok = RecordingTokenizer()
    result = evaluate_encoder(StubCLIP(image_table, text_table), decode_transform, tok, coco=path,
                              batch_size=4, progress=False)["coco"]
    assert result["num_images"] == 5 and result["num_texts"] == 25
    img = image_table[[0, 1, 2, 4, 5]]
    txt = text_table[kept]
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(img, txt, dataset.text_to_image, k)
        assert result[f"i2t_R@{k}"] == pytest.approx(i2t) and result[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_identity_features_give_perfect_recall_and_shifted_features_known_recall(tmp_path):
    path, kept = write_coco(tmp_path, [5] * 6)
    image_table = torch.eye(6, 8)
    exact = torch.zeros(200, 8)
    swapped = torch.zeros(200, 8)
    for c in kept:
        i = (c - 100) // 10
        exact[c] = image_table[i]
        swapped[c] = image_table[(i + 1) % 6] + 0.5 * image_table[i]  # nearer the next image than its own
    tok = RecordingTokenizer()
    perfect = evaluate_encoder(StubCLIP(image_table, exact), decode_transform, tok, coco=path,
                               progress=False)["coco"]
    assert all(perfect[f"{d}_R@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    wrong = evaluate_encoder(StubCLIP(image_table, swapped), decode_transform, tok, coco=path, progress=False)["coco"]
    # t2i: the right image comes second; i2t: the 5 captions of the previous image come first, then its own
    assert wrong["t2i_R@1"] == 0.0 and wrong["t2i_R@5"] == 1.0
    assert wrong["i2t_R@1"] == 0.0 and wrong["i2t_R@5"] == 0.0 and wrong["i2t_R@10"] == 1.0


def test_flickr_karpathy_test_split_and_full_token_protocol(tmp_path):
    images = tmp_path / "flickr"
    images.mkdir()
    entries, token_lines = [], []
    for i in range(6):
        code_image(i).save(images / f"{i}.jpg", quality=100)
        split = "test" if i % 2 == 0 else "train"
        entries.append({"filename": f"{i}.jpg", "split": split, "imgid": i,
                        "sentences": [{"raw": f"a sentence {100 + 10 * i + c}", "tokens": []} for c in range(5)]})
        token_lines += [f"{i}.jpg#{c}\ta caption {100 + 10 * i + c}" for c in range(6)]
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    token = tmp_path / "results_20130124.token"
    token.write_text("\n".join(token_lines) + "\n")

    test_split = load_flickr_karpathy(karpathy, images)
    assert [p.name for p in test_split.images] == ["0.jpg", "2.jpg", "4.jpg"] and len(test_split.texts) == 15
    full = load_flickr_token(token, images)
    assert len(full.images) == 6 and len(full.texts) == 30  # every image, first 5 captions
    assert full.texts[:5] == [f"a caption {100 + c}" for c in range(5)]

    image_table = torch.eye(6, 8)
    text_table = torch.zeros(200, 8)
    for c in range(100, 160):
        text_table[c] = image_table[(c - 100) // 10]
    results = evaluate_encoder(StubCLIP(image_table, text_table), decode_transform, RecordingTokenizer(),
                               flickr=karpathy, flickr_images=images, flickr_full_token=token, progress=False)
    assert results["flickr"]["num_images"] == 3 and results["flickr_full"]["num_images"] == 6
    assert results["flickr"]["i2t_R@1"] == 1.0 and results["flickr_full"]["t2i_R@1"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot


def test_class_embedding_is_the_renormalised_mean_of_normalised_template_embeddings(tiny_moe,
                                                                                    transform_and_tokenizer):
    _, tokenizer = transform_and_tokenizer
    classnames = ["red circle", "blue square", "green cross"]
    templates = ["a photo of a {}.", "a drawing of a {}.", lambda c: f"itap of the {c}."]
    weights = zeroshot_classifier(tiny_moe, classnames, templates, tokenizer, batch_size=4, progress=False)
    assert weights.shape == (tiny_moe.config.projection_dim, 3)
    with torch.no_grad():
        for j, name in enumerate(classnames):
            prompts = [f"a photo of a {name}.", f"a drawing of a {name}.", f"itap of the {name}."]
            feats = tiny_moe.get_text_features(input_ids=tokenizer(prompts)).pooler_output
            manual = torch.nn.functional.normalize(torch.nn.functional.normalize(feats, dim=-1).mean(0), dim=-1)
            torch.testing.assert_close(weights[:, j], manual, atol=1e-5, rtol=1e-5)


def make_class_folders(root: Path, codes_per_class: dict[str, list[int]]) -> None:
    for folder, codes in codes_per_class.items():
        (root / folder).mkdir(parents=True)
        for code in codes:
            code_image(code).save(root / folder / f"{code:03d}.png")


def test_zeroshot_accuracy_uses_classnames_and_templates_files(tmp_path):
    root = tmp_path / "zs"
    make_class_folders(root, {"cat": [0, 1], "dog": [2, 3], "emu": [4, 5]})
    (root / "classnames.json").write_text(json.dumps(["c7", "c8", "c9"]))
    (root / "templates.json").write_text(json.dumps(["a photo of {}.", "art of {}"]))
    class_dir = {7: torch.tensor([1.0, 0, 0]), 8: torch.tensor([0, 1.0, 0]), 9: torch.tensor([0, 0, 1.0])}
    image_table = torch.stack([class_dir[7], class_dir[7], class_dir[8], class_dir[8], class_dir[9], class_dir[7]])
    text_table = torch.zeros(10, 3)
    for code, vec in class_dir.items():
        text_table[code] = vec
    tok = RecordingTokenizer()
    result = zeroshot_classification(StubCLIP(image_table, text_table), root, decode_transform, tok, progress=False)
    assert sorted(tok.seen) == sorted(["a photo of c7.", "art of c7", "a photo of c8.", "art of c8",
                                       "a photo of c9.", "art of c9"])
    assert result["top1"] == pytest.approx(5 / 6)
    assert result["per_class"] == {"c7": 1.0, "c8": 1.0, "c9": 0.5}
    assert result["mean_per_class"] == pytest.approx(2.5 / 3)
    assert "top5" not in result and result["num_classes"] == 3 and result["num_images"] == 6


def test_zeroshot_defaults_to_the_80_openai_templates_and_folder_names(tmp_path):
    root = tmp_path / "zs"
    make_class_folders(root, {"class 1": [0], "class 2": [1]})
    assert len(default_templates()) == 80
    tok = RecordingTokenizer()
    table = torch.eye(3)
    result = zeroshot_classification(StubCLIP(table[[1, 2]], table), root, decode_transform, tok, progress=False)
    assert len(tok.seen) == 2 * 80 and "a bad photo of a class 1." in tok.seen
    assert result["top1"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# MMVP-VLM


def write_mmvp(root: Path, rows: list[tuple[int, str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "Questions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question ID", "Type", "Statement"])
        writer.writerows(rows)
    for qid, qtype, _ in rows:
        (root / "MLLM_VLM Images" / qtype).mkdir(parents=True, exist_ok=True)
        code_image(qid, size=32).save(root / "MLLM_VLM Images" / qtype / f"{qid}.jpg", quality=95)


def test_mmvp_pair_is_right_only_when_both_statements_pick_their_own_image(tmp_path):
    types = {1: "Alpha", 2: "Alpha", 3: "Alpha", 4: "Alpha", 5: "Beta", 6: "Beta", 7: "Gamma", 8: "Gamma"}
    write_mmvp(tmp_path / "mmvp", [(q, t, f"thing {q}") for q, t in types.items()])
    e = torch.eye(9, 12)
    text_table = e.clone()
    text_table[4] = e[3]  # pair (3, 4): both statements pick image 3 -> wrong
    text_table[5], text_table[6] = e[6], e[5]  # pair (5, 6): swapped -> wrong
    text_table[7] = e[7] + 0.5 * e[8]  # pair (7, 8): closer to its own image -> right
    tok = RecordingTokenizer()
    result = mmvp_vlm(StubCLIP(e, text_table), tmp_path / "mmvp", decode_transform, tok, progress=False)
    assert all(t.startswith("a photo of thing ") for t in tok.seen) and len(tok.seen) == 8
    assert {k: result[k] for k in ("Alpha", "Beta", "Gamma")} == {"Alpha": 0.5, "Beta": 0.0, "Gamma": 1.0}
    assert result["average"] == pytest.approx(0.5)
    assert result["num_pairs"] == 4 and result["pairs_per_type"] == {"Alpha": 2, "Beta": 1, "Gamma": 1}


def test_mmvp_rejects_unpaired_or_mixed_type_pairs(tmp_path):
    write_mmvp(tmp_path / "a", [(1, "Alpha", "thing 1"), (2, "Beta", "thing 2")])
    with pytest.raises(EvalDataError, match=r"Questions\.csv.*different Types"):
        mmvp_vlm(StubCLIP(torch.eye(3), torch.eye(3)), tmp_path / "a", decode_transform, RecordingTokenizer())
    write_mmvp(tmp_path / "b", [(1, "Alpha", "thing 1"), (2, "Alpha", "thing 2"), (3, "Alpha", "thing 3")])
    with pytest.raises(EvalDataError, match="Question ID 3 has no partner 4"):
        mmvp_vlm(StubCLIP(torch.eye(4), torch.eye(4)), tmp_path / "b", decode_transform, RecordingTokenizer())


# ----------------------------------------------------------------------------------------------------------------
# The Shapes world in one call


def expected_shapes_keys(world: Path) -> set[str]:
    keys = {f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for attribute in ATTRIBUTES:
        keys |= {f"zeroshot/{attribute}/top1", f"zeroshot/{attribute}/mean_per_class"}
        classes = json.loads((world / "encoder_eval" / "zeroshot" / attribute / "classnames.json").read_text())
        if len(classes) > 5:
            keys.add(f"zeroshot/{attribute}/top5")
    with (world / "encoder_eval" / "mmvp_vlm" / "Questions.csv").open() as f:
        keys |= {f"mmvp/{row['Type']}" for row in csv.DictReader(f)}
    return keys | {"mmvp/average"}


def test_shapes_one_call_returns_every_metric_as_a_fraction(world, shapes_metrics, tiny_moe):
    assert set(shapes_metrics) == expected_shapes_keys(world)
    assert "zeroshot/color/top5" in shapes_metrics and len([k for k in shapes_metrics if k.startswith("mmvp/")]) == 7
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in shapes_metrics.values())
    assert not tiny_moe.training  # eval mode restored as it was
    # a model that ranks at random: chance-level numbers, and R@10 over 12 images is well above R@1
    assert shapes_metrics["retrieval/i2t_R@10"] > shapes_metrics["retrieval/i2t_R@1"]


def test_evaluation_restores_training_mode(world, transform_and_tokenizer):
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config()).train()
    result = evaluate_encoder(model, *transform_and_tokenizer, mmvp=world / "encoder_eval" / "mmvp_vlm",
                              progress=False)
    assert model.training and 0.0 <= result["mmvp"]["average"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# Bad layouts name the file they expected


def test_wrong_layouts_name_the_expected_file(tmp_path, world):
    stub = StubCLIP(torch.eye(3), torch.eye(3))
    tok = RecordingTokenizer()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected .*empty/captions\.json \(COCO captions format\)"):
        evaluate_encoder(stub, decode_transform, tok, coco=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"expected .*empty/Questions\.csv"):
        evaluate_encoder(stub, decode_transform, tok, mmvp=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"expected .*empty/encoder_eval"):
        shapes_encoder_tasks(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"class folders .*empty/<class>"):
        zeroshot_classification(stub, tmp_path / "empty", decode_transform, tok)
    with pytest.raises(FileNotFoundError, match=r"expected .*nope\.json"):
        load_flickr_karpathy(tmp_path / "nope.json", tmp_path)

    # an encoder_eval folder that lacks the MMVP questions
    partial = tmp_path / "partial" / "encoder_eval"
    (partial / "retrieval").mkdir(parents=True)
    (partial / "retrieval" / "captions.json").write_text('{"images": [], "annotations": []}')
    (partial / "zeroshot" / "color").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"mmvp_vlm/Questions\.csv \(MMVP-VLM layout\)"):
        shapes_encoder_tasks(tmp_path / "partial")

    bad_csv = tmp_path / "badcsv"
    bad_csv.mkdir()
    (bad_csv / "Questions.csv").write_text("id,kind,text\n1,a,b\n")
    with pytest.raises(EvalDataError, match=r"Questions\.csv: missing columns"):
        mmvp_vlm(stub, bad_csv, decode_transform, tok)
    wrong_json = tmp_path / "wrong.json"
    wrong_json.write_text('{"annotations": []}')
    with pytest.raises(EvalDataError, match=r"wrong\.json: expected COCO captions format"):
        load_coco_captions(wrong_json, tmp_path)

    missing_image = tmp_path / "missing"
    path, _ = write_coco(missing_image, [5, 5])
    (missing_image / "images" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/001\.png"):
        evaluate_encoder(stub, decode_transform, tok, coco=path)


# ----------------------------------------------------------------------------------------------------------------
# `clipmoe eval-encoder`


def test_eval_encoder_help_documents_every_flag(capsys):
    script = eval_encoder
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--coco-captions", "--coco-images", "--flickr-karpathy", "--flickr-images",
                 "--flickr-full-token", "--zeroshot", "--mmvp", "--shapes", "--batch-size", "--bf16", "--device",
                 "--output"):
        assert flag in text
    parser = script.build_parser()
    assert all(action.help for action in parser._actions)


def test_eval_encoder_main_runs_end_to_end_on_the_tiny_world(world, tiny_moe, shapes_metrics, tmp_path, capsys):
    model_dir = tmp_path / "clip-moe"
    tiny_moe.save_pretrained(model_dir)
    out = tmp_path / "metrics.json"
    color = world / "encoder_eval" / "zeroshot" / "color"
    report = eval_encoder.main([
        "--model", str(model_dir), "--shapes", str(world), "--zeroshot", f"colors={color}",
        "--output", str(out), "--device", "cpu", "--num-workers", "0", "--batch-size", "16", "--no-progress"])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == report["metrics"]
    metrics = saved["metrics"]
    shapes_part = {k.removeprefix("shapes/"): v for k, v in metrics.items() if k.startswith("shapes/")}
    assert shapes_part.keys() == shapes_metrics.keys()
    for key, value in shapes_metrics.items():  # the reloaded folder scores exactly as the in-memory model
        assert shapes_part[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["zeroshot/colors/top1"] == pytest.approx(shapes_metrics["zeroshot/color/top1"], abs=1e-6)
    assert saved["details"]["zeroshot/colors"]["num_classes"] == 6
    printed = capsys.readouterr().out
    assert "shapes/retrieval/i2t_R@1" in printed and "zeroshot/colors/top1" in printed


def test_eval_encoder_rejects_flickr_without_images(tmp_path):
    with pytest.raises(SystemExit, match="--flickr-images"):
        eval_encoder.main(["--flickr-karpathy", str(tmp_path / "x.json")])


def test_standard_errors_are_binomial_over_the_right_counts():
    from clipmoe_vlm.evaluation import standard_errors

    results = {
        "retrieval": {"i2t_R@1": 0.5, "t2i_R@1": 0.2, "num_images": 100, "num_texts": 400},
        "zeroshot/color": {"top1": 0.9, "mean_per_class": 0.9, "num_images": 25, "num_classes": 5},
        "mmvp": {"Color": 0.5, "Shape": 1.0, "average": 0.75, "num_pairs": 20,
                 "pairs_per_type": {"Color": 10, "Shape": 10}},
    }
    se = standard_errors(results)
    assert se == pytest.approx({"retrieval/i2t_R@1": 0.05, "retrieval/t2i_R@1": 0.02, "zeroshot/color/top1": 0.06,
                                "mmvp/Color": (0.025) ** 0.5, "mmvp/Shape": 0.0, "mmvp/average": 0.025 ** 0.5 / 2})


def test_shapes_evaluation_reports_standard_errors_and_uses_the_worlds_prompts(world, tiny_moe, transform_and_tokenizer,
                                                                              monkeypatch):
    import clipmoe_vlm.evaluation.encoder as encoder
    from clipmoe_vlm.data.shapes import DEFAULT_CONFIG
    from clipmoe_vlm.data.shapes.encoder_sets import zeroshot_templates

    seen = {}
    original = encoder.zeroshot_classifier

    def spy(model, classnames, templates, *args, **kwargs):
        seen[tuple(classnames)] = list(templates)
        return original(model, classnames, templates, *args, **kwargs)

    monkeypatch.setattr(encoder, "zeroshot_classifier", spy)
    metrics = evaluate_shapes_encoder(tiny_moe, *transform_and_tokenizer, world, batch_size=16, progress=False,
                                      with_standard_errors=True)
    shape_classes = tuple(sorted(DEFAULT_CONFIG.values("shape")))
    assert seen[shape_classes] == zeroshot_templates("shape", DEFAULT_CONFIG)  # "the red {}.", "the blue {}.", ...
    p = metrics["mmvp/Shape"]
    assert metrics["mmvp/Shape/se"] == pytest.approx((p * (1 - p) / 2) ** 0.5)  # the tiny world: 2 pairs per type
    assert {k.removesuffix("/se") for k in metrics if k.endswith("/se")} <= set(metrics)
