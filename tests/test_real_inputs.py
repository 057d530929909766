"""Issue #15: the official CLIP-MoE starting point. Long-CLIP's 248 text positions, and routers initialised as the
official gate (a default nn.Linear)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModel, CLIPModel

from clipmoe_vlm import CLIPMoEModel
from clipmoe_vlm.convert import stretch_text_positions
from clipmoe_vlm.loading import tiny_clip_config
from upcycle import sparse_upcycle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_base(context_length: int = 77, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(context_length=context_length)).eval()


def long_clip_table(pre: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's ``load_from_clip`` stretch of a (length, dim) table to 4 * length - 3 * keep rows, written out
    as its loop does: four rows per old step, the last four extrapolated past the last old row."""
    length = pre.shape[0]
    new = torch.zeros(4 * length - 3 * keep, pre.shape[1], dtype=pre.dtype)
    new[:keep] = pre[:keep]
    for i in range(length - 1 - keep):
        a, b = pre[keep + i], pre[keep + i + 1]
        for j in range(4):
            new[keep + 4 * i + j] = (4 - j) * a / 4 + j * b / 4
    step = pre[length - 1] - pre[length - 2]
    for j in range(4):
        new[4 * length - 3 * keep - 4 + j] = pre[length - 1] + j * step / 4
    return new


def eot_tokens(length: int, total: int, seed: int = 3) -> torch.Tensor:
    """3 texts of ``length`` tokens ending in OpenAI's EOT (the highest id), zero-padded to ``total``."""
    ids = torch.zeros(3, total, dtype=torch.long)
    ids[:, :length] = torch.randint(1, 49000, (3, length), generator=torch.Generator().manual_seed(seed))
    ids[:, length - 1] = 49407
    return ids


def text_features(model, ids):
    with torch.no_grad():
        return model.get_text_features(input_ids=ids).pooler_output


def test_openai_77_positions_become_long_clips_248():
    base = tiny_base(77)
    pre = base.text_model.embeddings.position_embedding.weight.detach().clone()
    stretch_text_positions(base)
    table = base.text_model.embeddings.position_embedding.weight.detach()
    assert table.shape == (248, pre.shape[1])
    assert torch.equal(table[:20], pre[:20])
    torch.testing.assert_close(table, long_clip_table(pre))
    assert base.config.text_config.max_position_embeddings == 248
    assert base.text_model.config.max_position_embeddings == 248
    assert torch.equal(base.text_model.embeddings.position_ids, torch.arange(248)[None])


def test_other_lengths_interpolate_at_the_same_rate():
    base = tiny_base(64)
    pre = base.text_model.embeddings.position_embedding.weight.detach().clone()
    stretch_text_positions(base, positions=100, keep=20)
    table = base.text_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(table[:20], pre[:20])
    for r in range(20, 100):  # row r sits at 20 + (r - 20) * 44 / 80 on the old table
        where = 20 + (r - 20) * 44 / 80
        low = min(int(where), 62)
        w = where - low
        torch.testing.assert_close(table[r], (1 - w) * pre[low] + w * pre[low + 1], msg=f"row {r}")


def test_short_texts_embed_exactly_as_before():
    base = tiny_base(77)
    short = eot_tokens(15, 15)
    padded = eot_tokens(15, 77)
    before, before_padded = text_features(base, short), text_features(base, padded)
    stretch_text_positions(base)
    assert torch.equal(text_features(base, short), before)
    torch.testing.assert_close(text_features(base, eot_tokens(15, 248)), before_padded, atol=1e-5, rtol=0)
    long = eot_tokens(200, 248)  # now possible; before it was refused
    assert text_features(base, long).shape == before.shape


def test_stretched_model_saves_reloads_and_upcycles(tmp_path):
    base = stretch_text_positions(tiny_base(64), positions=248)
    base.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["text_config"]["max_position_embeddings"] == 248
    reloaded = AutoModel.from_pretrained(tmp_path / "dense").eval()
    assert torch.equal(reloaded.text_model.embeddings.position_embedding.weight,
                       base.text_model.embeddings.position_embedding.weight)
    moe = sparse_upcycle(reloaded, num_experts=2, top_k=1).eval()
    ids = eot_tokens(30, 248)
    torch.testing.assert_close(text_features(moe, ids), text_features(reloaded, ids), atol=1e-5, rtol=0)


def test_clip_moe_records_text_positions_and_bad_requests_fail():
    moe = sparse_upcycle(tiny_base(64), num_experts=2, top_k=1, upcycling_info={"source": "tiny"})
    assert stretch_text_positions(moe, positions=248) is moe
    assert moe.config.upcycling_info == {"source": "tiny", "text_positions": 248}
    assert moe.text_model.embeddings.position_embedding.weight.shape[0] == 248
    stretch_text_positions(moe, positions=248)  # already there: unchanged
    with pytest.raises(ValueError, match="cannot stretch to 77 text positions: the model already has 248"):
        stretch_text_positions(moe, positions=77)
    with pytest.raises(ValueError, match="keep=70"):
        stretch_text_positions(tiny_base(64), positions=248, keep=70)
    with pytest.raises(TypeError, match="one text tower"):
        stretch_text_positions(moe.vision_model)


def test_upcycling_run_stretches_the_base(tmp_path, monkeypatch):
    from PIL import Image

    from upcycle.cli import main

    (tmp_path / "img").mkdir()
    lines = []
    for i in range(16):
        Image.new("RGB", (64, 64), (40 * (i % 4), 200, 40 * (i // 4))).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"colour {i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--data", str(tmp_path / "pairs.jsonl"), "--base", "tiny-random", "--recipe", "clip-up",
            "--batch-size", "8", "--num-workers", "0", "--warmup-steps", "1", "--val-fraction", "0.25",
            "--context-length", "32"]
    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    out = main([*args, "--output", str(tmp_path / "run"), "--text-positions", "248"])
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["max_position_embeddings"] == 248
    assert config["upcycling_info"]["text_positions"] == 248
    assert "Text positions: 248" in (out / "README.md").read_text()
    with pytest.raises(SystemExit, match=r"--text-positions 40 \(--base tiny-random\): .*already has 64"):
        main([*args, "--output", str(tmp_path / "bad"), "--text-positions", "40"])


# ---- routers ----------------------------------------------------------------------------------------------------


def routers(moe: CLIPMoEModel) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in moe.named_parameters() if n.endswith("mlp.gate.weight")])


def test_new_routers_are_initialised_as_a_default_linear():
    hidden = 64
    torch.manual_seed(0)
    weights = routers(sparse_upcycle(tiny_base(64), num_experts=4, top_k=2))
    assert weights.numel() == 4 * hidden * 7  # 4 vision + 3 text MoE layers
    bound = 1 / math.sqrt(hidden)
    assert weights.abs().max() <= bound
    assert weights.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # std of U(-b, b)
    assert weights.mean().abs() < 0.1 * bound
    torch.manual_seed(0)
    assert torch.equal(routers(sparse_upcycle(tiny_base(64), num_experts=4, top_k=2)), weights)  # seeded
