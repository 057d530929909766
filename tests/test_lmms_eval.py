"""lmms-eval integration: the `clipmoe_llava` model, the offline tasks, the judge, data preparation, the wrapper.

The end-to-end tests run the real ``python -m lmms_eval --model clipmoe_llava`` CLI on a tiny LLaVA (CLIP-MoE
tower, 2-layer Llama, a locally trained tokenizer) whose language model is wired to answer "yes" to any
prompt, on files written in the official MMBench / MM-Vet / VizWiz formats and converted by
`clipmoe_vlm.lmms.prepare`, so every score is known in advance. MM-Vet is judged by a mock OpenAI-compatible
server on 127.0.0.1.

If the ``lmms_eval.models`` entry point is not installed (pyproject.toml not yet reinstalled), the CLI runs see
it through a throwaway ``*.dist-info`` folder on ``PYTHONPATH`` (importlib.metadata finds distributions on
``sys.path``), which registers exactly the entry point that pyproject declares.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from clipmoe_vlm.lmms import MODEL_CLASS_PATH, MODEL_ID
from conftest import ChatJudge, serve_judge
from clipmoe_vlm.lmms.errors import EvalSetupError
from clipmoe_vlm.lmms.judge import Judge, JudgeConfig, JudgeError, JudgeNotConfigured
from clipmoe_vlm.lmms.prepare import (
    DATA_FILES,
    check_parquet,
    from_shapes,
    mmbench_from_tsv,
    mmvet_from_folder,
    vizwiz_from_json,
)
from clipmoe_vlm.lmms.runner import packaged_tasks

REPO = Path(__file__).resolve().parents[1]
TASKS = ("mmbench_en_dev_local", "mmbench_en_dev_local_gpt", "mmvet_local", "vizwiz_vqa_val_local")
# Known scores of the "yes" model on the fixture data below.
EXPECTED = {
    "mmbench_en_dev_local": ("gpt_eval_score", 50.0),
    "mmbench_en_dev_local_gpt": ("gpt_eval_score", 50.0),
    "mmvet_local": ("gpt_eval_score", 50.0),
    "vizwiz_vqa_val_local": ("exact_match", 0.725),
}
JUDGE_ENV = ("CLIPMOE_JUDGE_BASE_URL", "CLIPMOE_JUDGE_API_KEY", "CLIPMOE_JUDGE_MODEL", "CLIPMOE_JUDGE_TIMEOUT")


# --------------------------------------------------------------------------- tiny model
def _build_llava(folder: Path, answer: str | None = None) -> Path:
    """Save a tiny random LLaVA with a CLIP-MoE tower and a LlavaProcessor. With ``answer``, the language model
    is rewired to reply ``answer`` + EOS to any prompt: attention and MLP outputs are zeroed, so the last hidden
    state is the last token's embedding; embeddings are one-hot "states" and lm_head maps each state to the next
    answer token."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from clipmoe_vlm import CLIPMoEVisionConfig
    from clipmoe_vlm.data.conversation import get_template
    from clipmoe_vlm.data.tokenizer import build_local_tokenizer

    corpus = [get_template("vicuna_v1").system, "USER: ASSISTANT: What is the color of the shape? red blue yes no",
              "There are several options: Answer with the option's letter from the given choices directly.",
              "When the provided information is insufficient, respond with 'Unanswerable'."] * 3
    tokenizer = build_local_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=32, patch_size=8, num_experts=4, top_k=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config).eval()
    if answer is not None:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert len(set(ids)) == len(ids) and tokenizer.convert_tokens_to_ids(":") not in ids
        language_model = model.model.language_model
        with torch.no_grad():
            for layer in language_model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            embeddings = language_model.embed_tokens.weight
            embeddings.zero_()
            embeddings[:, 0] = 1.0
            for state, token in enumerate(ids[:-1], start=1):
                embeddings[token].zero_()
                embeddings[token, state] = 1.0
            model.lm_head.weight.zero_()
            for state, token in enumerate(ids):
                model.lm_head.weight[token, state] = 20.0
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_llava(tmp_path_factory) -> Path:
    return _build_llava(tmp_path_factory.mktemp("random_llava"))


@pytest.fixture(scope="module")
def yes_llava(tmp_path_factory) -> Path:
    return _build_llava(tmp_path_factory.mktemp("yes_llava"), answer="yes")


@pytest.fixture(scope="module")
def lmm(random_llava):
    from clipmoe_vlm.lmms.models.clipmoe_llava import ClipMoELlava

    return ClipMoELlava(pretrained=str(random_llava), device="cpu", batch_size=3)


def _requests(lmm, contexts, visuals, gen_kwargs):
    """Instances as lmms-eval builds them for a simple model, with the docs in ``lmm.task_dict``."""
    docs = [{"images": v} for v in visuals]
    lmm.task_dict = {"t": {"test": docs}}
    return [SimpleNamespace(args=(c, dict(gen_kwargs), lambda d: d["images"], i, "t", "test"))
            for i, c in enumerate(contexts)]


def _image(size=(40, 30), color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


# --------------------------------------------------------------------------- registration and imports
def test_manifest_names_the_model_class():
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest

    from clipmoe_vlm.lmms import model_manifests

    (manifest,) = model_manifests()
    assert isinstance(manifest, ModelManifest)
    assert manifest.model_id == MODEL_ID == "clipmoe_llava" and manifest.simple_class_path == MODEL_CLASS_PATH
    module, name = MODEL_CLASS_PATH.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, lmms) and cls.is_simple


def test_import_stays_light():
    code = ("import sys, clipmoe_vlm, clipmoe_vlm.lmms; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lmms_eval', 'openai')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- model unit tests
def test_image_token_inserted_once_per_image(lmm):
    prompt = lmm.build_prompt("What color?", 1)
    assert prompt.endswith("USER: <image>\nWhat color? ASSISTANT:") and prompt.startswith("A chat between")
    assert lmm.build_prompt("What color?", 2).count("<image>") == 2
    assert lmm.build_prompt("<image>\nWhat color?", 1).count("<image>") == 1  # already there: kept
    assert "<image>" not in lmm.build_prompt("What color?", 0)  # text-only document
    inputs = lmm._encode([lmm.build_prompt("What color?", 1)], [_image()])
    image_id = lmm.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == lmm.model.config.image_seq_length == 16
    assert inputs["input_ids"][0, 0] == lmm.tokenizer.bos_token_id


def test_left_padded_batch_matches_one_by_one_greedy(lmm):
    contexts = ["What color is the shape?", "hi", "Describe every shape you can see in the image, please."]
    visuals = [[_image()], [], [_image((32, 48), (10, 200, 10))]]
    gen = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    batched = lmm.generate_until(_requests(lmm, contexts, visuals, gen))
    assert lmm.batch_size == 3
    single = [lmm.generate_batch([c], [v], gen)[0] for c, v in zip(contexts, visuals)]
    assert batched == single
    ids = lmm._encode([lmm.build_prompt(c, len(v)) for c, v in zip(contexts, visuals)],
                      [i for v in visuals for i in v])["input_ids"]
    assert ids[1, 0] == lmm.tokenizer.pad_token_id  # the short prompt is padded on the left


def test_until_strings_are_applied(yes_llava):
    from clipmoe_vlm.lmms.models.clipmoe_llava import ClipMoELlava

    model = ClipMoELlava(pretrained=str(yes_llava), device="cpu", batch_size=2)  # always answers "yes"
    contexts, visuals = ["What color?", "hi"], [[_image()], []]
    assert model.generate_until(_requests(model, contexts, visuals, {"max_new_tokens": 12})) == ["yes"] * 2
    assert model.generate_until(_requests(model, contexts, visuals, {"max_new_tokens": 12, "until": ["es"]})) == [
        "y"] * 2
    assert model.generate_until(_requests(model, contexts, visuals, {"max_new_tokens": 12, "until": "s"})) == [
        "ye"] * 2
    assert model.generate_until(_requests(model, contexts, visuals, {"until": ["ASSISTANT:", ""]})) == ["yes"] * 2


def test_loglikelihood_matches_manual_computation(lmm, random_llava):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    context, continuation, image = "What color is it?", "red", _image()
    lmm.task_dict = {"t": {"test": [{"img": image}]}}
    request = SimpleNamespace(args=(context, continuation, lambda d: [d["img"]], 0, "t", "test"))
    ((nll, greedy),) = lmm.loglikelihood([request])

    model = LlavaForConditionalGeneration.from_pretrained(random_llava).eval()
    processor = AutoProcessor.from_pretrained(random_llava)
    prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\nWhat color is it? ASSISTANT:")
    from clipmoe_vlm.data.llava_images import expand_to_square

    background = tuple(int(v * 255) for v in processor.image_processor.image_mean)
    inputs = processor(text=[prompt], images=[expand_to_square(image, background)], return_tensors="pt")
    answer = processor.tokenizer(" red", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([inputs["input_ids"], answer], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    log_probs = torch.log_softmax(logits.float(), -1)
    start = inputs["input_ids"].shape[1]
    expected = -sum(log_probs[start - 1 + k, answer[0, k]].item() for k in range(answer.shape[1]))
    assert nll == pytest.approx(expected, rel=1e-4, abs=1e-4) and nll > 0
    assert greedy == all(logits[start - 1 + k].argmax() == answer[0, k] for k in range(answer.shape[1]))


def test_multi_round_feeds_previous_answers(lmm):
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((list(previous_output), round_idx, previous_round_info))
        done = round_idx == 2
        return [], f"round {round_idx}", done, (tuple(previous_output) if done else None), {"r": round_idx}

    lmm.task_dict = {"t": {"test": [{}]}}
    request = SimpleNamespace(args=("round 0", {"max_new_tokens": 3}, lambda d: [_image()], doc_to_text, 0, "t",
                                    "test"))
    (result,) = lmm.generate_until_multi_round([request])
    assert [c[1] for c in calls] == [1, 2] and calls[1][2] == {"r": 1}
    assert len(result) == 2 and list(result) == calls[1][0]


def test_missing_model_folder_is_one_clear_error(tmp_path):
    from clipmoe_vlm.lmms.models.clipmoe_llava import ClipMoELlava

    with pytest.raises(EvalSetupError, match="is not a folder"):
        ClipMoELlava(pretrained=str(tmp_path / "nope"))
    with pytest.raises(EvalSetupError, match="no config.json"):
        ClipMoELlava(pretrained=str(tmp_path))
    with pytest.raises(EvalSetupError, match="unknown model_args"):
        ClipMoELlava(pretrained=str(tmp_path), temperature=1)
    assert not issubclass(EvalSetupError, Exception)  # lmms-eval's `except Exception` cannot swallow it


def test_default_dtype_is_float16_on_gpu_float32_on_cpu(lmm):
    from clipmoe_vlm.lmms.models.clipmoe_llava import resolve_dtype

    assert lmm.model.dtype == torch.float32  # built without dtype, on the CPU
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16  # LLaVA-1.5's evaluation precision
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(EvalSetupError, match=r"dtype='half'; choose auto or one of"):
        resolve_dtype("half", torch.device("cpu"))


def test_original_aspect_ratio_turns_the_processor_padding_off(random_llava):
    """This project's folders save a LlavaImageProcessor(do_pad=True); `original` must reach its resize/crop
    without any padding to a square, `pad` must pad with the mean colour."""
    from transformers import LlavaImageProcessor

    from clipmoe_vlm.data.llava_images import expand_to_square
    from clipmoe_vlm.lmms.models.clipmoe_llava import ClipMoELlava

    model = ClipMoELlava(pretrained=str(random_llava), device="cpu", image_aspect_ratio="original")
    padding = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.processor.image_processor = padding
    model._background = tuple(int(v * 255) for v in padding.image_mean)
    image = _image((64, 24), (200, 30, 30))  # wide: padding changes what the tower sees
    prompt = model.build_prompt("What color?", 1)

    def pixels(aspect):
        return model._encode([prompt], model._prepare_images([image], aspect), aspect)["pixel_values"]

    resized_only = padding(images=[image], do_pad=False, return_tensors="pt")["pixel_values"]
    padded = padding(images=[expand_to_square(image, model._background)], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels("original"), resized_only)
    assert torch.allclose(pixels("pad"), padded)
    assert (pixels("original") - pixels("pad")).abs().max() > 0.5
    # the task's generation_kwargs may choose too; the per-document path used by generate_until agrees
    request = SimpleNamespace(args=("What color?", {}, lambda d: [image], 0, "t", "test"))
    model.task_dict = {"t": {"test": [{}]}}
    assert torch.equal(model._document_inputs(request, "What color?", "original")["pixel_values"], resized_only)


def _open(doc):
    return [doc["image"]] if "image" in doc else [Image.open(io.BytesIO(doc["data"])).convert("RGB")]


def test_bad_image_documents_are_skipped_counted_and_reported(yes_llava, tmp_path):
    from clipmoe_vlm.lmms.models.clipmoe_llava import ClipMoELlava

    report = tmp_path / "report"
    model = ClipMoELlava(pretrained=str(yes_llava), device="cpu", batch_size=2, skipped_report=str(report))
    docs = [{"data": _png()}, {"data": b"not an image"}, {"image": "clip.mp4"}, {"data": _png()},
            {"data": _png()}]  # doc 1 does not decode; doc 2 is a visual this model cannot process
    model.task_dict = {"t": {"val": docs}}
    requests = [SimpleNamespace(args=(f"question {k}?", {"max_new_tokens": 4}, _open, k, "t", "val"))
                for k in range(5)]
    assert model.generate_until(requests) == ["yes", "", "", "yes", "yes"]
    skipped = model.skipped_documents
    assert [(d["task"], d["split"], d["doc_id"]) for d in skipped] == [("t", "val", 1), ("t", "val", 2)]
    assert skipped[0]["error"].startswith("UnidentifiedImageError")
    assert skipped[1]["error"] == "TypeError: clipmoe_llava handles images only; doc_to_visual returned str"
    written = json.loads((report / "clipmoe_skipped.rank0.json").read_text())
    assert written["skipped"] == 2 and [d["doc_id"] for d in written["documents"]] == [1, 2]
    # loglikelihood: the same bad document counts once; its options all get an infinite loss
    options = [SimpleNamespace(args=("question 1?", option, _open, 1, "t", "val")) for option in ("yes", "no")]
    assert model.loglikelihood(options) == [(float("inf"), False)] * 2
    assert len(model.skipped_documents) == 2
    model.clean()  # lmms-eval's last call: the report stays
    assert json.loads((report / "clipmoe_skipped.rank0.json").read_text())["skipped"] == 2


# --------------------------------------------------------------------------- data
def _png(size=(40, 30), color=(10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_official_files(root: Path) -> dict[str, Path]:
    """Four MMBench rows (TSV, base64 images), three MM-Vet items, four VizWiz questions, in the official layouts."""
    image = base64.b64encode(_png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit"
    rows = [(0, "Is there a circle?", "yes", "no", "A"), (1, "Is there a square?", "no", "yes", "B"),
            (2, "Is it red?", "yes", "no", "B"), (3, "Is it blue?", "no", "yes", "A")]
    # the last row refers to row 0's image by index, as some MMBench TSVs do
    lines = [header] + [f"{i}\t{q}\t{'A hint.' if i % 2 else ''}\t{a}\t{b}\t\t\t{ans}\tshape\t"
                        f"{image if i < 3 else '0'}\tx\tcoarse\t\tdev" for i, q, a, b, ans in rows]
    (root / "MMBench_DEV_EN.tsv").write_text("\n".join(lines) + "\n")

    mmvet = root / "mm-vet"
    (mmvet / "images").mkdir(parents=True)
    items = {}
    for k, question in enumerate(["first question?", "second question?", "third question?"]):
        (mmvet / "images" / f"v1_{k}.png").write_bytes(_png(color=(k * 60, 10, 10)))
        items[f"v1_{k}"] = {"imagename": f"v1_{k}.png", "capability": ["rec", "ocr"], "question": question,
                            "answer": "yes<OR>Yes"}
    (mmvet / "mm-vet.json").write_text(json.dumps(items))

    vizwiz = root / "vizwiz"
    (vizwiz / "val").mkdir(parents=True)
    answer_sets = [["yes"] * 10, ["Yes"] * 10, ["no"] * 10, ["yes"] * 3 + ["no"] * 7]
    records = []
    for k, answers in enumerate(answer_sets):
        name = f"VizWiz_val_{k:08d}.jpg"
        (vizwiz / "val" / name).write_bytes(_png(color=(10, k * 60, 10)))
        records.append({"image": name, "question": f"question {k}?", "answer_type": "yes/no", "answerable": 1,
                        "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
    (vizwiz / "val.json").write_text(json.dumps(records))
    return {"tsv": root / "MMBench_DEV_EN.tsv", "mmvet": mmvet, "vizwiz_json": vizwiz / "val.json",
            "vizwiz_images": vizwiz / "val"}


@pytest.fixture(scope="module")
def eval_tree(tmp_path_factory) -> Path:
    """``<tmp>/eval/data``: the converted official-format fixtures, where the packaged task YAMLs look for them
    (``eval/data/`` under the working folder)."""
    root = tmp_path_factory.mktemp("eval_tree")
    official = _write_official_files(root)
    data = root / "eval" / "data"
    mmbench_from_tsv(official["tsv"], data / DATA_FILES["mmbench_en_dev"])
    mmvet_from_folder(official["mmvet"], data / DATA_FILES["mmvet"])
    vizwiz_from_json(official["vizwiz_json"], official["vizwiz_images"], data / DATA_FILES["vizwiz_vqa_val"])
    return root / "eval"


def test_official_formats_convert_to_upstream_columns(eval_tree):
    import datasets

    mmbench = datasets.load_dataset("parquet", data_files={"dev": str(eval_tree / "data" / "mmbench_en_dev.parquet")})
    row = mmbench["dev"][1]
    assert row["index"] == 1 and row["L2-category"] == "coarse" and row["hint"] == "A hint." and row["C"] is None
    assert row["image"].size == (40, 30)
    assert mmbench["dev"][0]["hint"] is None and mmbench["dev"][3]["image"].size == (40, 30)
    vizwiz = datasets.load_dataset("parquet", data_files={"val": str(eval_tree / "data" / "vizwiz_vqa_val.parquet")})
    assert vizwiz["val"][3]["answers"] == ["yes"] * 3 + ["no"] * 7
    mmvet = datasets.load_dataset("parquet", data_files={"test": str(eval_tree / "data" / "mmvet.parquet")})
    assert mmvet["test"][0]["capability"] == "rec,ocr" and mmvet["test"][0]["question_id"] == "v1_0"


def test_shapes_world_files_have_the_upstream_columns(tmp_path):
    paths = from_shapes(tmp_path, n_eval=3, n_mmvet=2, progress=False)
    assert sorted(p.name for p in paths.values()) == sorted(DATA_FILES.values())


def test_parquet_missing_columns_error_names_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipmoe_vlm.lmms.prepare import main as prepare_main
    from clipmoe_vlm.lmms.tasks import vizwiz_process_docs

    path = tmp_path / "mmvet.parquet"
    pq.write_table(pa.table({"question_id": ["1"], "question": ["q"]}), path)
    with pytest.raises(EvalSetupError, match=r"missing column\(s\) image, answer, capability needed by mmvet"):
        check_parquet(path, "mmvet")
    with pytest.raises(EvalSetupError, match="image, answer, capability"):
        prepare_main(["--out_dir", str(tmp_path), "check"])
    docs = SimpleNamespace(column_names=["question_id", "image", "question"], cache_files=[])
    with pytest.raises(EvalSetupError, match=r"missing column\(s\) answers needed by vizwiz_vqa_val"):
        vizwiz_process_docs(docs)


def test_mmbench_submission_survives_control_characters(tmp_path):
    """A random or broken model can emit control characters; upstream's xlsx writer then fails the whole run."""
    import pandas as pd

    from clipmoe_vlm.lmms.tasks import mmbench_aggregate_dev_results_submission

    rows = [{"index": 0, "prediction": "\x17A\x1d", "answer": "A"}]
    mmbench_aggregate_dev_results_submission(rows, SimpleNamespace(output_path=str(tmp_path)))
    frame = pd.read_excel(tmp_path / "submissions" / "mmbench_en_dev_results.xlsx")
    assert frame["prediction"].tolist() == ["A"] and rows[0]["prediction"] == "\x17A\x1d"


# --------------------------------------------------------------------------- judge
class _MockJudge(ChatJudge):
    """MM-Vet: 0.7 for the first question, 0.4 otherwise, when the model said "yes" (0.0 if not); anything else:
    "1.0". Records every prompt."""

    prompts: ClassVar[list[str]] = []

    def reply(self, prompt: str, body: dict) -> str:
        self.prompts.append(prompt)
        last = prompt.strip().splitlines()[-1]
        if "Correctness" in prompt:
            return "0.0" if not last.endswith("| yes |") else ("0.7" if last.startswith("first") else "0.4")
        return "1.0"


@pytest.fixture(scope="module")
def mock_judge():
    with serve_judge(_MockJudge()) as url:
        yield url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_judge_configured_stops_at_once(monkeypatch):
    from clipmoe_vlm.lmms.tasks import mmvet_process_docs

    for name in JUDGE_ENV:
        monkeypatch.delenv(name, raising=False)
    docs = SimpleNamespace(column_names=["question_id", "image", "question", "answer", "capability"], cache_files=[])
    started = time.monotonic()
    with pytest.raises(JudgeNotConfigured, match="needs an LLM judge and none is configured: set CLIPMOE_JUDGE_"):
        mmvet_process_docs(docs)
    assert time.monotonic() - started < 1


def test_unreachable_judge_is_one_line(monkeypatch):
    config = JudgeConfig.from_env({"CLIPMOE_JUDGE_BASE_URL": f"http://127.0.0.1:{_free_port()}/v1/chat/completions",
                                   "CLIPMOE_JUDGE_MODEL": "local-judge"})
    assert config.base_url.endswith("/v1") and config.chat_url.endswith("/v1/chat/completions")
    started = time.monotonic()
    with pytest.raises(JudgeError) as error:
        Judge(config).check()
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert "\n" not in message and "unreachable" in message and "local-judge" in message


def test_judge_scores_mmvet_like_upstream(monkeypatch, mock_judge):
    from clipmoe_vlm.lmms.tasks import mmvet_process_results, parse_judge_score

    monkeypatch.setenv("CLIPMOE_JUDGE_BASE_URL", mock_judge)
    doc = {"question_id": "v1_0", "question": "first question?", "answer": "yes<OR>Yes", "capability": "rec"}
    result = mmvet_process_results(doc, ["yes"])["gpt_eval_score"]
    assert result["score"] == 0.7 and result["pred_answer"] == "yes"
    assert "Ground truth | Prediction | Correctness" in _MockJudge.prompts[-1]
    assert [parse_judge_score(s) for s in ("0.5", "1.0 because", ".3", "2", "n/a")] == [0.5, 1.0, 0.3, None, None]


# --------------------------------------------------------------------------- end to end
def _cli_env(tmp_path: Path, judge_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JUDGE_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if judge_url:
        env.update(CLIPMOE_JUDGE_BASE_URL=judge_url, CLIPMOE_JUDGE_MODEL="mock-judge")
    names = {ep.name for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    if MODEL_ID not in names:  # pyproject's entry point is not installed yet: register it for the subprocess
        shim = tmp_path / "entry_point_shim"
        info = shim / "clipmoe_vlm_lmms_shim-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clipmoe-vlm-lmms-shim\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{MODEL_ID} = clipmoe_vlm.lmms:model_manifests\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    return env


def _scores(results_file: Path) -> dict[str, float]:
    results = json.loads(results_file.read_text())["results"]
    return {task: results[task][f"{metric},none"] for task, (metric, _) in EXPECTED.items() if task in results}


def test_cli_end_to_end_known_scores(tmp_path, yes_llava, eval_tree, mock_judge):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "clipmoe_llava",
               "--model_args", f"pretrained={yes_llava},device=cpu", "--tasks", ",".join(TASKS),
               "--batch_size", "2", "--limit", "4",
               "--gen_kwargs", "max_new_tokens=8", "--output_path", str(output), "--log_samples"]
    _MockJudge.prompts.clear()
    # the tasks packaged in clipmoe_vlm.lmms.tasks, reading eval/data/ under the working folder
    command += ["--include_path", str(packaged_tasks())]
    run = subprocess.run(command, check=False, cwd=eval_tree.parent, env=_cli_env(tmp_path, mock_judge),
                         capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = [p for p in output.rglob("*_results.json") if p.parent.name != "submissions"]
    assert _scores(results_file) == pytest.approx({task: value for task, (_, value) in EXPECTED.items()})
    assert json.loads(results_file.read_text())["results"]["mmvet_local"]["unjudged,none"] == 0
    samples = [json.loads(line) for line in next(output.rglob("*_samples_vizwiz_vqa_val_local.jsonl")).open()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    assert {s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
            for s in samples} == {"yes"}
    # one check per judged task at load, three MM-Vet answers; MMBench's "yes" answers parse without the judge
    assert sum("Correctness" in p for p in _MockJudge.prompts) == 3


def test_wrapper_two_processes_match_one(tmp_path, yes_llava, eval_tree, mock_judge, monkeypatch):
    """`scripts/eval_lmms.py --num_processes 2` (torchrun, gloo on CPU): documents split over two ranks, same
    scores as the single-process run above, one summary JSON."""
    from clipmoe_vlm.lmms.runner import main

    env = _cli_env(tmp_path, mock_judge)
    for name in JUDGE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    summary = tmp_path / "summary.json"
    code = main([str(yes_llava), "--tasks", "mmbench_en_dev_local,mmvet_local,vizwiz_vqa_val_local",
                 "--data_dir", str(eval_tree / "data"), "--output_path", str(tmp_path / "out"),
                 "--summary_json", str(summary), "--device", "cpu", "--gen_kwargs", "max_new_tokens=8",
                 "--num_processes", "2", "--no_log_samples"])
    report = json.loads(summary.read_text())
    assert code == 0 and report["ok"], report
    for task, entry in report["tasks"].items():
        assert entry["status"] == "ok" and entry["n"] == (3 if task == "mmvet_local" else 4)
        assert entry["value"] == pytest.approx(EXPECTED[task][1]) and entry["skipped"] == 0
    assert report["tasks"]["mmvet_local"]["unjudged"] == 0 and report["skipped_documents"] == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("clipmoe_skipped.rank*.json")) == [
        "clipmoe_skipped.rank0.json", "clipmoe_skipped.rank1.json"]
    assert "torch.distributed.run" in report["command"]


def test_wrapper_exits_nonzero_when_a_document_is_skipped(tmp_path, yes_llava, eval_tree, monkeypatch):
    """A VizWiz row whose image bytes are not an image (written past the preparation checks): the real lmms-eval
    run completes, that document is answered "" and scored 0, and the wrapper exits 1 naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipmoe_vlm.lmms.runner import main

    table = pq.read_table(str(eval_tree / "data" / "vizwiz_vqa_val.parquet"))
    images = table.column("image").to_pylist()
    images[1] = {"bytes": b"not an image", "path": images[1]["path"]}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, table.schema.field("image"), pa.array(images, table.schema.field(
        "image").type)), str(data_dir / "vizwiz_vqa_val.parquet"))
    for name in JUDGE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in _cli_env(tmp_path, None).items():
        monkeypatch.setenv(name, value)
    summary = tmp_path / "summary.json"
    code = main([str(yes_llava), "--tasks", "vizwiz_vqa_val_local", "--data_dir", str(data_dir), "--output_path",
                 str(tmp_path / "out"), "--summary_json", str(summary), "--device", "cpu", "--batch_size", "2",
                 "--gen_kwargs", "max_new_tokens=8", "--no_log_samples"])
    report = json.loads(summary.read_text())
    entry = report["tasks"]["vizwiz_vqa_val_local"]
    assert code == 1 and report["lmms_eval_returncode"] == 0 and not report["ok"]
    assert report["skipped_documents"] == 1 and entry["skipped"] == 1 and entry["n"] == 4
    assert [(d["task"], d["doc_id"]) for d in report["skipped"]] == [("vizwiz_vqa_val_local", 1)]
    assert report["skipped"][0]["error"].startswith("UnidentifiedImageError")
    assert entry["value"] == pytest.approx(0.725 - 0.25)  # document 1 ("Yes" x 10) now scores 0
    assert entry["status"] == "failed: 1 document(s) skipped (unreadable input; --allow_skipped accepts)"


def test_wrapper_fails_before_launch_without_judge(tmp_path, yes_llava, eval_tree, monkeypatch):
    from clipmoe_vlm.lmms.runner import main

    for name in JUDGE_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JudgeNotConfigured, match="mmvet_local needs an LLM judge"):
        main([str(yes_llava), "--data_dir", str(eval_tree / "data"), "--output_path", str(tmp_path)])
    with pytest.raises(EvalSetupError, match="is not a folder"):
        main([str(tmp_path / "nope"), "--data_dir", str(eval_tree / "data"), "--output_path", str(tmp_path)])


def test_wrapper_summary_flags_missing_tasks(tmp_path):
    from clipmoe_vlm.lmms.runner import summarize

    results = tmp_path / "x_results.json"
    results.write_text(json.dumps({"results": {"vizwiz_vqa_val_local": {"exact_match,none": 0.5},
                                               "mmvet_local": {"gpt_eval_score,none": None}},
                                   "n-samples": {"vizwiz_vqa_val_local": {"effective": 4}}}))
    summary = summarize(results, ["vizwiz_vqa_val_local", "mmvet_local", "mmbench_en_dev_local"])
    assert summary["vizwiz_vqa_val_local"] == {"metric": "exact_match", "value": 0.5, "n": 4, "status": "ok"}
    assert summary["mmvet_local"]["status"] == "failed: no numeric score"
    assert summary["mmbench_en_dev_local"]["status"] == "failed: no results"
    assert summarize(None, ["mmvet_local"])["mmvet_local"]["status"] == "failed: no results"


@pytest.mark.slow
def test_cli_without_judge_exits_nonzero_with_one_line(tmp_path, yes_llava, eval_tree):
    command = [sys.executable, "-m", "lmms_eval", "--model", "clipmoe_llava",
               "--model_args", f"pretrained={yes_llava},device=cpu", "--tasks", "mmvet_local",
               "--limit", "1", "--output_path", str(tmp_path / "out"), "--include_path", str(packaged_tasks())]
    run = subprocess.run(command, check=False, cwd=eval_tree.parent, env=_cli_env(tmp_path, None),
                         capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("mmvet_local needs an LLM judge and none is configured")


@pytest.mark.slow
def test_two_processes_random_model_same_predictions(tmp_path, random_llava, eval_tree, mock_judge, monkeypatch):
    """A random model (answers differ per document): per-document answers and scores of a two-process run equal
    the single-process ones."""
    from clipmoe_vlm.lmms.runner import main

    for name in JUDGE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in _cli_env(tmp_path, mock_judge).items():
        monkeypatch.setenv(name, value)
    answers, scores = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        code = main([str(random_llava), "--data_dir", str(eval_tree / "data"), "--output_path", str(out),
                     "--device", "cpu", "--gen_kwargs", "max_new_tokens=6", "--num_processes", str(processes),
                     "--batch_size", "2"])
        assert code == 0
        report = json.loads((out / "summary.json").read_text())
        scores[processes] = {task: entry["value"] for task, entry in report["tasks"].items()}
        answers[processes] = {
            (path.name.split("_samples_")[1], s["doc_id"]): str(s["filtered_resps"])
            for path in out.rglob("*_samples_*.jsonl") for s in map(json.loads, path.open())
        }
    assert answers[1] == answers[2] and len(answers[1]) == 11
    assert scores[1] == scores[2]
