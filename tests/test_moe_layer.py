"""The sparse block against a naive reference: routing, combine weights, dispatch, capacity and priority (under
every experts implementation: eager, grouped_mm, batched_mm)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipmoe_vlm import CLIPMoESparseBlock, CLIPMoEVisionConfig
from clipmoe_vlm.moe import capacity_mask

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def make_block(implementation: str = "eager", **overrides) -> CLIPMoESparseBlock:
    cfg = CLIPMoEVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              experts_implementation=implementation, **{"num_experts": 4, "top_k": 2, **overrides})
    torch.manual_seed(0)
    block = CLIPMoESparseBlock(cfg)
    with torch.no_grad():
        for p in block.experts.parameters():
            p.normal_(0, 0.3)
    return block.eval()


def naive_moe(block: CLIPMoESparseBlock, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Token-by-token reference: softmax, top-k, optional renormalisation, weighted sum of expert MLPs."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.linear(flat, block.gate.weight).float().softmax(-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        w, idx = probs[t].topk(block.top_k)
        if block.gate.norm_topk_prob:
            w = w / w.sum()
        for j in range(block.top_k):
            if keep is not None and not keep[t, j]:
                continue
            e = int(idx[j])
            h = F.linear(flat[t], block.experts.up_proj[e], block.experts.up_proj_bias[e])
            h = block.experts.act_fn(h)
            out[t] += w[j] * F.linear(h, block.experts.down_proj[e], block.experts.down_proj_bias[e])
    return out.view_as(x)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_dispatch_matches_naive_loop(top_k, norm, implementation):
    block = make_block(implementation, top_k=top_k, norm_topk_prob=norm)
    x = torch.randn(3, 7, 16)
    out, logits = block(x)
    torch.testing.assert_close(out, naive_moe(block, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, F.linear(x.reshape(-1, 16), block.gate.weight))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_expert_without_tokens(implementation):
    block = make_block(implementation)
    with torch.no_grad():  # a router that never picks expert 3
        block.gate.weight[3] = -100.0 * block.gate.weight[:3].abs().sum(0)
    x = torch.randn(2, 5, 16).abs()
    counts = torch.bincount(block.gate(x.reshape(-1, 16))[2].reshape(-1), minlength=4)
    assert counts[3] == 0 and counts.sum() == 2 * 5 * 2
    torch.testing.assert_close(block(x)[0], naive_moe(block, x), atol=1e-5, rtol=1e-5)


def test_renormalised_weights_sum_to_one_and_raw_gates_do_not():
    x = torch.randn(20, 16)
    _, w, idx = make_block(norm_topk_prob=True).gate(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    logits, w_raw, idx_raw = make_block(norm_topk_prob=False).gate(x)
    probs = logits.float().softmax(-1)
    torch.testing.assert_close(w_raw, probs.gather(1, idx_raw))
    assert (w_raw.sum(-1) < 1).all()
    assert w.dtype == torch.float32


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_capacity_drops_and_matches_reference(implementation):
    block = make_block(implementation, capacity_factor=0.5)
    x = torch.randn(2, 9, 16)
    flat = x.reshape(-1, 16)
    _, w, idx = block.gate(flat)
    t, k, e = flat.shape[0], 2, 4
    capacity = math.ceil(k * t * 0.5 / e)
    # reference: fill buffers with every token's top-1 choice in token order, then the top-2 choices
    keep = torch.zeros(t, k, dtype=torch.bool)
    fill = [0] * e
    for j in range(k):
        for tok in range(t):
            ex = int(idx[tok, j])
            if fill[ex] < capacity:
                keep[tok, j] = True
                fill[ex] += 1
    kept = capacity_mask(idx, e, capacity_factor=0.5)
    assert torch.equal(kept, keep)
    counts = torch.bincount(idx[kept], minlength=e)
    assert counts.max() <= capacity and counts.sum() == int(keep.sum()) < t * k
    torch.testing.assert_close(block(x)[0], naive_moe(block, x, keep), atol=1e-5, rtol=1e-5)
    # a dropped assignment keeps a valid expert index and gets weight 0 (every implementation ignores it)
    _, w_kept, idx_kept = block.route(flat)
    assert torch.equal(idx_kept, idx) and (w_kept[~keep] == 0).all() and torch.equal(w_kept[keep], w[keep])


def test_batch_priority_routing_keeps_confident_tokens():
    # 8 tokens all preferring expert 0 with increasing confidence; capacity 1 slot per expert for top-1
    num_experts, t = 4, 8
    weights = torch.linspace(0.3, 0.9, t)[:, None]
    indices = torch.zeros(t, 1, dtype=torch.long)
    kept = capacity_mask(indices, num_experts, capacity_factor=1.0, priority=weights[:, 0])
    capacity = math.ceil(1 * t * 1.0 / num_experts)  # 2
    assert kept[:, 0].tolist() == [False] * (t - capacity) + [True] * capacity
    kept_fifo = capacity_mask(indices, num_experts, capacity_factor=1.0)
    assert kept_fifo[:, 0].tolist() == [True] * capacity + [False] * (t - capacity)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bpr_block_uses_raw_top1_probability(implementation):
    block = make_block(implementation, capacity_factor=0.25, batch_priority_routing=True)
    x = torch.randn(1, 16, 16)
    flat = x.reshape(-1, 16)
    logits, _, idx = block.gate(flat)
    priority = logits.softmax(-1).amax(-1)
    kept = capacity_mask(idx, 4, 0.25, priority)
    assert not kept.all()
    torch.testing.assert_close(block(x)[0], naive_moe(block, x, kept), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropout_and_jitter_only_in_training(implementation):
    block = make_block(implementation, expert_dropout=0.5, router_jitter_noise=1.0)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(block(x)[0], block(x)[0])  # eval: deterministic
    block.train()
    torch.manual_seed(0)
    a = block(x)[0]
    torch.manual_seed(1)
    b = block(x)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_expert_dropout_acts_between_activation_and_output_projection(implementation):
    """Every implementation drops the activations (CLIP-MoE's placement): with dropout 1-eps nearly every hidden
    unit is zeroed, so each expert returns about its output bias."""
    block = make_block(implementation, expert_dropout=0.999999).train()
    x = torch.randn(2, 6, 16)
    torch.manual_seed(0)
    out = block(x)[0].reshape(-1, 16)
    _, w, idx = block.gate(x.reshape(-1, 16))
    expected = (w[..., None] * block.experts.down_proj_bias[idx]).sum(1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_reach_router_and_experts(implementation):
    block = make_block(implementation).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    block(x)[0].square().sum().backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    assert block.experts.up_proj.grad.abs().sum() > 0 and block.experts.down_proj_bias.grad.abs().sum() > 0
    assert x.grad is not None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bf16_autocast_runs_close_to_fp32(implementation):
    block = make_block(implementation)
    x = torch.randn(2, 6, 16)
    ref = block(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)[0]
    assert out.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
