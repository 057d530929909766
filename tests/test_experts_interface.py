"""The CLIP-MoE experts on transformers' experts interface (issue #14).

- the three implementations (``eager``, ``grouped_mm``, ``batched_mm``) agree, forward and backward, with an
  expert that gets no token, top-1/2/4 and capacity drops (which contribute nothing under every implementation);
- upcycling preserves the dense function under each of them; ``experts_implementation`` is a ``from_pretrained``
  and config choice for a CLIP-MoE folder and a LLaVA folder with a CLIP-MoE tower, and really dispatches;
- folders written before the interface (``experts.fc1_weight``, ...) load unchanged; new folders get new names;
- reentrant activation checkpointing keeps the router loss's gradient;
- ``torch.export`` (static and dynamic batch) and ``torch.compile(fullgraph=True)`` match eager;
- ``output_router_logits`` is a config field; the text tower calls ``create_causal_mask`` without deprecated names.
"""

from __future__ import annotations

import warnings
from unittest.mock import Mock, patch

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, tiny_moe_llava
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlavaForConditionalGeneration
from transformers.integrations.moe import _can_use_grouped_mm, batched_mm_experts_forward, grouped_mm_experts_forward

from clipmoe_vlm import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoESparseBlock,
    CLIPMoETextConfig,
    CLIPMoETextModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
)
from clipmoe_vlm.convert import load_state_dict_checked, sparse_upcycle
from clipmoe_vlm.moe import LEGACY_EXPERT_KEYS, capacity_mask

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
NEW_TO_OLD = {new.rsplit(".", 1)[1]: old.rsplit(".", 1)[1] for old, new in LEGACY_EXPERT_KEYS.items()}


def _block(implementation: str, top_k: int, **overrides) -> CLIPMoESparseBlock:
    cfg = CLIPMoEVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              num_experts=4, top_k=top_k, experts_implementation=implementation, **overrides)
    torch.manual_seed(0)
    block = CLIPMoESparseBlock(cfg)
    with torch.no_grad():
        for p in block.experts.parameters():
            p.normal_(0, 0.3)
    return block.train()  # no dropout or jitter configured: training mode only matters for autograd


def _forward_backward(block: CLIPMoESparseBlock, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out, logits = block(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a non-uniform upstream gradient
    return out.detach(), logits.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


def _reference(block: CLIPMoESparseBlock, x: torch.Tensor, kept: torch.Tensor | None):
    """Token by token, kept assignments only: what every implementation must compute."""
    x = x.clone().requires_grad_(True)
    flat = x.reshape(-1, x.shape[-1])
    _, w, idx = block.gate(flat)
    rows = []
    for t in range(flat.shape[0]):
        row = flat.new_zeros(flat.shape[-1])
        for j in range(block.top_k):
            if kept is None or kept[t, j]:
                row = row + w[t, j] * block.experts.expert_forward(int(idx[t, j]), flat[t:t + 1])[0]
        rows.append(row)
    out = torch.stack(rows).view_as(x)
    block.zero_grad()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("case", ["plain", "expert_without_tokens", "capacity", "capacity_bpr"])
def test_implementations_agree_forward_and_backward(top_k, case):
    overrides = {}
    if case.startswith("capacity"):
        overrides = {"capacity_factor": 0.5, "batch_priority_routing": case == "capacity_bpr"}
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(top_k))
    if case == "expert_without_tokens":
        x = x.abs()
    results = {}
    for implementation in IMPLEMENTATIONS:
        block = _block(implementation, top_k, **overrides)
        if case == "expert_without_tokens":
            with torch.no_grad():  # a router that never picks expert 3 while it has other choices
                block.gate.weight[3] = -100.0 * block.gate.weight[:3].abs().sum(0)
        results[implementation] = _forward_backward(block, x)
        flat = x.reshape(-1, 16)
        logits, _, idx = block.gate(flat)
        kept = None
        if case.startswith("capacity"):
            priority = logits.float().softmax(-1).amax(-1) if case == "capacity_bpr" else None
            kept = capacity_mask(idx, 4, 0.5, priority)
            assert not kept.all()  # some assignments really are dropped
        if case == "expert_without_tokens" and top_k < 4:
            assert not (idx == 3).any()
            assert results[implementation][3]["experts.up_proj"][3].abs().sum() == 0
        out, x_grad, grads = _reference(block, x, kept)  # dropped assignments: no output, no gradient
        torch.testing.assert_close(results[implementation][0], out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[implementation][2], x_grad, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(results[implementation][3][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    eager = results["eager"]
    for implementation in ("grouped_mm", "batched_mm"):
        other = results[implementation]
        torch.testing.assert_close(other[0], eager[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other[1], eager[1], atol=0, rtol=0)  # the same router logits
        torch.testing.assert_close(other[2], eager[2], atol=1e-5, rtol=1e-5)
        for name in eager[3]:
            torch.testing.assert_close(other[3][name], eager[3][name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycled_model_computes_the_dense_function(tiny_dense_clip, pixel_values, input_ids, implementation, top_k):
    moe = sparse_upcycle(tiny_dense_clip, num_experts=4, top_k=top_k, experts_implementation=implementation).eval()
    assert moe.vision_model.config._experts_implementation == implementation
    assert moe.text_model.config._experts_implementation == implementation
    with torch.no_grad():
        ours = moe(input_ids=input_ids, pixel_values=pixel_values)
        dense = tiny_dense_clip(input_ids=input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(ours.image_embeds, dense.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.text_embeds, dense.text_embeds, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- folders and from_pretrained


def _tiny_moe() -> CLIPMoEModel:
    torch.manual_seed(0)
    model = CLIPMoEModel(CLIPMoEConfig(vision_config={**TINY_VISION, "num_experts": 4, "top_k": 2},
                                       text_config={**TINY_TEXT, "num_experts": 3, "top_k": 1, "moe_layers": [1]},
                                       projection_dim=16)).eval()
    with torch.no_grad():  # experts that differ, so a swapped key would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tiny_llava() -> LlavaForConditionalGeneration:
    model = tiny_moe_llava().eval()
    with torch.no_grad():
        for p in model.model.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _llava_inputs(pixel_values):
    text = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(7))
    ids = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.full((3, 16), 120), text], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values}


def _to_legacy_folder(folder, legacy):
    """A copy of a saved folder whose expert tensors carry the names the current main wrote before #14."""
    legacy.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (legacy / item.name).write_bytes(item.read_bytes())
    state = load_file(folder / "model.safetensors")
    renamed = {}
    for key, value in state.items():
        prefix, _, last = key.rpartition(".")
        renamed[f"{prefix}.{NEW_TO_OLD[last]}" if ".mlp.experts." in key + "." and last in NEW_TO_OLD else key] = value
    assert any(k.endswith("experts.fc1_weight") for k in renamed) and not any(k.endswith("up_proj") for k in renamed)
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    return legacy


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-moe")
    _tiny_moe().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    _tiny_llava().save_pretrained(folder)
    return folder


def test_new_folders_use_the_interface_names(moe_folder, llava_folder):
    for folder in (moe_folder, llava_folder):
        experts = [k for k in load_file(folder / "model.safetensors") if ".mlp.experts." in k]
        assert experts and {k.rsplit(".", 1)[1] for k in experts} == set(NEW_TO_OLD)


def test_experts_implementation_at_from_pretrained_clip_moe(moe_folder, pixel_values, input_ids):
    default = AutoModel.from_pretrained(moe_folder)
    assert type(default) is CLIPMoEModel and default._can_set_experts_implementation()
    # the default: eager on a machine without CUDA (the faster CPU kernel), transformers' grouped_mm with CUDA
    expected = "grouped_mm" if torch.cuda.is_available() else "eager"
    assert default.get_experts_implementation() == {"": expected, "text_config": expected, "vision_config": expected}
    with patch("torch.cuda.is_available", return_value=not torch.cuda.is_available()):
        other = AutoModel.from_pretrained(moe_folder)
    assert other.vision_model.config._experts_implementation == ("eager" if expected == "grouped_mm" else "grouped_mm")
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model = AutoModel.from_pretrained(moe_folder, experts_implementation=implementation).eval()
        assert model.get_experts_implementation() == {"": implementation, "text_config": implementation,
                                                      "vision_config": implementation}
        with torch.no_grad():
            outputs[implementation] = model(input_ids=input_ids, pixel_values=pixel_values)
    for implementation in ("grouped_mm", "batched_mm"):
        for name in ("logits_per_image", "image_embeds", "text_embeds", "aux_loss"):
            torch.testing.assert_close(getattr(outputs[implementation], name), getattr(outputs["eager"], name),
                                       atol=1e-5, rtol=1e-5)
    per_tower = AutoModel.from_pretrained(moe_folder, experts_implementation={"vision_config": "batched_mm"})
    assert per_tower.vision_model.config._experts_implementation == "batched_mm"
    assert per_tower.text_model.config._experts_implementation == expected
    tower = CLIPMoEVisionModel(CLIPMoEVisionConfig(**TINY_VISION, experts_implementation="batched_mm"))
    assert tower.config._experts_implementation == "batched_mm"  # a config choice too


def test_set_experts_implementation_dispatches_to_the_chosen_kernel(pixel_values, input_ids):
    model = _tiny_moe()
    batched, grouped = Mock(wraps=batched_mm_experts_forward), Mock(wraps=grouped_mm_experts_forward)
    with patch.dict("transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS._global_mapping",
                    {"batched_mm": batched, "grouped_mm": grouped}), torch.no_grad():
        for implementation, called, not_called in (("eager", None, (batched, grouped)),
                                                   ("batched_mm", batched, (grouped,)),
                                                   ("grouped_mm", grouped, (batched,))):
            model.set_experts_implementation(implementation)
            model(input_ids=input_ids, pixel_values=pixel_values)
            for mock in not_called:
                mock.assert_not_called()
            if called is not None:
                assert called.call_count == 3 + 1  # every vision layer, the text tower's one MoE layer
            batched.reset_mock()
            grouped.reset_mock()


def test_experts_implementation_at_from_pretrained_llava(llava_folder, pixel_values):
    inputs = _llava_inputs(pixel_values)
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model = AutoModel.from_pretrained(llava_folder, experts_implementation=implementation).eval()
        assert model.vision_tower.config._experts_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(**inputs).last_hidden_state
    for implementation in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(outputs[implementation], outputs["eager"], atol=1e-5, rtol=1e-5)
    model = LlavaForConditionalGeneration.from_pretrained(llava_folder, experts_implementation="eager")
    model.set_experts_implementation("grouped_mm")  # accepted although the Llama LM has no experts
    assert model.model.vision_tower.config._experts_implementation == "grouped_mm"
    per_tower = LlavaForConditionalGeneration.from_pretrained(llava_folder,
                                                              experts_implementation={"vision_config": "eager"})
    assert per_tower.model.vision_tower.config._experts_implementation == "eager"
    default = LlavaForConditionalGeneration.from_pretrained(llava_folder)
    assert default.model.vision_tower.config._experts_implementation == (
        "grouped_mm" if torch.cuda.is_available() else "eager")


def test_folder_saved_before_the_interface_loads_unchanged(moe_folder, llava_folder, tmp_path, pixel_values,
                                                           input_ids):
    legacy = _to_legacy_folder(moe_folder, tmp_path / "legacy-clip-moe")
    new, old = AutoModel.from_pretrained(moe_folder).eval(), AutoModel.from_pretrained(legacy).eval()
    for key, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(old(input_ids=input_ids, pixel_values=pixel_values).logits_per_image,
                                   new(input_ids=input_ids, pixel_values=pixel_values).logits_per_image,
                                   atol=0, rtol=0)
    # re-saved: transformers keeps a loaded checkpoint's layout unless asked for the current one
    old.save_pretrained(tmp_path / "resaved", save_original_format=False)
    assert not any("fc1_weight" in k for k in load_file(tmp_path / "resaved" / "model.safetensors"))

    legacy_llava = _to_legacy_folder(llava_folder, tmp_path / "legacy-llava")
    inputs = _llava_inputs(pixel_values)
    for implementation in ("grouped_mm", "eager"):
        a = LlavaForConditionalGeneration.from_pretrained(llava_folder, experts_implementation=implementation)
        b = LlavaForConditionalGeneration.from_pretrained(legacy_llava, experts_implementation=implementation)
        with torch.no_grad():
            torch.testing.assert_close(b.eval()(**inputs).logits, a.eval()(**inputs).logits, atol=0, rtol=0)


def test_plain_state_dicts_with_the_old_names_load():
    model = _tiny_moe()
    old = {}
    for key, value in model.state_dict().items():
        prefix, _, last = key.rpartition(".")
        old[f"{prefix}.{NEW_TO_OLD[last]}" if ".mlp.experts." in key + "." and last in NEW_TO_OLD else key] = value
    assert "vision_model.encoder.layers.0.mlp.experts.fc1_weight" in old
    fresh = CLIPMoEModel(model.config)
    fresh.load_state_dict(old, strict=True)  # e.g. a resumed upcycling checkpoint written before #14
    assert torch.equal(fresh.vision_model.encoder.layers[0].mlp.experts.up_proj,
                       model.vision_model.encoder.layers[0].mlp.experts.up_proj)
    load_state_dict_checked(CLIPMoEModel(model.config), old, source="old checkpoint")


# ---------------------------------------------------------------------------------- training, export, compile


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_keeps_the_aux_loss_gradient(use_reentrant, pixel_values, input_ids):
    model = _tiny_moe().train()
    gates = {name: p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")}
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    out.aux_loss.backward()
    expected = {name: p.grad.clone() for name, p in gates.items()}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    assert out.aux_loss.requires_grad
    out.aux_loss.backward()
    for name, p in gates.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def _export_cases(pixel_values, input_ids):
    vision = CLIPMoEVisionModel(CLIPMoEVisionConfig(**TINY_VISION, capacity_factor=1.0)).eval()
    text = CLIPMoETextModel(CLIPMoETextConfig(**TINY_TEXT, num_experts=3, top_k=2)).eval()
    mask = torch.ones_like(input_ids)
    mask[0, -3:] = 0
    return {
        "vision": (vision, {"pixel_values": pixel_values}, ("last_hidden_state", "pooler_output")),
        "text": (text, {"input_ids": input_ids, "attention_mask": mask}, ("last_hidden_state", "pooler_output")),
        "two_tower": (_tiny_moe(), {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": mask},
                      ("logits_per_image", "image_embeds", "text_embeds", "aux_loss")),
    }


@pytest.mark.parametrize("name", ["vision", "text",
                                  pytest.param("two_tower", marks=pytest.mark.slow)])  # measured 46-60 s: slow
def test_torch_export_matches_eager(name, pixel_values, input_ids):
    model, inputs, fields = _export_cases(pixel_values, input_ids)[name]
    with torch.no_grad():
        expected = model(**inputs)
        static = torch.export.export(model, (), inputs, strict=False).module()
        batch = torch.export.Dim("batch", min=1, max=32)
        dynamic = torch.export.export(model, (), inputs, strict=False,
                                      dynamic_shapes={k: {0: batch} for k in inputs}).module()
        for field in fields:
            torch.testing.assert_close(getattr(static(**inputs), field), getattr(expected, field), atol=1e-6, rtol=1e-5)
        more = {k: torch.cat([v, v[:2]]) for k, v in inputs.items()}  # another batch size through the same graph
        torch.testing.assert_close(getattr(dynamic(**more), fields[0]), getattr(model(**more), fields[0]),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["vision", "text"])
def test_full_graph_compile_matches_eager(name, pixel_values, input_ids):
    """``fullgraph=True`` fails on any graph break; aot_eager traces forward and backward like inductor without
    generating code (inductor itself: the slow test below)."""
    model, inputs, fields = _export_cases(pixel_values, input_ids)[name]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, expected = compiled(**inputs), model(**inputs)
    for field in fields:
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compile_of_the_vision_tower_matches_eager(pixel_values):
    """Measured: 74 s on the shared 2-core machine (the code generation), so it is marked slow."""
    model = CLIPMoEVisionModel(CLIPMoEVisionConfig(**TINY_VISION)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=pixel_values).pooler_output,
                                   model(pixel_values=pixel_values).pooler_output, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- config fields, masks, GPU


def test_output_router_logits_is_a_config_field(pixel_values, input_ids):
    tower = CLIPMoEVisionModel(CLIPMoEVisionConfig(**TINY_VISION)).eval()
    assert tower(pixel_values).router_logits is None  # a tower's default, as Mixtral's
    tower.config.output_router_logits = True
    out = tower(pixel_values)
    assert len(out.router_logits) == 3 and out.aux_loss is not None
    assert out.router_logits[0].shape == (3 * 17, 4)
    model = _tiny_moe()
    assert model.config.output_router_logits is True  # the two-tower model has always returned them
    assert model(input_ids=input_ids, pixel_values=pixel_values).aux_loss is not None
    model.config.output_router_logits = False
    assert model(input_ids=input_ids, pixel_values=pixel_values).aux_loss is None


def test_text_tower_uses_no_deprecated_mask_argument(input_ids):
    model = CLIPMoETextModel(CLIPMoETextConfig(**TINY_TEXT)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_grouped_mm_refuses_widths_its_kernel_cannot_take(pixel_values):
    """torch's grouped_mm fails mid-forward on rows that are not 16-byte multiples ("strides should be multiple of
    16 bytes"): the default falls back to eager at construction, and an explicit request fails there, naming the
    field; eager and batched_mm still agree on such a tower."""
    odd = {**TINY_VISION, "intermediate_size": 37}
    tower = CLIPMoEVisionModel(CLIPMoEVisionConfig(**odd))
    assert tower.config._experts_implementation == "eager"
    with pytest.raises(ValueError, match=r"config\.intermediate_size .* multiple of 8.* 37"):
        CLIPMoEVisionModel(CLIPMoEVisionConfig(**odd, experts_implementation="grouped_mm"))
    with pytest.raises(ValueError, match="intermediate_size"):
        tower.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        eager = tower(pixel_values).last_hidden_state
        tower.set_experts_implementation("batched_mm")
        torch.testing.assert_close(tower(pixel_values).last_hidden_state, eager, rtol=1e-5, atol=1e-5)
    text = CLIPMoEConfig(text_config=TINY_TEXT, vision_config={**odd, "intermediate_size": 36})
    with pytest.raises(ValueError, match=r"vision_config\.intermediate_size"):
        CLIPMoEModel._from_config(text, experts_implementation="grouped_mm")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_bf16_on_gpu_matches_eager():
    """The grouped GEMM kernel (bf16, CUDA) against the eager loop in bf16, both against fp32 eager: on one
    routing (the experts call itself), and through a whole tower (where bf16 may flip a near-tied routing)."""
    cfg = CLIPMoEVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=16, num_experts=4, top_k=2)
    torch.manual_seed(0)
    model = CLIPMoEVisionModel(cfg).cuda().eval()
    experts, gate = model.encoder.layers[0].mlp.experts, model.encoder.layers[0].mlp.gate
    x = torch.randn(1024, 256, device="cuda")
    pixels = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        _, weights, indices = gate(x)
        model.set_experts_implementation("eager")
        reference = experts(x, indices, weights)
        tower_reference = model(pixels).last_hidden_state
        model.to(torch.bfloat16)
        eager = experts(x.bfloat16(), indices, weights).float()
        tower_eager = model(pixels.bfloat16()).last_hidden_state.float()
        model.set_experts_implementation("grouped_mm")
        assert experts.config._experts_implementation == "grouped_mm"
        grouped = experts(x.bfloat16(), indices, weights).float()
        tower_grouped = model(pixels.bfloat16()).last_hidden_state.float()
    # the grouped GEMM kernel itself ran, not transformers' per-expert fallback
    offsets = torch.tensor([256, 512, 768, 1024], device="cuda", dtype=torch.int32)
    assert _can_use_grouped_mm(x.bfloat16(), experts.up_proj, offsets)
    scale = reference.abs().mean().item()
    eager_error = (eager - reference).abs().mean().item()
    grouped_error = (grouped - reference).abs().mean().item()
    assert grouped_error <= 2 * eager_error + 1e-3 * scale, (grouped_error, eager_error, scale)
    torch.testing.assert_close(grouped, eager, atol=4e-2 * scale + 1e-2, rtol=4e-2)
    assert torch.isfinite(tower_grouped).all()
    tower_scale = tower_reference.abs().mean().item()
    assert (tower_grouped - tower_eager).abs().mean().item() <= 0.02 * tower_scale
    assert (tower_grouped - tower_reference).abs().mean().item() <= 2 * (
        tower_eager - tower_reference).abs().mean().item() + 1e-3 * tower_scale


def test_clis_take_experts_implementation():
    from clipmoe_cli import eval_encoder
    from clipmoe_vlm.llava.train import load_config as llava_config
    from upcycle.cli import build_parser
    from upcycle.config import load_config

    assert "--experts-implementation" in build_parser().format_help()
    assert load_config(None, {"experts_implementation": "eager"}).moe.experts_implementation == "eager"
    assert llava_config(["--experts-implementation", "batched_mm"]).modeling.experts_implementation == "batched_mm"
    assert "--experts-implementation" in eval_encoder.build_parser().format_help()
    with pytest.raises(SystemExit):
        llava_config(["--experts-implementation", "fast"])


def test_set_tower_experts_implementation_reaches_only_a_clip_moe_tower():
    from clipmoe_vlm.llava.builder import set_tower_experts_implementation

    model = _tiny_llava()
    set_tower_experts_implementation(model, "batched_mm")
    assert model.model.vision_tower.config._experts_implementation == "batched_mm"
    with pytest.raises(ValueError, match="not a CLIP-MoE"):
        set_tower_experts_implementation(model.model.language_model, "eager")
