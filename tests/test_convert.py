"""Dense -> MoE conversion: function preservation, layouts, the official release format, bad input."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP as OpenCLIP
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from transformers import AutoModel, CLIPVisionModel

from clipmoe_vlm import CLIPMoEModel, CLIPMoEVisionModel
from upcycle import (
    CheckpointMismatchError,
    load_official_clipmoe,
    parse_moe_layers,
    sparse_upcycle,
    upcycle_state_dict,
)


def embeddings(model, pixel_values, input_ids):
    with torch.no_grad():
        return (model.get_image_features(pixel_values=pixel_values).pooler_output,
                model.get_text_features(input_ids=input_ids).pooler_output)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_transformers_layout_preserves_function(tiny_dense_clip, pixel_values, input_ids, top_k):
    moe = sparse_upcycle(tiny_dense_clip, num_experts=4, top_k=top_k).eval()
    assert isinstance(moe, CLIPMoEModel)
    for dense_out, moe_out in zip(embeddings(tiny_dense_clip, pixel_values, input_ids),
                                  embeddings(moe, pixel_values, input_ids)):
        torch.testing.assert_close(moe_out, dense_out, atol=1e-5, rtol=0)


def tiny_open_clip(quick_gelu: bool) -> OpenCLIP:
    torch.manual_seed(0)
    model = OpenCLIP(embed_dim=16, quick_gelu=quick_gelu,
                     vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, mlp_ratio=2.0, patch_size=8,
                                              image_size=32),
                     text_cfg=CLIPTextCfg(context_length=12, vocab_size=99, width=32, heads=4, layers=2))
    with torch.no_grad():  # open_clip zero-inits some biases; randomise everything to make the test sharp
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_open_clip_layout_preserves_function(pixel_values, quick_gelu, top_k):
    oc = tiny_open_clip(quick_gelu)
    tokens = torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(3))
    tokens[:, 7] = 98  # EOT (highest id, argmax pooling), zeros after it as open_clip pads
    tokens[:, 8:] = 0
    moe = sparse_upcycle(oc, num_experts=4, top_k=top_k).eval()
    assert moe.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    with torch.no_grad():
        ref_img = oc.encode_image(pixel_values)
        ref_txt = oc.encode_text(tokens)
        out = moe(input_ids=tokens, pixel_values=pixel_values)
    torch.testing.assert_close(moe.get_image_features(pixel_values=pixel_values).pooler_output, ref_img,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(moe.get_text_features(input_ids=tokens).pooler_output, ref_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits_per_image,
                               oc.logit_scale.exp() * torch.nn.functional.normalize(ref_img, dim=-1)
                               @ torch.nn.functional.normalize(ref_txt, dim=-1).t(), atol=1e-4, rtol=0)


def test_save_and_auto_load_round_trip_exact(tiny_dense_clip, pixel_values, input_ids, tmp_path):
    moe = sparse_upcycle(tiny_dense_clip, num_experts=3, top_k=2, moe_layers="every-2",
                         upcycling_info={"source": "tiny"}).eval()
    moe.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.upcycling_info == {"source": "tiny"}
    assert loaded.config.vision_config.moe_layers == [1]
    for a, b in zip(embeddings(moe, pixel_values, input_ids), embeddings(loaded, pixel_values, input_ids)):
        assert torch.equal(a, b)


def test_experts_are_copies_and_routers_are_new(tiny_dense_clip):
    moe = sparse_upcycle(tiny_dense_clip, num_experts=4, top_k=2, moe_layers={"vision": "last-2", "text": [0]})
    assert moe.config.vision_config.moe_layers == [1, 2] and moe.config.text_config.moe_layers == [0]
    dense_fc1 = tiny_dense_clip.vision_model.encoder.layers[2].mlp.fc1.weight
    experts = moe.vision_model.encoder.layers[2].mlp.experts.up_proj
    for e in range(4):
        assert torch.equal(experts[e], dense_fc1)
    assert torch.equal(moe.vision_model.encoder.layers[0].mlp.fc1.weight,
                       tiny_dense_clip.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert moe.vision_model.encoder.layers[2].mlp.gate.weight.abs().sum() > 0


def test_vision_model_and_legacy_prefixed_layout(tiny_dense_clip, pixel_values):
    dense_tower = CLIPVisionModel(tiny_dense_clip.config.vision_config).eval()
    dense_tower.load_state_dict(
        {k[len("vision_model."):]: v for k, v in tiny_dense_clip.state_dict().items() if k.startswith("vision_model.")})
    moe = sparse_upcycle(dense_tower, num_experts=2, top_k=1).eval()
    assert isinstance(moe, CLIPMoEVisionModel)
    torch.testing.assert_close(moe(pixel_values).pooler_output, dense_tower(pixel_values).pooler_output,
                               atol=1e-5, rtol=0)
    # transformers 4.x saved a standalone CLIPVisionModel with a leading "vision_model." prefix
    legacy = {"vision_model." + k: v for k, v in dense_tower.state_dict().items()}
    state = upcycle_state_dict(legacy, moe)
    assert torch.equal(state["encoder.layers.0.mlp.experts.up_proj"][1],
                       dense_tower.state_dict()["encoder.layers.0.mlp.fc1.weight"])


def test_moe_layer_specs():
    assert parse_moe_layers(None, 6) is None and parse_moe_layers("all", 6) is None
    assert parse_moe_layers("every-2", 6) == [1, 3, 5]
    assert parse_moe_layers("last-2", 6) == [4, 5]
    assert parse_moe_layers("0, 2,-1", 6) == [0, 2, 5]
    with pytest.raises(ValueError, match="outside"):
        parse_moe_layers([7], 6)
    with pytest.raises(ValueError, match="every-2, last-N"):
        parse_moe_layers("some", 6)


def test_bad_upcycling_requests(tiny_dense_clip):
    with pytest.raises(ValueError, match="top_k=5"):
        sparse_upcycle(tiny_dense_clip, num_experts=4, top_k=5)
    with pytest.raises(TypeError, match="supported sources"):
        sparse_upcycle(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown MoE options"):
        sparse_upcycle(tiny_dense_clip, routr_noise=1.0)


# ---- the official CLIP-MoE release format --------------------------------------------------------------------


def to_official_layout(moe) -> dict[str, torch.Tensor]:
    """Writes a CLIPMoEModel in the official release's OpenAI layout, or a dense CLIPModel in OpenAI's (the inverse
    mapping, spelled out)."""
    sd = moe.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    }
    for src, dst, tower in (("vision_model.", "visual.transformer.", moe.vision_model),
                            ("text_model.", "transformer.", moe.text_model)):
        for i in range(len(tower.encoder.layers)):
            s, d = f"{src}encoder.layers.{i}.", f"{dst}resblocks.{i}."
            out[d + "ln_1.weight"], out[d + "ln_1.bias"] = sd[s + "layer_norm1.weight"], sd[s + "layer_norm1.bias"]
            out[d + "ln_2.weight"], out[d + "ln_2.bias"] = sd[s + "layer_norm2.weight"], sd[s + "layer_norm2.bias"]
            out[d + "attn.in_proj_weight"] = torch.cat([sd[s + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[d + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{p}_proj.bias"] for p in "qkv"])
            out[d + "attn.out_proj.weight"] = sd[s + "self_attn.out_proj.weight"]
            out[d + "attn.out_proj.bias"] = sd[s + "self_attn.out_proj.bias"]
            if s + "mlp.fc1.weight" in sd:  # a dense block
                for fc_src, fc_dst in (("fc1", "c_fc"), ("fc2", "c_proj")):
                    out[d + f"mlp.{fc_dst}.weight"] = sd[s + f"mlp.{fc_src}.weight"]
                    out[d + f"mlp.{fc_dst}.bias"] = sd[s + f"mlp.{fc_src}.bias"]
                continue
            out[d + "gate.weight"] = sd[s + "mlp.gate.weight"]
            for e in range(sd[s + "mlp.experts.up_proj"].shape[0]):
                out[d + f"experts.{e}.c_fc.weight"] = sd[s + "mlp.experts.up_proj"][e]
                out[d + f"experts.{e}.c_fc.bias"] = sd[s + "mlp.experts.up_proj_bias"][e]
                out[d + f"experts.{e}.c_proj.weight"] = sd[s + "mlp.experts.down_proj"][e]
                out[d + f"experts.{e}.c_proj.bias"] = sd[s + "mlp.experts.down_proj_bias"][e]
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture
def official_checkpoint(tiny_dense_clip, tmp_path):
    torch.manual_seed(4)
    moe = sparse_upcycle(tiny_dense_clip, num_experts=4, top_k=2).eval()
    with torch.no_grad():  # make the experts different, as MCL would
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "clip-moe-4-2.pt"
    torch.save(to_official_layout(moe), path)
    return moe, path


def test_official_release_loads_to_the_same_function(official_checkpoint, pixel_values):
    moe, path = official_checkpoint
    tokens = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(5))
    tokens[:, 9] = 98
    tokens[:, 10:] = 0
    loaded = load_official_clipmoe(path, vision_heads=4, text_heads=4).eval()
    assert loaded.config.vision_config.num_experts == 4 and loaded.config.vision_config.moe_layers is None
    assert loaded.config.upcycling_info["format"] == "official-clip-moe"
    torch.testing.assert_close(loaded.get_image_features(pixel_values=pixel_values).pooler_output,
                               moe.get_image_features(pixel_values=pixel_values).pooler_output, atol=1e-5, rtol=0)
    # the official text tower pools the highest token id (OpenAI's EOT); the tiny model's EOT is 98
    moe.text_model.eos_token_id = 2
    torch.testing.assert_close(loaded.get_text_features(input_ids=tokens).pooler_output,
                               moe.get_text_features(input_ids=tokens).pooler_output, atol=1e-5, rtol=0)


def test_load_clip_reads_the_official_release_as_moe_naming_the_file(tmp_path):
    from transformers import CLIPModel

    from clipmoe_vlm.loading import load_clip, tiny_clip_config

    torch.manual_seed(6)  # width 64: head counts inferable, as for the real release
    path = tmp_path / "official.pt"
    torch.save(to_official_layout(sparse_upcycle(CLIPModel(tiny_clip_config()), num_experts=4, top_k=2)), path)
    loaded = load_clip(str(path))
    reference = load_official_clipmoe(path)
    assert isinstance(loaded, CLIPMoEModel) and loaded.config.upcycling_info["source"] == str(path)
    expected = reference.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_official_release_long_clip_positions(official_checkpoint):
    moe, path = official_checkpoint
    sd = torch.load(path, weights_only=True)
    res = sd["positional_embedding"].clone()
    res[3:] += 1.0  # positions >= 20 come from the _res table; the tiny model has 16, so none change
    sd["positional_embedding_res"] = res
    loaded = load_official_clipmoe(sd, vision_heads=4, text_heads=4)
    assert torch.equal(loaded.text_model.embeddings.position_embedding.weight, sd["positional_embedding"])


def test_official_release_expert_mismatch_names_the_key(official_checkpoint):
    _, path = official_checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"visual\.transformer\.resblocks\.0\.experts\.2\.c_fc\.weight"):
        load_official_clipmoe(path, num_experts=2, vision_heads=4, text_heads=4)


def test_official_release_shape_mismatch_and_unknown_format(official_checkpoint, tmp_path):
    _, path = official_checkpoint
    sd = torch.load(path, weights_only=True)
    sd["visual.transformer.resblocks.1.experts.3.c_fc.weight"] = torch.zeros(10, 32)
    with pytest.raises(CheckpointMismatchError, match=r"resblocks\.1|experts"):
        load_official_clipmoe(sd, vision_heads=4, text_heads=4)
    with pytest.raises(CheckpointMismatchError, match="Supported sources"):
        load_official_clipmoe({"encoder.weight": torch.zeros(2)})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official_clipmoe(tmp_path / "nope.pt")


# ---- OpenAI's own .pt files: TorchScript archives ------------------------------------------------------------


class _Holder(torch.nn.Module):
    """A module tree whose state dict has exactly the given flat names (OpenAI's archive holds such a tree)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for name, value in state.items():
            module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            if value.is_floating_point():
                module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
            else:
                module.register_buffer(leaf, value.clone())

    def forward(self, x):
        return x * self.logit_scale


def openai_clip(seed: int = 7):
    """A tiny dense CLIP whose heads are 64 wide, as OpenAI's (so the head count is inferable), and its state dict
    in OpenAI's layout with the three integer entries OpenAI's archives carry."""
    from transformers import CLIPModel

    from clipmoe_vlm.loading import tiny_clip_config

    config = tiny_clip_config()
    config.vision_config.num_attention_heads = config.text_config.num_attention_heads = 1
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    state = to_official_layout(model)
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(64), vocab_size=torch.tensor(49408))
    return model, state


def save_torchscript(state: dict[str, torch.Tensor], path):
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated in recent torch; OpenAI's files are made with it
        warnings.simplefilter("ignore")
        archive = torch.jit.trace(_Holder(state).eval(), torch.ones(1))
        torch.jit.save(archive, str(path))
    return path


def test_load_clip_reads_an_openai_torchscript_archive(tmp_path, pixel_values):
    import zipfile

    from clipmoe_vlm.loading import load_clip

    model, state = openai_clip()
    archive = save_torchscript(state, tmp_path / "ViT-tiny.pt")
    with pytest.raises(RuntimeError, match="TorchScript"):  # what the safe loader alone does with it
        torch.load(archive, weights_only=True)
    assert any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(archive).namelist())
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    from_archive, from_plain = load_clip(str(archive)).eval(), load_clip(str(plain)).eval()
    assert from_archive.state_dict().keys() == from_plain.state_dict().keys()
    for key, value in from_archive.state_dict().items():
        assert torch.equal(value, from_plain.state_dict()[key]), key
    pixels = torch.nn.functional.interpolate(pixel_values, size=64)
    tokens = torch.randint(1, 49000, (3, 12), generator=torch.Generator().manual_seed(8))
    tokens[:, 9], tokens[:, 10:] = 49407, 0  # OpenAI's EOT (the highest id), zero padding
    for got, want in zip(embeddings(from_archive, pixels, tokens), embeddings(model, pixels, tokens)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_load_clip_reads_an_official_release_saved_as_torchscript(tmp_path):
    from transformers import CLIPModel

    from clipmoe_vlm.loading import load_clip, tiny_clip_config

    torch.manual_seed(9)
    state = to_official_layout(sparse_upcycle(CLIPModel(tiny_clip_config()), num_experts=2, top_k=1))
    loaded = load_clip(str(save_torchscript(state, tmp_path / "clip-moe.pt")))
    assert isinstance(loaded, CLIPMoEModel) and loaded.config.vision_config.num_experts == 2
    assert torch.equal(loaded.text_model.encoder.layers[1].mlp.gate.weight, state["transformer.resblocks.1.gate.weight"])


def test_load_clip_unwraps_a_training_checkpoint(tmp_path):
    from clipmoe_vlm.loading import load_clip

    model, state = openai_clip()
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    loaded = load_clip(str(path))
    assert torch.equal(loaded.text_projection.weight, model.text_projection.weight)


def test_load_clip_names_an_unreadable_pt_file(tmp_path):
    from clipmoe_vlm.loading import load_clip

    _, state = openai_clip()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"--base .*corrupt\.pt.*cannot read .*corrupt\.pt"):
        load_clip(str(corrupt))
    plain = tmp_path / "truncated.pt"
    torch.save(state, plain)
    plain.write_bytes(plain.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.pt"):
        load_clip(str(plain))
    archive = save_torchscript(state, tmp_path / "damaged.pt")
    data = bytearray(archive.read_bytes())
    start = data.find(b"constants.pkl")  # keep the zip's directory readable, break a member's bytes
    data[60:start - 40] = bytes(len(data[60:start - 40]))
    archive.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read the TorchScript archive .*damaged\.pt"):
        load_clip(str(archive))
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": [torch.zeros(1)], "optimizer": object.__new__(_Holder)}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.pt as a PyTorch state dict \(UnpicklingError"):  # no unsafe retry
        load_clip(str(pickled))
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match=r"list\.pt holds a list"):
        load_clip(str(not_a_state_dict))
