"""Routing analysis of a tiny random CLIP-MoE over a tiny Shapes world: the collected router logits are the model's,
the statistics match hand computations, the plots and summaries are written; `clipmoe analyze-routing`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from clipmoe_cli import analyze_routing as routing_command
from clipmoe_vlm.evaluation import (
    TowerRouting,
    analyze_routing,
    collect_routing,
    default_map_layers,
    routing_summary,
    text_token_mask,
)
from clipmoe_vlm.loading import tiny_clip_config
from clipmoe_vlm.losses import expert_load
from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer
from upcycle import sparse_upcycle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(world, tiny_moe):
    rows = [json.loads(line) for line in (world / "clip_train" / "captions.jsonl").read_text().splitlines()][:5]
    images = [Image.open(world / "clip_train" / r["image"]).convert("RGB") for r in rows]
    captions = [r["caption"] for r in rows]
    config = tiny_moe.config
    transform = clip_image_transform(config.vision_config.image_size)
    tokenizer = open_clip_tokenizer(config.text_config.max_position_embeddings)
    return images, captions, transform, tokenizer


def test_collected_router_logits_are_the_models_own(tiny_moe, inputs):
    images, captions, transform, tokenizer = inputs
    pixels = torch.stack([transform(im) for im in images])
    ids = tokenizer(captions)
    routing = collect_routing(tiny_moe, pixels, ids, batch_size=2, progress=False)  # batches of 2, 2, 1
    with torch.no_grad():
        out = tiny_moe(input_ids=ids, pixel_values=pixels, output_router_logits=True)
    for name, reference in (("vision", out.image_router_logits), ("text", out.text_router_logits)):
        r = routing[name]
        assert r.layers == list(range(len(reference))) and r.num_experts == 4 and r.top_k == 2
        for i, logits in enumerate(reference):
            torch.testing.assert_close(r.logits[i].reshape(-1, 4), logits, atol=1e-5, rtol=1e-5)
    assert routing["vision"].mask.all()
    assert routing["text"].mask.sum() == int(sum(len(tokenizer([c])[0].nonzero()) for c in captions))


def test_statistics_match_hand_computations():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 5, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    r = TowerRouting("text", [0, 2, 5], logits, mask, top_k=2, num_experts=5)
    load = r.load()
    torch.testing.assert_close(load.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(load, expert_load(logits.reshape(3, 24, 5), 2, mask.float()))
    counts = torch.zeros(3, 5)
    for layer in range(3):
        for idx in logits[layer][mask].topk(2, dim=-1).indices.reshape(-1):
            counts[layer, idx] += 1
    torch.testing.assert_close(load, counts / counts.sum(dim=1, keepdim=True))
    p = logits[:, mask].softmax(dim=-1)
    torch.testing.assert_close(r.entropy(), -(p * p.log()).sum(-1).mean(-1))
    assert all(0 <= h <= math.log(5) for h in r.entropy().tolist())
    top1 = logits[:, mask].argmax(dim=-1)
    assert r.top1_change() == pytest.approx([(top1[0] != top1[1]).float().mean().item(),
                                              (top1[1] != top1[2]).float().mean().item()])
    summary = routing_summary({"text": r})["towers"]["text"]
    assert summary["num_tokens"] == 21 and [c["to_layer"] for c in summary["top1_change"]] == [2, 5]
    with pytest.raises(ValueError, match=r"layer 1 is not an MoE layer .* \[0, 2, 5\]"):
        r.layer_position(1)


def test_text_token_mask_stops_at_end_of_text():
    ids = torch.tensor([[49406, 320, 0, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(text_token_mask(ids, eos_token_id=2), expected)  # "!" (id 0) inside a caption is kept
    assert torch.equal(text_token_mask(torch.tensor([[5, 9, 7, 7]]), eos_token_id=9),
                       torch.tensor([[True, True, False, False]]))


def test_default_map_layers_are_evenly_spaced():
    assert default_map_layers([0, 1, 2]) == [0, 1, 2]
    assert default_map_layers(list(range(24))) == [0, 8, 15, 23]


def test_analyze_routing_writes_plots_and_summaries(tiny_moe, inputs, tmp_path):
    images, captions, transform, tokenizer = inputs
    summary = analyze_routing(tiny_moe, images, transform, tmp_path, captions=captions, tokenizer=tokenizer,
                              layers=[0, 3], num_maps=3, progress=False)
    files = {name: Path(path) for name, path in summary["files"].items()}
    assert set(files) == {"expert_usage", "patch_experts", "summary", "routing_json"}
    with Image.open(files["expert_usage"]) as heatmap:
        assert heatmap.format == "PNG" and heatmap.width >= 300 and heatmap.height >= 150
    with Image.open(files["patch_experts"]) as maps:
        assert maps.format == "PNG" and maps.width >= 300 and maps.height >= 3 * 100  # 3 rows of images
        assert maps.width < 3 * maps.height  # 3 columns (image + 2 layers), 3 rows
    saved = json.loads(files["routing_json"].read_text())
    assert saved["num_images"] == 5 and saved["num_captions"] == 5 and saved["map_layers"] == [0, 3]
    for name, layers in (("vision", 4), ("text", 3)):
        tower = saved["towers"][name]
        assert len(tower["load"]) == layers and all(len(row) == 4 for row in tower["load"])
        assert all(sum(row) == pytest.approx(1.0, abs=1e-4) for row in tower["load"])
        assert all(0 <= h <= tower["max_entropy"] + 1e-6 for h in tower["entropy"])
        assert all(0 <= c["fraction"] <= 1 for c in tower["top1_change"]) and len(tower["top1_change"]) == layers - 1
    assert saved["towers"]["vision"]["num_tokens"] == 5 * (1 + (64 // 8) ** 2)
    text = files["summary"].read_text()
    assert "vision tower: 4 MoE layers, 4 experts, top-2" in text and "text tower: 3 MoE layers" in text


def test_analyze_routing_rejects_dense_models_and_non_moe_layers(inputs, tmp_path):
    images, _, transform, _ = inputs
    torch.manual_seed(0)
    dense = CLIPModel(tiny_clip_config())
    with pytest.raises(TypeError, match="needs a CLIP-MoE model"):
        analyze_routing(dense, images, transform, tmp_path)
    every_other = sparse_upcycle(dense, num_experts=2, top_k=1, moe_layers={"vision": [1, 3], "text": [0]}).eval()
    with pytest.raises(ValueError, match=r"layer 0 is not an MoE layer of the vision tower; MoE layers: \[1, 3\]"):
        analyze_routing(every_other, images, transform, tmp_path, layers=[0], progress=False)


# ----------------------------------------------------------------------------------------------------------------
# `clipmoe analyze-routing`


def test_analyze_routing_help_documents_every_flag(capsys):
    script = routing_command
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--images", "--captions", "--num-images", "--layers", "--output"):
        assert flag in text
    assert all(action.help for action in script.build_parser()._actions)


@pytest.fixture(scope="module")
def model_dir(tiny_moe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip-moe")
    tiny_moe.save_pretrained(folder)
    return folder


def test_analyze_routing_main_on_a_jsonl_and_on_a_folder(world, model_dir, tmp_path, capsys):
    script = routing_command
    out = tmp_path / "jsonl"
    summary = script.main(["--model", str(model_dir), "--images", str(world / "clip_train" / "captions.jsonl"),
                           "--num-images", "4", "--num-maps", "2", "--output", str(out), "--device", "cpu",
                           "--no-progress"])
    assert summary["num_images"] == 4 and summary["num_captions"] == 4  # captions taken from the JSONL
    for name in ("expert_usage.png", "patch_experts.png", "routing.json", "summary.txt"):
        assert (out / name).is_file()
    assert "vision tower" in capsys.readouterr().out

    out = tmp_path / "folder"
    summary = script.main(["--model", str(model_dir), "--images", str(world / "encoder_eval" / "retrieval" / "images"),
                           "--captions", str(world / "clip_train" / "captions.jsonl"), "--num-images", "3",
                           "--layers", "1", "2", "--output", str(out), "--no-progress"])
    assert summary["num_images"] == 3 and summary["num_captions"] == 3 and summary["map_layers"] == [1, 2]
    assert set(json.loads((out / "routing.json").read_text())["towers"]) == {"vision", "text"}


def test_analyze_routing_main_rejects_bad_layers_and_inputs(world, model_dir, tmp_path):
    script = routing_command
    images = str(world / "clip_train" / "captions.jsonl")
    with pytest.raises(SystemExit, match=r"--layers \[7\]: not MoE layers .* \[0, 1, 2, 3\]"):
        script.main(["--model", str(model_dir), "--images", images, "--layers", "7", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected a folder of images or a .jsonl file"):
        script.main(["--model", str(model_dir), "--images", str(world / "manifest.json"), "--output", str(tmp_path)])


# bad inputs through the `clipmoe` dispatcher: one "error:" line naming the file, exit status 2
def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_analyze_routing_names_an_empty_jsonl(model_dir, tmp_path, capsys, monkeypatch):
    from clipmoe_cli.main import main

    monkeypatch.delenv("CLIPMOE_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["pytest"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["analyze-routing", "--model", str(model_dir), "--images", str(empty), "--output",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: --images {empty}: the file has no lines (expected JSONL with an "
                                       "\"image\" per line)\n")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    assert main(["analyze-routing", "--model", str(model_dir), "--images", str(folder), "--captions", str(empty),
                 "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: --captions {empty}: the file has no lines (expected JSONL with a "
                                       "\"caption\" per line)\n")
    assert not (tmp_path / "out").exists()


def test_analyze_routing_names_a_truncated_image(world, model_dir, tmp_path, capsys, monkeypatch):
    from clipmoe_cli.main import main

    monkeypatch.delenv("CLIPMOE_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["pytest"])
    # importing lmms-eval (other tests do) sets PIL's LOAD_TRUNCATED_IMAGES for the whole process
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", False)
    rows = [json.loads(line) for line in (world / "clip_train" / "captions.jsonl").read_text().splitlines()][:3]
    for row in rows:
        (tmp_path / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row["image"]).write_bytes((world / "clip_train" / row["image"]).read_bytes())
    broken = _truncated_copy(world / "clip_train" / rows[1]["image"], tmp_path / rows[1]["image"])
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["analyze-routing", "--model", str(model_dir), "--images", str(jsonl), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err  # before the error: transformers' "Loading weights" progress bar
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.splitlines()[-1] == (f"error: --images {jsonl}: image {broken} cannot be read: image file is "
                                    "truncated")
    assert not (tmp_path / "out").exists()


def test_library_names_a_lazily_opened_truncated_image(tiny_moe, world, tmp_path, monkeypatch):
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", False)  # see the test above
    source = world / "clip_train" / json.loads((world / "clip_train" / "captions.jsonl").read_text()
                                               .splitlines()[0])["image"]
    broken = _truncated_copy(source, tmp_path / "broken.png")
    transform = clip_image_transform(tiny_moe.config.vision_config.image_size)
    pattern = rf"analyze_routing: image 1 \({broken}\) cannot be read: "
    # PIL decodes only when the pixels are needed: the truncation shows inside analyze_routing
    with Image.open(source) as good, Image.open(broken) as lazy, pytest.raises(ValueError, match=pattern):
        analyze_routing(tiny_moe, [good.convert("RGB"), lazy], transform, tmp_path / "out", progress=False)
