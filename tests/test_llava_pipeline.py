"""LLaVA-1.5 pipeline with the CLIP-MoE tower: builder, trainable sets, LoRA/QLoRA, merge, resume, end-to-end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VISION
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

import clipmoe_vlm  # noqa: F401  (registers the CLIP-MoE classes)
from clipmoe_vlm import CLIPMoEVisionModel
from clipmoe_vlm.data.tokenizer import build_local_tokenizer
from clipmoe_vlm.llava import build_llava
from clipmoe_vlm.llava.inference import answer_questions, build_prompt
from clipmoe_vlm.llava.lora import QUANT_SKIP_MODULES, apply_lora, load_lora_llava, merge_lora, save_lora
from clipmoe_vlm.llava.trainable import configure_trainable, tower_layers_in_use, trainable_parameter_names
from clipmoe_vlm.modeling_clip_moe import tower_aux_loss

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle is left of a blue square", "what color is the circle?", "the circle is red",
         "how many shapes are there?", "there are two shapes", "describe the image briefly"] * 8
NUM_PATCHES = (32 // 8) ** 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one BLAS thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer():
    return build_local_tokenizer(TEXTS, vocab_size=300)


def _llama(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def moe_tower():
    from upcycle import sparse_upcycle

    torch.manual_seed(0)
    dense = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    return sparse_upcycle(dense, num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, moe_tower):
    """A saved tiny LLaVA folder (CLIP-MoE tower + tiny Llama), with its processor."""
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model, processor = build_llava(moe_tower, _llama(len(tokenizer)), tokenizer)
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _inputs(processor, n=2, question="what color is the circle?"):
    images = [Image.new("RGB", (40, 30 + 4 * i), (200, 30 * i, 10)) for i in range(n)]
    prompts = [build_prompt(question)] * n
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


# --------------------------------------------------------------------------- builder
def test_builder_round_trip(moe_tower, tmp_path):
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model, processor = build_llava(moe_tower, _llama(len(tokenizer)), tokenizer)
    assert isinstance(model.model.vision_tower, CLIPMoEVisionModel)
    assert model.config.image_seq_length == NUM_PATCHES
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_processor.do_pad and processor.image_processor.crop_size["height"] == 32
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.model.vision_tower, CLIPMoEVisionModel)
    inputs = _inputs(processor)
    again = _inputs(loaded_processor)
    for key in inputs:
        torch.testing.assert_close(inputs[key], again[key])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * NUM_PATCHES
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert loaded_processor.tokenizer.chat_template == processor.tokenizer.chat_template


def test_builder_adds_image_token_and_qwen2_and_dense_tower(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    qwen = Qwen2Config(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    from clipmoe_vlm.loading import tiny_clip_config

    dense = CLIPModel(tiny_clip_config(image_size=32, patch_size=8, width=32, layers=2, text_layers=1,
                                       vocab_size=50, context_length=8))
    dense.save_pretrained(tmp_path / "clip")
    model, processor = build_llava(tmp_path / "clip", qwen, tokenizer)
    assert type(model.model.vision_tower) is CLIPVisionModel
    assert model.config.image_token_id == 6 and model.get_input_embeddings().weight.shape[0] == 7
    assert tokenizer.pad_token == "<unk>"
    out = model(**_inputs(processor, n=1, question="a b"))
    assert out.logits.shape[-1] == 7


def test_projector_hidden_size_mismatch_is_one_clear_error(moe_tower):
    tokenizer = _tokenizer()
    wrong = {"linear_1.weight": torch.zeros(32, 48), "linear_1.bias": torch.zeros(32),
             "linear_2.weight": torch.zeros(32, 32), "linear_2.bias": torch.zeros(32)}
    with pytest.raises(ValueError, match="vision tower's hidden_size is 32"):
        build_llava(moe_tower, _llama(len(tokenizer)), tokenizer, projector=wrong)
    with pytest.raises(ValueError, match="projector must be one of"):
        build_llava(moe_tower, _llama(len(tokenizer)), tokenizer, projector="linear")


def test_pretrained_projector_in_llava_layout_loads(moe_tower):
    tokenizer = _tokenizer()
    torch.manual_seed(1)
    state = {"model.mm_projector.0.weight": torch.randn(32, 32), "model.mm_projector.0.bias": torch.randn(32),
             "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)}
    model, _ = build_llava(moe_tower, _llama(len(tokenizer)), tokenizer, projector=state)
    assert torch.equal(model.model.multi_modal_projector.linear_2.bias, state["model.mm_projector.2.bias"])


# --------------------------------------------------------------------------- trainable sets
def _names(model, group_filter):
    return sorted(n for n, _ in model.named_parameters() if group_filter(n))


def test_trainable_sets_per_stage(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    projector = _names(model, lambda n: n.startswith("model.multi_modal_projector."))
    assert len(projector) == 4
    lm = _names(model, lambda n: n.startswith(("model.language_model.", "lm_head.")))
    routers = _names(model, lambda n: n.startswith("model.vision_tower.") and n.endswith(".mlp.gate.weight"))
    experts = _names(model, lambda n: ".mlp.experts." in n)
    assert len(routers) == 3 and len(experts) == 3 * 4

    assert configure_trainable(model, "pretrain") == projector
    assert trainable_parameter_names(model) == projector
    assert configure_trainable(model, "finetune") == sorted(projector + lm)
    # LLaVA-1.5 reads the penultimate layer's output: the last layer's routers and experts would get no gradient
    assert model.config.vision_feature_layer == -2 and tower_layers_in_use(model.config) == 2
    in_use = [n for n in routers + experts if ".layers.2." not in n]
    assert len(in_use) == 2 + 2 * 4
    assert configure_trainable(model, "pretrain", train_router=True) == sorted(
        projector + [n for n in routers if n in in_use])
    assert configure_trainable(model, "finetune", train_router=True, train_experts=True) == sorted(
        projector + lm + in_use)
    model.config.vision_feature_layer = -1  # the last layer's output: every layer is in use
    assert configure_trainable(model, "pretrain", train_router=True, train_experts=True) == sorted(
        projector + routers + experts)
    model.config.vision_feature_layer = 0  # the embeddings: no MoE layer is in use
    with pytest.raises(ValueError, match=r"--train-router: the vision tower's MoE layers all come after the layer "
                                         r"the projector reads \(--vision-feature-layer 0\)"):
        configure_trainable(model, "finetune", train_router=True)
    model.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="LoRA applies to the finetune stage"):
        configure_trainable(model, "pretrain", lora=True)

    peft_model = apply_lora(model, r=4, alpha=8)
    names = configure_trainable(peft_model, "finetune", lora=True)
    lora = [n for n in names if ".lora_" in n]
    assert names == sorted(lora + ["base_model.model." + n for n in projector])
    # LoRA only on the language model's linear layers: 2 layers x 7 projections x (A, B)
    assert len(lora) == 2 * 7 * 2
    assert all(".language_model." in n for n in lora)
    assert not any(".lora_" in n for n, _ in peft_model.named_parameters()
                   if ".vision_tower." in n or ".multi_modal_projector." in n)


def test_text_only_batch_uses_tower_and_projector_without_routing_stats(llava_dir, tmp_path):
    from transformers import TrainingArguments

    from clipmoe_vlm.llava.trainer import LlavaTrainer

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    configure_trainable(model, "finetune", train_router=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = LlavaTrainer(model=model, args=args, aux_loss=True)
    model.train()
    ids = processor.tokenizer(["name two colors. red, blue"], return_tensors="pt")["input_ids"]
    loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    # the dummy image reaches the projector and routers (zero gradient, but part of the graph) ...
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    assert model.model.vision_tower.encoder.layers[0].mlp.gate.weight.grad is not None
    # ... and is not part of the routing statistics: no aux loss was recorded for it
    assert trainer._running["aux_loss"] == [] and len(trainer._running["lm_loss"]) == 1
    model.zero_grad()
    inputs = _inputs(processor)
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    trainer.compute_loss(model, {**inputs, "labels": labels}).backward()
    assert len(trainer._running["aux_loss"]) == 1 and trainer._running["aux_loss"][0] > 0
    assert model.model.vision_tower.encoder.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    # the router losses cover the layers whose output the projector reads (not the last: vision_feature_layer -2)
    layers = model.model.vision_tower.encoder.layers
    assert not layers[2].mlp.gate.weight.requires_grad and layers[2].mlp.gate.weight.grad is None
    with torch.no_grad():
        tower_out = model.model.vision_tower(inputs["pixel_values"], output_router_logits=True)
    assert len(tower_out.router_logits) == 3
    expected = tower_aux_loss(tower_out.router_logits[:2], model.model.vision_tower.config)
    assert trainer._running["aux_loss"][0] == pytest.approx(float(expected), rel=1e-5)
    assert float(tower_out.aux_loss) != pytest.approx(float(expected), rel=1e-3)  # the last layer's part differs


def test_router_training_on_dense_tower_is_an_error(tmp_path):
    tokenizer = _tokenizer()
    dense = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    model, _ = build_llava(dense, _llama(len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match="--train-router: the vision tower has no MoE router"):
        configure_trainable(model, "finetune", train_router=True)


# --------------------------------------------------------------------------- LoRA / QLoRA / merge
def test_lora_training_step_touches_no_tower_or_projector_base_weights(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = apply_lora(model, r=4, alpha=8)
    configure_trainable(peft_model, "finetune", lora=True)
    inputs = _inputs(processor)
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        peft_model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in peft_model.named_parameters()
             if ".lora_" not in n}
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        # the projector trains (its own group); the tower and the base LM must not move
        assert changed == name.startswith("model.multi_modal_projector."), name


def test_qlora_leaves_tower_and_projector_unquantized(llava_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from clipmoe_vlm.llava.lora import quantization_config

    assert QUANT_SKIP_MODULES == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    for bits in (4, 8):
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                llava_dir, quantization_config=quantization_config(bits), device_map={"": "cpu"})
        except (RuntimeError, ImportError, ValueError) as error:  # pragma: no cover - depends on the bnb build
            pytest.skip(f"bitsandbytes {bnb.__version__} cannot load {bits}-bit weights on this machine: {error}")
        quantized = [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        assert len(quantized) == 2 * 7, quantized  # every LM linear layer
        assert all(n.startswith("model.language_model.") for n in quantized)
        assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
                       for n, m in model.named_modules()
                       if n.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head")))
        assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32


def test_merge_equals_adapter_plus_base(llava_dir, tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    configure_trainable(peft_model, "finetune", lora=True)
    torch.manual_seed(3)
    with torch.no_grad():  # move LoRA B away from zero and the projector away from its base values
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    save_lora(peft_model, tmp_path / "lora", base_folder=llava_dir)
    processor.save_pretrained(tmp_path / "lora")
    inputs = _inputs(processor)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    adapter, _ = load_lora_llava(tmp_path / "lora")
    merged_dir = merge_lora(tmp_path / "lora", tmp_path / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert (merged_dir / "README.md").is_file()
    assert AutoProcessor.from_pretrained(merged_dir).tokenizer.image_token == "<image>"
    with torch.no_grad():
        torch.testing.assert_close(adapter(**inputs).logits, expected)
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        base = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()(**inputs).logits
    assert not torch.allclose(base, expected)


# --------------------------------------------------------------------------- DeepSpeed configs
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_configs_have_no_optimizer_or_scheduler(name):
    config = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"]["stage"] == int(name[-1])
    assert config["train_micro_batch_size_per_gpu"] == "auto"


def test_llava_yaml_configs_and_presets_parse(tmp_path):
    from clipmoe_vlm.llava.train import PRESETS, load_config
    from clipmoe_vlm.run_config import ConfigError

    files = sorted((REPO / "configs" / "llava").glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_config(["--config", str(path)])
        assert cfg.stage in ("pretrain", "finetune"), path
    full = load_config(["--config", str(REPO / "configs" / "llava" / "finetune.yaml")])
    assert (full.optim.learning_rate, full.run.deepspeed, full.data.group_by_modality_length) == (
        2e-5, "configs/deepspeed/zero3.json", True)  # flat LLaVA-style keys land in their sections
    assert set(PRESETS) == {"pretrain-cpu", "finetune-cpu", "finetune-lora-cpu"}
    lora = load_config(["--preset", "finetune-lora-cpu", "--lora-r", "8"])  # a flag overrides the preset
    assert (lora.tuning.lora, lora.tuning.lora_r, lora.tuning.lora_alpha, lora.run.torch_threads) == (True, 8, 32, 1)
    finetune = load_config(["--preset", "finetune-cpu"])
    assert (finetune.optim.learning_rate, finetune.optim.num_train_epochs) == (1e-3, 6.0)
    nested = tmp_path / "nested.yaml"
    nested.write_text("stage: finetune\noptim:\n  learning_rate: 3e-5\ntuning:\n  lora: true\n")
    cfg = load_config(["--config", str(nested)])
    assert (cfg.optim.learning_rate, cfg.tuning.lora) == (3e-5, True)
    nested.write_text("optim:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"nested\.yaml: learning_rate: must be float or null, got 'fast'"):
        load_config(["--config", str(nested)])


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from clipmoe_vlm.data.shapes import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, n_train=2, n_pretrain=16, n_instruct=12, n_eval=2, n_mmvet=1, n_retrieval=1,
                   n_zeroshot_per_class=1, n_mmvp_pairs=1, image_size=32, progress=False)
    return root


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A stand-in for runs/clip-moe: a tiny CLIP upcycled to a CLIP-MoE folder."""
    from clipmoe_vlm.loading import tiny_clip_config
    from upcycle import sparse_upcycle

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip-moe")
    config = tiny_clip_config(image_size=32, patch_size=8, width=32, layers=3, text_layers=1, vocab_size=64,
                              context_length=8)
    sparse_upcycle(CLIPModel(config), num_experts=4, top_k=2).save_pretrained(folder)
    return folder


def _common(world, out, *extra):
    return ["--image-folder", str(world / "llava"), "--per-device-train-batch-size", "4", "--logging-steps", "1",
            "--tiny-lm-hidden-size", "32", "--tiny-vocab-size", "400", "--model-max-length", "320",
            "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def pretrained(tiny_world, tower_dir, tmp_path_factory):
    from clipmoe_vlm.llava.train import load_config, run

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    argv = ["--stage", "pretrain", "--vision-tower", str(tower_dir), "--data-path",
            str(tiny_world / "llava" / "pretrain.json"), *_common(tiny_world, out)]
    return run(load_config(argv))


def test_end_to_end_pretrain_then_finetune(pretrained, tiny_world, tmp_path):
    from clipmoe_vlm.llava.train import main

    out = pretrained.output_dir
    assert pretrained.trainable == [f"model.multi_modal_projector.linear_{i}.{k}" for i in (1, 2)
                                    for k in ("bias", "weight")]
    assert pretrained.metrics["global_step"] == 4
    for name in ("config.json", "model.safetensors", "processor_config.json", "README.md"):
        assert (out / name).is_file(), name
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(model.model.vision_tower, CLIPMoEVisionModel)
    assert processor.image_processor.do_pad is False  # stage 1: image_aspect_ratio square (LLaVA-1.5)

    ft = main(["--stage", "finetune", "--model", str(out), "--data-path", str(tiny_world / "llava" / "instruct.json"),
               "--train-router", "--gradient-checkpointing", *_common(tiny_world, tmp_path / "finetune")])
    tuned = LlavaForConditionalGeneration.from_pretrained(ft).eval()
    tuned_processor = AutoProcessor.from_pretrained(ft)
    assert tuned_processor.image_processor.do_pad is True  # stage 2: pad
    # frozen tower: only the routers moved; everything else in the tower is unchanged
    base_state, tuned_state = model.state_dict(), tuned.state_dict()
    moved = {k for k in base_state if k.startswith("model.vision_tower.") and not torch.equal(base_state[k],
                                                                                              tuned_state[k])}
    assert moved and all(k.endswith(".mlp.gate.weight") for k in moved)
    history = [entry for entry in json.loads((next(ft.glob("checkpoint-*")) / "trainer_state.json").read_text())
               ["log_history"] if "loss" in entry]
    # LM and aux losses are logged separately; a text-only batch (dummy image, no routing statistics) has no aux
    assert history and all("lm_loss" in e for e in history) and any("aux_loss" in e for e in history)
    image = Image.open(tiny_world / "llava" / "images" / "instruct" / "000001.png")
    (answer,) = answer_questions(tuned, tuned_processor, ["What color is the shape?"], [image], max_new_tokens=4)
    assert isinstance(answer, str)
    assert "README" not in answer and processor.tokenizer.image_token == "<image>"


def test_resume_continues_at_the_exact_step(pretrained, tiny_world, tmp_path):
    import shutil

    from clipmoe_vlm.llava.train import load_config, run

    argv = ["--stage", "finetune", "--model", str(pretrained.output_dir), "--data-path",
            str(tiny_world / "llava" / "instruct.json"), "--max-steps", "4", "--save-steps", "2",
            "--save-total-limit", "3", "--no-group-by-modality-length"]
    full = run(load_config(argv + _common(tiny_world, tmp_path / "a")))
    reference = LlavaForConditionalGeneration.from_pretrained(full.output_dir).state_dict()

    # a run interrupted after step 2: its last checkpoint is checkpoint-2
    shutil.copytree(full.output_dir / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = run(load_config(argv + _common(tiny_world, tmp_path / "b") + ["--resume"]))
    state = json.loads((tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4]  # 1-2 from the checkpoint, 3-4 after resuming
    assert resumed.metrics["global_step"] == 4
    again = LlavaForConditionalGeneration.from_pretrained(resumed.output_dir).state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(again[key], value, msg=key)


def test_lora_resume_restores_adapter_and_projector(pretrained, tiny_world, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from clipmoe_vlm.llava.train import load_config, run

    argv = ["--stage", "finetune", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--model",
            str(pretrained.output_dir), "--data-path", str(tiny_world / "llava" / "instruct.json"), "--max-steps", "4",
            "--save-steps", "2", "--save-total-limit", "3", "--no-group-by-modality-length",
            "--learning-rate", "1e-2", "--projector-lr", "1e-2"]
    full = run(load_config(argv + _common(tiny_world, tmp_path / "a")))
    shutil.copytree(full.output_dir / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    assert (tmp_path / "b" / "checkpoint-2" / "non_lora_trainables.safetensors").is_file()
    resumed = run(load_config(argv + _common(tiny_world, tmp_path / "b") + ["--resume"]))
    assert resumed.metrics["global_step"] == 4
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        expected, got = load_file(str(full.output_dir / name)), load_file(str(resumed.output_dir / name))
        assert sorted(expected) == sorted(got)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)


def test_lora_run_saves_adapter_and_non_lora_trainables(pretrained, tiny_world, tmp_path):
    from clipmoe_vlm.llava.train import main

    out = main(["--stage", "finetune", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "2",
                "--model", str(pretrained.output_dir), "--data-path", str(tiny_world / "llava" / "instruct.json"),
                *_common(tiny_world, tmp_path / "lora")])
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                 "processor_config.json", "README.md"):
        assert (out / name).is_file(), name
    from safetensors.torch import load_file

    extra = load_file(str(out / "non_lora_trainables.safetensors"))
    assert sorted(extra) == [f"model.multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("bias", "weight")]
    model, _ = load_lora_llava(out, merge=True)
    assert isinstance(model, LlavaForConditionalGeneration)


def test_qlora_run_trains_lora_and_projector_only(pretrained, tiny_world, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from clipmoe_vlm.llava.train import load_config, run

    argv = ["--stage", "finetune", "--lora", "--bits", "4", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "2",
            "--model", str(pretrained.output_dir), "--data-path", str(tiny_world / "llava" / "instruct.json"),
            *_common(tiny_world, tmp_path / "qlora")]
    try:
        result = run(load_config(argv))
    except (RuntimeError, NotImplementedError) as error:  # pragma: no cover - depends on the bnb build
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot train 4-bit on this machine: {error}")
    model = result.trainer.model
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules()
                   if ".vision_tower" in n or ".multi_modal_projector" in n or n.endswith("lm_head"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    groups = {name.split(".lora_")[0].split(".")[-1] if ".lora_" in name else name.split(".")[-2]
              for name in result.trainable}
    assert {"linear_1", "linear_2", "q_proj", "down_proj"} <= groups
    assert all(".lora_" in n or ".multi_modal_projector." in n for n in result.trainable)
    merged, _ = load_lora_llava(result.output_dir, merge=True)
    assert isinstance(merged, LlavaForConditionalGeneration)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_give_one_clear_error_each(pretrained, tiny_world, tmp_path):
    from clipmoe_vlm.llava.train import load_config, run

    base = ["--stage", "finetune", "--model", str(pretrained.output_dir), "--max-steps", "1"]
    with pytest.raises(FileNotFoundError, match="--image-folder .*missing-images is not a directory"):
        run(load_config(base + ["--data-path", str(tiny_world / "llava" / "instruct.json")]
                        + _common(tiny_world, tmp_path / "x") + ["--image-folder", str(tmp_path / "missing-images")]))

    records = json.loads((tiny_world / "llava" / "instruct.json").read_text())
    sample = next(r for r in records if "image" in r)
    sample = json.loads(json.dumps(sample))
    sample["conversations"][0]["value"] = sample["conversations"][0]["value"].replace("<image>", "").strip()
    bad = tmp_path / "no_image_token.json"
    bad.write_text(json.dumps([sample]))
    with pytest.raises(ValueError, match="image sample without '<image>' in its text"):
        run(load_config(base + ["--data-path", str(bad), "--strict"] + _common(tiny_world, tmp_path / "y")))

    with pytest.raises(FileNotFoundError, match="--model .* not a LLaVA folder"):
        run(load_config(["--stage", "finetune", "--model", str(tmp_path / "nothing"), "--data-path",
                         str(bad)] + _common(tiny_world, tmp_path / "z")))
    with pytest.raises(ValueError, match="QLoRA\\) needs --lora"):
        run(load_config(base + ["--bits", "4", "--data-path", str(bad)] + _common(tiny_world, tmp_path / "w")))


# --------------------------------------------------------------------------- bad input through `clipmoe`
# Each case: exit status 2 and one "error:" line, the last on stderr, naming the file / folder / questions.
@pytest.fixture
def cli(capsys, monkeypatch):
    """``clipmoe ARGS`` in this process: ``(status, stdout, stderr lines)``."""
    from clipmoe_cli.main import main

    monkeypatch.delenv("CLIPMOE_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["pytest"])  # the dispatcher rewrites it

    def run(*argv):
        status = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if "error:" in line]
        assert "Traceback" not in captured.err and len(errors) <= 1, captured.err
        return status, captured.out, errors

    return run


@pytest.fixture(scope="module")
def lora_adapter(llava_dir, tmp_path_factory):
    """A LoRA run's folder on ``llava_dir``: adapter, non-LoRA trainables (projector), processor."""
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    configure_trainable(peft_model, "finetune", lora=True)
    folder = tmp_path_factory.mktemp("lora")
    save_lora(peft_model, folder, base_folder=llava_dir)
    AutoProcessor.from_pretrained(llava_dir).save_pretrained(folder)
    return folder


def test_merge_lora_without_non_lora_trainables_names_the_file(lora_adapter, tmp_path, cli):
    import shutil

    from clipmoe_vlm.llava.lora import NON_LORA_FILE

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    (adapter / NON_LORA_FILE).unlink()
    status, out, errors = cli("merge-lora", adapter, tmp_path / "merged")
    assert status == 2 and out == ""
    assert errors == [(f"error: {adapter / NON_LORA_FILE} not found: a LoRA run saves the projector (and any "
                       "trained routers / experts) there next to the adapter; without it the base model's would be "
                       "used")]
    assert not (tmp_path / "merged").exists()


def test_infer_and_merge_name_a_clip_moe_folder_given_for_llava(tower_dir, lora_adapter, tmp_path, cli):
    expected = ("is a CLIP-MoE folder (use it as --vision-tower of `clipmoe train-llava`): its config.json has "
                "model_type 'clip_moe', expected 'llava' (a folder saved by `clipmoe train-llava` or "
                "`clipmoe merge-lora`)")
    status, _, errors = cli("infer", "--model", tower_dir, "--question", "what is it?", "--device", "cpu")
    assert status == 2 and errors == [f"error: LLaVA folder {tower_dir} {expected}"]
    status, _, errors = cli("merge-lora", lora_adapter, tmp_path / "merged", "--base", tower_dir)
    assert status == 2 and errors == [f"error: LoRA base folder {tower_dir} {expected}"]
    assert not (tmp_path / "merged").exists()


def test_batch_infer_writes_the_answers_it_can_and_names_the_rest(llava_dir, tmp_path, cli):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for number in range(13):
        Image.new("RGB", (40, 30), (20 * number, 100, 50)).save(images / f"q{number}.png")
        rows.append({"question_id": number, "image": f"q{number}.png", "text": "what color is the circle?"})
    rows.append({"question_id": 13, "text": "describe the image briefly"})  # text-only
    truncated = images / "q2.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (images / "q12.png").unlink()  # question 13 of 14
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "out" / "answers.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))

    status, out, errors = cli("infer", "--model", llava_dir, "--questions", questions, "--image-folder", images,
                              "--answers-file", answers, "--batch-size", "4", "--max-new-tokens", "2",
                              "--device", "cpu")
    assert status == 2
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in written] == [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert all(isinstance(a["text"], str) for a in written)
    assert f"wrote 12 answers to {answers}" in out
    (line,) = errors
    assert line.startswith(f"error: 2 of 14 questions not answered (question_id 2, 12): question 2: image "
                           f"{truncated} cannot be read: ")
    assert line.endswith(f"; question 12: image {images / 'q12.png'} not found; the 12 answers are in {answers}")

    status, _, errors = cli("infer", "--model", llava_dir, "--image", images / "q12.png", "--question", "what?",
                            "--device", "cpu")
    assert status == 2 and errors == [f"error: --image: image {images / 'q12.png'} not found"]


def test_training_reports_skipped_and_repaired_samples(pretrained, tiny_world, tmp_path, capsys):
    from clipmoe_vlm.llava.train import load_config, run

    records = [r for r in json.loads((tiny_world / "llava" / "instruct.json").read_text()) if "image" in r][:4]
    records = json.loads(json.dumps(records))
    _, missing, no_token, two_tokens = records  # the first one is usable
    missing["image"] = "images/instruct/gone.png"
    no_token["conversations"][0]["value"] = no_token["conversations"][0]["value"].replace("<image>", "").strip()
    two_tokens["conversations"][0]["value"] = "<image>\n<image>\n" + two_tokens["conversations"][0]["value"]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    capsys.readouterr()
    # 4 records, batch 4, one epoch: each record is drawn once; a skipped one is replaced by the next usable one
    # of its modality (missing -> no_token, two_tokens -> the first), so no_token is repaired twice
    run(load_config(["--stage", "finetune", "--model", str(pretrained.output_dir), "--data-path", str(data),
                     *_common(tiny_world, tmp_path / "out")]))
    report = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[train")]
    tail = report[report.index(f"saved {tmp_path / 'out'}") + 1:]
    gone = tiny_world / "llava" / "images" / "instruct" / "gone.png"
    assert tail == [
        "data: 4 samples served; counted per sample drawn (a record drawn in every epoch counts every time)",
        "skipped (the next usable sample served instead): 2: missing_image 1, bad_image_placeholder 1",
        "repaired or changed: image_placeholder_added 2, truncated 4",  # the instructions exceed 320 tokens
        f"  missing image: record 1 (id={missing['id']!r}): {gone}",
        ("  the counters keep no record ids for the other reasons; --strict stops at the first record with a "
         "malformed conversation or <image> placeholder, naming it"),
    ]


def test_llava_run_folder_is_reused_only_with_its_settings(pretrained, tiny_world, tmp_path):
    """A finished LLaVA folder: changed settings are refused (with and without --resume) and leave it
    byte-identical; --resume with a neutral change continues; a checkpoint the run was killed while writing is
    deleted and the one before it continued, to the same weights; a checkpoint written under another launch is
    refused; the same settings start it again (to the same weights, its old checkpoints gone); --overwrite starts
    over, and a LoRA run over a full one leaves no file of the full run."""
    import hashlib
    import shutil

    from safetensors.torch import load_file

    from clipmoe_vlm.llava.run_folder import CHECKPOINT_RECORD, checkpoint_to_resume
    from clipmoe_vlm.llava.train import load_config, run

    out = tmp_path / "run"
    argv = ["--stage", "finetune", "--model", str(pretrained.output_dir), "--data-path",
            str(tiny_world / "llava" / "instruct.json"), "--max-steps", "4", "--save-steps", "2",
            "--save-total-limit", "3", "--no-group-by-modality-length", *_common(tiny_world, out)]

    def files() -> dict:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    first = run(load_config(argv))
    weights = load_file(out / "model.safetensors")
    before = files()
    settings = out / "llava_train_config.json"
    with pytest.raises(ValueError) as info:
        run(load_config(argv + ["--learning-rate", "1e-3", "--max-steps", "6"]))
    assert str(info.value) == (
        f"{out} already holds a run with other settings ({settings}): --learning-rate 2e-05 -> 0.001; --max-steps "
        "4 -> 6. A run folder is not reused with changed settings: pass --overwrite to delete its run files and "
        "start over, or choose another --output-dir")
    with pytest.raises(ValueError) as info:
        run(load_config(argv + ["--resume", "--per-device-train-batch-size", "2"]))
    assert str(info.value).startswith(f"--resume continues the run in {out} with its saved settings ({settings}), "
                                      "but these differ: --per-device-train-batch-size 4 -> 2. Drop the changes")
    assert files() == before

    resumed = run(load_config(argv + ["--resume", "--logging-steps", "2"]))  # a neutral change
    assert resumed.metrics["global_step"] == 4 and first.metrics["global_step"] == 4

    for name in ("optimizer.pt", "model.safetensors"):  # a damaged checkpoint is named before any work
        damaged = tmp_path / f"damaged-{name}"
        shutil.copytree(out, damaged)
        data = (damaged / "checkpoint-4" / name).read_bytes()
        (damaged / "checkpoint-4" / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError) as info:
            run(load_config(argv[:-2] + ["--output-dir", str(damaged), "--resume"]))
        assert str(info.value).startswith(f"{damaged / 'checkpoint-4' / name}: cannot read the checkpoint (")
        assert str(info.value).endswith(f"delete {damaged / 'checkpoint-4'} to resume from the checkpoint before it "
                                        "(if any), or start over with --overwrite")

    # killed while the Trainer wrote checkpoint-4 (its files are written in place): no record, no optimizer yet
    record = json.loads((out / "checkpoint-4" / CHECKPOINT_RECORD).read_text())
    assert record == {"step": 4, "engine": None, "processes": 1}
    killed = tmp_path / "killed-while-saving"
    shutil.copytree(out, killed)
    for name in (CHECKPOINT_RECORD, "optimizer.pt", "trainer_state.json"):
        (killed / "checkpoint-4" / name).unlink()
    continued = run(load_config(argv[:-2] + ["--output-dir", str(killed), "--resume"]))
    assert continued.metrics["global_step"] == 4 and (killed / "checkpoint-4" / CHECKPOINT_RECORD).is_file()
    for key, value in load_file(killed / "model.safetensors").items():  # steps 3 and 4 again, from checkpoint-2
        torch.testing.assert_close(value, weights[key], msg=key)

    other_launch = tmp_path / "other-launch"  # a checkpoint is resumed only as it was launched
    shutil.copytree(out, other_launch)
    (other_launch / "checkpoint-4" / CHECKPOINT_RECORD).write_text(json.dumps(
        {"step": 4, "engine": "DeepSpeed ZeRO-3", "processes": 2}))
    with pytest.raises(ValueError) as info:
        run(load_config(argv[:-2] + ["--output-dir", str(other_launch), "--resume"]))
    assert str(info.value) == (f"{other_launch / 'checkpoint-4'}: the checkpoint was written by 2 processes under "
                               "DeepSpeed ZeRO-3, this run is 1 process; resume it as it was launched, or start "
                               "over without --resume")

    # checkpoints without any record (a Trainer of its own, an earlier version): the newest whole one, none deleted
    for folder in other_launch.glob("checkpoint-*"):
        (folder / CHECKPOINT_RECORD).unlink()
    (other_launch / "checkpoint-6").mkdir()
    assert checkpoint_to_resume(other_launch, None, 1) == (other_launch / "checkpoint-4", [])

    (out / "checkpoint-9").mkdir()  # as if a longer run had left it: a restart must not mix with it
    again = run(load_config(argv))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert again.metrics["global_step"] == 4
    for key, value in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(value, weights[key], msg=key)

    with pytest.raises(ValueError, match="--overwrite cannot be combined with --resume"):
        load_config(argv + ["--resume", "--overwrite"]).resolve()
    run(load_config(argv + ["--lora", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "2", "--overwrite"]))
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "adapter_model.safetensors").is_file()
    saved = json.loads(settings.read_text())
    assert saved["tuning"]["lora"] is True and saved["optim"]["max_steps"] == 2


def test_llava_folder_with_run_files_but_no_settings_is_refused(tmp_path):
    from clipmoe_vlm.llava.train import load_config, run

    out = tmp_path / "model-only"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        run(load_config(["--stage", "finetune", "--model", str(tmp_path / "x"), "--data-path", "d.json",
                         "--image-folder", str(tmp_path), "--output-dir", str(out)]))
    assert str(info.value) == (
        f"{out} holds run files (config.json) but no llava_train_config.json, so the settings they were made with "
        "are unknown: pass --overwrite to delete its run files and start over, or choose another --output-dir")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]

    from clipmoe_vlm.llava.run_folder import check_output_dir

    notes = tmp_path / "notes"  # a folder with a README of the user's own holds no run
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    config = load_config(["--stage", "finetune", "--model", str(tmp_path / "x"), "--data-path", "d.json",
                          "--output-dir", str(notes)]).resolve()
    assert check_output_dir(config) == "new"


def test_lora_run_built_from_parts_keeps_its_base_beside_the_adapter(tower_dir, tiny_world, tmp_path):
    from clipmoe_vlm.llava.train import main

    out = main(["--stage", "finetune", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "1",
                "--vision-tower", str(tower_dir), "--data-path", str(tiny_world / "llava" / "instruct.json"),
                *_common(tiny_world, tmp_path / "lora")])
    assert (out / "base" / "config.json").is_file() and (out / "base" / "processor_config.json").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    model, _ = load_lora_llava(out, merge=True)
    assert isinstance(model, LlavaForConditionalGeneration)


def test_llava_data_edited_in_place_is_refused(pretrained, tiny_world, tmp_path):
    from clipmoe_vlm.llava.train import load_config, run

    data = tmp_path / "instruct.json"
    records = json.loads((tiny_world / "llava" / "instruct.json").read_text())
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    argv = ["--stage", "finetune", "--model", str(pretrained.output_dir), "--data-path", str(data), "--max-steps",
            "1", "--no-group-by-modality-length", *_common(tiny_world, out)]
    run(load_config(argv))
    settings = out / "llava_train_config.json"
    before = settings.read_bytes()
    data.write_text(json.dumps(records[:-1]))
    for extra in ([], ["--resume"]):
        with pytest.raises(ValueError) as info:
            run(load_config(argv + extra))
        assert f"({settings})" in str(info.value)
        assert f": the data (--data-path {data}): its content changed (sha256 " in str(info.value)
    assert settings.read_bytes() == before
