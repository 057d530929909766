"""CLIP-MoE configs and models: validation, Auto-class registration, outputs, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION
from transformers import AutoConfig, AutoModel

from clipmoe_vlm import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
)
from clipmoe_vlm.checkpoint import CheckpointMismatchError
from clipmoe_vlm.losses import load_balancing_loss, router_z_loss
from clipmoe_vlm.moe import CLIPMoESparseBlock


def tiny_moe_config(**vision_moe) -> CLIPMoEConfig:
    return CLIPMoEConfig(vision_config={**TINY_VISION, "num_experts": 4, "top_k": 2, **vision_moe},
                         text_config={**TINY_TEXT, "num_experts": 3, "top_k": 1, "moe_layers": [1]},
                         projection_dim=16)


@pytest.mark.parametrize("bad, message", [
    ({"top_k": 5}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"moe_layers": [0, 3]}, "moe_layers"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"expert_dropout": 1.0}, "expert_dropout"),
    ({"router_z_loss_coef": -1.0}, "router_z_loss_coef"),
])
def test_config_validation_names_the_field(bad, message):
    with pytest.raises(Exception, match=message):
        CLIPMoEVisionConfig(**{**TINY_VISION, **bad})


def test_moe_layers_place_sparse_blocks():
    model = CLIPMoEModel(tiny_moe_config(moe_layers=[0, 2]))
    vision_sparse = [isinstance(layer.mlp, CLIPMoESparseBlock) for layer in model.vision_model.encoder.layers]
    text_sparse = [isinstance(layer.mlp, CLIPMoESparseBlock) for layer in model.text_model.encoder.layers]
    assert vision_sparse == [True, False, True] and text_sparse == [False, True]
    assert model.vision_model.encoder.layers[0].mlp.experts.up_proj.shape == (4, 64, 32)
    assert model.text_model.encoder.layers[1].mlp.experts.up_proj.shape == (3, 48, 32)


def test_outputs_router_logits_and_aux_loss(pixel_values, input_ids):
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_moe_config(router_z_loss_coef=0.001)).eval()
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    assert out.logits_per_image.shape == (3, 3)
    assert len(out.image_router_logits) == 3 and out.image_router_logits[0].shape == (3 * 17, 4)
    assert len(out.text_router_logits) == 1 and out.text_router_logits[0].shape == (3 * 10, 3)
    vc, tc = model.config.vision_config, model.config.text_config
    expected = (vc.router_aux_loss_coef * load_balancing_loss(out.image_router_logits, 2)
                + 0.001 * router_z_loss(out.image_router_logits)
                + tc.router_aux_loss_coef * load_balancing_loss(out.text_router_logits, 1))
    torch.testing.assert_close(out.aux_loss, expected)
    # the recorded logits are the router's own: recompute layer 0 by hand
    hidden = model.vision_model(pixel_values, output_hidden_states=True).hidden_states[0]
    layer0 = model.vision_model.encoder.layers[0]
    h = hidden + layer0.self_attn(layer0.layer_norm1(hidden), attention_mask=None)[0]
    torch.testing.assert_close(out.image_router_logits[0], layer0.mlp.gate(layer0.layer_norm2(h).reshape(-1, 32))[0])
    features = model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(features, dim=-1))


def test_vision_tower_is_a_clip_vision_drop_in(pixel_values):
    tower = CLIPMoEVisionModel(CLIPMoEVisionConfig(**TINY_VISION)).eval()
    out = tower(pixel_values, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 17, 32) and out.pooler_output.shape == (3, 32)
    assert len(out.hidden_states) == 4 and out.router_logits is None
    selected = tower(pixel_values, output_hidden_states=-2)  # how transformers 5.x LLaVA asks for layer -2
    torch.testing.assert_close(selected.hidden_states[-2], out.hidden_states[-2])
    assert selected.hidden_states[-1] is None
    assert len(tower(pixel_values, output_router_logits=True).router_logits) == 3


def test_auto_classes_round_trip(tmp_path, pixel_values, input_ids):
    torch.manual_seed(0)
    model = CLIPMoEModel(tiny_moe_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "clip_moe"
    assert saved["vision_config"]["num_experts"] == 4 and saved["text_config"]["moe_layers"] == [1]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CLIPMoEConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is CLIPMoEModel
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    a = model(input_ids=input_ids, pixel_values=pixel_values)
    b = loaded(input_ids=input_ids, pixel_values=pixel_values)
    assert torch.equal(a.logits_per_image, b.logits_per_image)


def test_tower_models_load_with_auto_model(tmp_path):
    tower = CLIPMoETextModel(tiny_moe_config().text_config)
    tower.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is CLIPMoETextModel


def test_folder_with_wrong_expert_count_fails_loudly(tmp_path):
    CLIPMoEModel(tiny_moe_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_experts"] = 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"vision_model\.encoder\.layers\.0\.mlp\.(gate|experts)"):
        AutoModel.from_pretrained(tmp_path)


def test_gradient_checkpointing_keeps_router_gradients(pixel_values, input_ids):
    model = CLIPMoEModel(tiny_moe_config()).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    out.aux_loss.backward()
    gate = model.vision_model.encoder.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
