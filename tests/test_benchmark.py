"""The benchmark's FLOP formulas, its contenders (the naive per-expert loop is also the reference) against the sparse block,
and a smoke run of `scripts/benchmark.py`."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPMLP

from clipmoe_cli import benchmarks
from clipmoe_cli.benchmarks.models import clip_moe, vit_clip_config
from clipmoe_cli.benchmarks.moe import NaiveLoopMoE, with_padded_bmm
from clipmoe_cli.benchmarks.timing import count_flops, moe_layer_flops, vision_tower_flops
from clipmoe_cli.benchmarks.training import train_step_fn
from clipmoe_vlm import CLIPMoESparseBlock, CLIPMoEVisionConfig, CLIPMoEVisionModel
from clipmoe_vlm.moe import capacity_mask

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)


def _block(**overrides) -> CLIPMoESparseBlock:
    cfg = CLIPMoEVisionConfig(**{**SMALL, "num_experts": 4, "top_k": 2, "experts_implementation": "grouped_mm",
                                 **overrides})
    torch.manual_seed(0)
    block = CLIPMoESparseBlock(cfg)
    with torch.no_grad():
        for p in block.experts.parameters():
            p.normal_(0, 0.3)
    return block.eval()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_layer_flops_match_flop_counter(top_k):
    block = _block(top_k=top_k)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert count_flops(lambda: block(x)[0]) == moe_layer_flops(10, 32, 48, 4, top_k)
        dense = CLIPMLP(CLIPVisionConfig(**SMALL)).eval()
        assert count_flops(lambda: dense(x)) == moe_layer_flops(10, 32, 48, 4, top_k, dense=True)
    # the FLOP-equivalent dense contender: an MLP on k times the tokens
    assert moe_layer_flops(10 * top_k, 32, 48, 4, top_k, dense=True) == \
        moe_layer_flops(10, 32, 48, 4, top_k) - 2 * 10 * 32 * 4


@pytest.mark.parametrize("moe_layers", [None, [1]])
def test_vision_tower_flops_match_flop_counter(moe_layers):
    dense_cfg = CLIPVisionConfig(**SMALL)
    moe_cfg = CLIPMoEVisionConfig(**SMALL, num_experts=4, top_k=2, moe_layers=moe_layers)
    torch.manual_seed(0)
    pix = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense, moe = CLIPVisionModel(dense_cfg).eval(), CLIPMoEVisionModel(moe_cfg).eval()
        assert count_flops(lambda: dense(pixel_values=pix)) == vision_tower_flops(dense_cfg, 3, moe=False)["total"]
        assert count_flops(lambda: moe(pixel_values=pix)) == vision_tower_flops(moe_cfg, 3, moe=True)["total"]
        # the same count with eager attention (plain matmuls, which FlopCounterMode knows without help)
        eager = CLIPVisionModel(CLIPVisionConfig(**SMALL, attn_implementation="eager")).eval()
        assert eager.config._attn_implementation == "eager"
        with FlopCounterMode(display=False) as counter:
            eager(pixel_values=pix)
        assert counter.get_total_flops() == vision_tower_flops(dense_cfg, 3, moe=False)["total"]
    parts = vision_tower_flops(moe_cfg, 3, moe=True)
    assert parts["total"] == parts["patch"] + parts["attention"] + parts["ffn"]


def test_naive_peer_matches_block_with_empty_expert():
    block = _block()
    with torch.no_grad():  # a router that never picks expert 3
        block.gate.weight[3] = -100.0 * block.gate.weight[:3].abs().sum(0)
    x = torch.randn(3, 7, 32).abs()
    assert torch.bincount(block.gate(x.reshape(-1, 32))[2].reshape(-1), minlength=4)[3] == 0
    with torch.no_grad():
        torch.testing.assert_close(NaiveLoopMoE(block)(x), block(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k,norm", [(1, True), (2, True), (2, False), (3, True)])
def test_naive_peer_matches_block_random_routing(seed, top_k, norm):
    block = _block(top_k=top_k, norm_topk_prob=norm)
    with torch.no_grad():
        block.gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(100 + seed))
        torch.testing.assert_close(NaiveLoopMoE(block)(x), block(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
def test_naive_peer_matches_block_with_capacity_drops(capacity_factor, bpr):
    block = _block(capacity_factor=capacity_factor, batch_priority_routing=bpr)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        flat = x.reshape(-1, 32)
        logits, _, idx = block.gate(flat)
        priority = logits.softmax(-1).amax(-1) if bpr else None
        kept = capacity_mask(idx, 4, capacity_factor, priority)
        if capacity_factor < 1.0:
            assert not kept.all()  # some assignments really are dropped
        torch.testing.assert_close(NaiveLoopMoE(block)(x), block(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("contender", [with_padded_bmm, NaiveLoopMoE], ids=["padded_bmm", "naive_loop"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_benchmark_contenders_match_block(capacity_factor, contender):
    """The moe_layer item's contenders compute what the block computes (so the benchmark races equals)."""
    block = _block(capacity_factor=capacity_factor)
    with torch.no_grad():
        block.gate.weight[3] = -100.0 * block.gate.weight[:3].abs().sum(0)  # expert 3 gets no token
        x = torch.randn(2, 9, 32).abs()
        torch.testing.assert_close(contender(block)(x), block(x)[0], atol=1e-5, rtol=1e-5)


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        benchmarks.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--items", "--quick", "--dtypes", "--repeats", "--threads", "--profile", "--json", "--seed"):
        assert flag in text


def test_quick_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    benchmarks.main(["--quick", "--items", "moe_layer", "tower", "train", "generate", "data", "loop", "--dtypes",
                    "fp32", "--repeats", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["items"]) == {"moe_layer", "tower", "train", "generate", "data", "loop"}
    for key in ("cpu", "logical_cores", "torch", "torch_threads", "load_average", "isa", "bf16_native"):
        assert key in result["machine_before"]
    row = result["items"]["moe_layer"][0]
    assert row["dtype"] == "fp32" and row["moe_over_dense"] > 0 and row["naive_over_dense"] > 0
    assert all(v > 0 for v in row["median_s"].values())
    tower = result["items"]["tower"][0]
    assert tower["ideal_time_ratio"] > 1 and tower["efficiency"] > 0 and tower["images_per_s"]["moe"] > 0
    assert {r["stage"] for r in result["items"]["train"]} == {"router", "mcl"}
    assert all(r["fraction_of_peak"] > 0 and r["flops_per_step"] > 0 for r in result["items"]["train"])
    gen = result["items"]["generate"][0]
    assert gen["moe_over_dense_tokens_per_s"] > 0 and gen["tokens_per_s"]["dense"] > 0
    data = result["items"]["data"]
    assert data["loader_samples_per_s"] > 0 and data["train_step_samples_per_s"] > 0
    loop = {r["contender"]: r for r in result["items"]["loop"]}
    assert set(loop) == {"loop_decoded", "loop_streaming"} and loop["loop_decoded"]["steps"] == 256 // 64
    assert all(r["ratio_to_raw_step"] > 0 and len(r["times_s"]) == 1 for r in loop.values())
    assert loop["loop_streaming"]["pass"] is None and isinstance(loop["loop_decoded"]["pass"], bool)


def test_train_step_flops_count_sdpa_like_eager():
    """A tiny CLIP-MoE: the forward FLOPs counted with SDPA equal the eager-attention count; a training step's
    SDPA count is at least the eager one (the CPU attention backward computes dQ, dK, dV even where autograd
    on eager attention skips them, e.g. the first layer behind frozen embeddings)."""
    forward, step = [], []
    for impl in ("sdpa", "eager"):
        model = clip_moe(vit_clip_config("tiny"))
        model.set_attn_implementation(impl)
        assert model.config.vision_config._attn_implementation == impl
        ids = torch.randint(1, 1000, (2, 77))
        pix = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            forward.append(count_flops(lambda m=model, i=ids, p=pix: m(input_ids=i, pixel_values=p)))
        step.append(count_flops(train_step_fn(model, "mcl", 4)))
    assert forward[0] == forward[1] > 0
    assert step[0] >= step[1] > 2 * forward[1]


@pytest.mark.parametrize("case", ["sparse_upcycle", "dmu_assembly", "load_official"])
def test_upcycle_item_measures_each_case(case):
    """The ``upcycle`` item's measurement (in this process, at the tiny size): the MoE it builds has E x the FFN
    parameters of the dense CLIP, the peak is read, and the official-layout case round-trips to the same model."""
    from clipmoe_cli.benchmarks.upcycle import _official_layout, _random_dense, measure_case
    from clipmoe_vlm.convert import load_official_clipmoe, sparse_upcycle

    r = measure_case(case, "tiny", 2)
    dense = _random_dense("tiny")
    ffn = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    routers = sum(tower.config.hidden_size * 2 * len(tower.encoder.layers)  # (E, H) per MoE layer
                  for tower in (dense.vision_model, dense.text_model))
    assert r["moe_parameters"] == sum(p.numel() for p in dense.parameters()) + ffn + routers
    # The kernel's RSS counters are per-CPU and read approximately (Linux >= 6.2): allow a few MiB of slack.
    assert r["peak_rss_bytes"] >= r["rss_before_bytes"] - 4 * 2**20 > 0 and r["cpu_seconds"] >= 0
    if case == "load_official":
        moe = sparse_upcycle(dense, num_experts=2, top_k=2)
        back = load_official_clipmoe(_official_layout(moe), num_experts=2)
        for key, value in moe.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
