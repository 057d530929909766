"""The sparse block against a naive reference: routing, combine weights, dispatch, capacity and priority."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipmoe_vlm import CLIPMoESparseBlock, CLIPMoEVisionConfig
from clipmoe_vlm.moe import plan_routing


def make_block(**overrides) -> CLIPMoESparseBlock:
    cfg = CLIPMoEVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              **{"num_experts": 4, "top_k": 2, **overrides})
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
            h = F.linear(flat[t], block.experts.fc1_weight[e], block.experts.fc1_bias[e])
            h = block.experts.activation_fn(h)
            out[t] += w[j] * F.linear(h, block.experts.fc2_weight[e], block.experts.fc2_bias[e])
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_dispatch_matches_naive_loop(top_k, norm):
    block = make_block(top_k=top_k, norm_topk_prob=norm)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(block(x), naive_moe(block, x), atol=1e-5, rtol=1e-5)


def test_expert_without_tokens():
    block = make_block()
    with torch.no_grad():  # a router that never picks expert 3
        block.gate.weight[3] = -100.0 * block.gate.weight[:3].abs().sum(0)
    x = torch.randn(2, 5, 16).abs()
    plan = plan_routing(*block.gate(x.reshape(-1, 16))[1:], num_experts=4)
    assert plan.counts[3] == 0 and sum(plan.counts) == 2 * 5 * 2
    torch.testing.assert_close(block(x), naive_moe(block, x), atol=1e-5, rtol=1e-5)


def test_renormalised_weights_sum_to_one_and_raw_gates_do_not():
    x = torch.randn(20, 16)
    _, w, idx = make_block(norm_topk_prob=True).gate(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    logits, w_raw, idx_raw = make_block(norm_topk_prob=False).gate(x)
    probs = logits.float().softmax(-1)
    torch.testing.assert_close(w_raw, probs.gather(1, idx_raw))
    assert (w_raw.sum(-1) < 1).all()
    assert w.dtype == torch.float32


def test_capacity_drops_and_matches_reference():
    block = make_block(capacity_factor=0.5)
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
    plan = plan_routing(w, idx, e, capacity_factor=0.5)
    assert torch.equal(plan.kept, keep)
    assert max(plan.counts) <= capacity and sum(plan.counts) == int(keep.sum()) < t * k
    torch.testing.assert_close(block(x), naive_moe(block, x, keep), atol=1e-5, rtol=1e-5)


def test_batch_priority_routing_keeps_confident_tokens():
    # 8 tokens all preferring expert 0 with increasing confidence; capacity 1 slot per expert for top-1
    num_experts, t = 4, 8
    weights = torch.linspace(0.3, 0.9, t)[:, None]
    indices = torch.zeros(t, 1, dtype=torch.long)
    plan = plan_routing(weights, indices, num_experts, capacity_factor=1.0, priority=weights[:, 0])
    capacity = math.ceil(1 * t * 1.0 / num_experts)  # 2
    assert plan.kept[:, 0].tolist() == [False] * (t - capacity) + [True] * capacity
    plan_fifo = plan_routing(weights, indices, num_experts, capacity_factor=1.0)
    assert plan_fifo.kept[:, 0].tolist() == [True] * capacity + [False] * (t - capacity)


def test_bpr_block_uses_raw_top1_probability():
    block = make_block(capacity_factor=0.25, batch_priority_routing=True)
    x = torch.randn(1, 16, 16)
    flat = x.reshape(-1, 16)
    logits, w, idx = block.gate(flat)
    priority = logits.softmax(-1).amax(-1)
    plan = plan_routing(w, idx, 4, 0.25, priority)
    torch.testing.assert_close(block(x), naive_moe(block, x, plan.kept), atol=1e-5, rtol=1e-5)


def test_dropout_and_jitter_only_in_training():
    block = make_block(expert_dropout=0.5, router_jitter_noise=1.0)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(block(x), block(x))  # eval: deterministic
    block.train()
    torch.manual_seed(0)
    a = block(x)
    torch.manual_seed(1)
    b = block(x)
    assert not torch.allclose(a, b)


def test_gradients_reach_router_and_experts():
    block = make_block().train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    block(x).square().sum().backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    assert block.experts.fc1_weight.grad.abs().sum() > 0
    assert x.grad is not None


def test_bf16_autocast_runs_close_to_fp32():
    block = make_block()
    x = torch.randn(2, 6, 16)
    ref = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
