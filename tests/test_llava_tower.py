"""`CLIPMoEVisionModel` as the vision tower of transformers' `LlavaForConditionalGeneration`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_moe_llava
from transformers import LlavaForConditionalGeneration

from clipmoe_vlm import CLIPMoEVisionModel

IMAGE_TOKEN = 120
NUM_PATCHES = (32 // 8) ** 2  # image 32, patch 8; the CLS token is dropped ("default" strategy)


@pytest.fixture
def tiny_llava() -> LlavaForConditionalGeneration:
    return tiny_moe_llava(IMAGE_TOKEN, NUM_PATCHES)


def batch(pixel_values):
    text = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(7))
    image = torch.full((3, NUM_PATCHES), IMAGE_TOKEN)
    input_ids = torch.cat([torch.ones(3, 1, dtype=torch.long), image, text], dim=1)
    labels = input_ids.clone()
    labels[:, : 1 + NUM_PATCHES] = -100
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                labels=labels)


def test_tower_type_and_feature_layer(tiny_llava, pixel_values):
    tower = tiny_llava.model.vision_tower
    assert isinstance(tower, CLIPMoEVisionModel)
    features = tiny_llava.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                                   vision_feature_select_strategy="default")
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    expected = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(torch.stack(list(features)), tiny_llava.model.multi_modal_projector(expected))


def test_forward_backward_reaches_tower_and_projector(tiny_llava, pixel_values):
    tiny_llava.train()
    out = tiny_llava(**batch(pixel_values))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert tiny_llava.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    # layer 0 feeds the selected layer -2 (of 3), so its experts and router get gradients
    layer0 = tiny_llava.model.vision_tower.encoder.layers[0].mlp
    assert layer0.experts.up_proj.grad.abs().sum() > 0 and layer0.gate.weight.grad.abs().sum() > 0


def test_generate_and_save_reload(tiny_llava, pixel_values, tmp_path):
    tiny_llava.eval()
    inputs = batch(pixel_values)
    inputs.pop("labels")
    generated = tiny_llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (3, inputs["input_ids"].shape[1] + 4)
    tiny_llava.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.vision_tower, CLIPMoEVisionModel)
    assert loaded.config.vision_config.model_type == "clip_moe_vision_model"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tiny_llava(**inputs).logits, atol=0, rtol=0)
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
