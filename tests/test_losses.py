"""Auxiliary router losses against values computed by hand on small logits."""

from __future__ import annotations

import math

import pytest
import torch

from clipmoe_vlm.losses import (
    expert_load,
    global_entropy_loss,
    load_balancing_loss,
    local_entropy_loss,
    router_z_loss,
)

# Two layers, three tokens, three experts; logits chosen so the softmax is easy to write down.
LN2, LN3 = math.log(2.0), math.log(3.0)
LAYER0 = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN3, 0.0], [0.0, 0.0, 0.0]])  # p: [.5,.25,.25] [.2,.6,.2] [1/3]*3
LAYER1 = torch.tensor([[0.0, 0.0, LN2], [LN3, 0.0, 0.0], [0.0, LN2, 0.0]])  # p: [.25,.25,.5] [.6,.2,.2] [.25,.5,.25]
P0 = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [1 / 3, 1 / 3, 1 / 3]]
P1 = [[0.25, 0.25, 0.5], [0.6, 0.2, 0.2], [0.25, 0.5, 0.25]]


def H(p):
    return -sum(x * math.log(x) for x in p)


def test_load_balancing_top1_by_hand():
    # top-1 choices: layer0 -> 0, 1, (tie -> 0); layer1 -> 2, 0, 1. Pooled over 6 tokens: f = [3/6, 2/6, 1/6].
    f = [3 / 6, 2 / 6, 1 / 6]
    p = [sum(P0[t][e] + P1[t][e] for t in range(3)) / 6 for e in range(3)]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    got = load_balancing_loss((LAYER0, LAYER1), top_k=1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_load_balancing_uniform_routing_is_k():
    logits = torch.zeros(4, 10, 8)
    # with ties every token picks the same experts, but P is uniform: E * sum_j f_j . (1/E) = k
    assert load_balancing_loss(logits, top_k=2).item() == pytest.approx(2.0)


def test_load_balancing_mask_excludes_padding():
    padded = torch.cat([LAYER0, torch.full((3, 3), 5.0) * torch.tensor([1.0, 0, 0])])  # 3 extra "padding" tokens
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert load_balancing_loss((padded,), 1, mask).item() == pytest.approx(
        load_balancing_loss((LAYER0,), 1).item(), rel=1e-6)


def test_router_z_loss_by_hand():
    lse = [math.log(sum(math.exp(v) for v in row)) for layer in (LAYER0, LAYER1) for row in layer.tolist()]
    expected = sum(v * v for v in lse) / len(lse)
    assert router_z_loss((LAYER0, LAYER1)).item() == pytest.approx(expected, rel=1e-6)


def test_local_entropy_by_hand():
    expected = (sum(H(p) for p in P0) / 3 + sum(H(p) for p in P1) / 3) / 2
    assert local_entropy_loss([LAYER0, LAYER1]).item() == pytest.approx(expected, rel=1e-6)


def test_global_entropy_and_threshold_by_hand():
    mean0 = [sum(P0[t][e] for t in range(3)) / 3 for e in range(3)]
    mean1 = [sum(P1[t][e] for t in range(3)) / 3 for e in range(3)]
    h0, h1 = H(mean0), H(mean1)
    assert global_entropy_loss([LAYER0, LAYER1]).item() == pytest.approx(-(h0 + h1) / 2, rel=1e-6)
    # soft minimum of S=3 experts: log 3 - H > 0 since the means are not uniform
    expected = (max(0.0, LN3 - h0) + max(0.0, LN3 - h1)) / 2
    assert global_entropy_loss([LAYER0, LAYER1], soft_min_experts=3).item() == pytest.approx(expected, abs=1e-6)
    # S=2: both entropies exceed log 2, so the thresholded loss is zero
    assert h0 > math.log(2) and h1 > math.log(2)
    assert global_entropy_loss([LAYER0, LAYER1], soft_min_experts=2).item() == 0.0


def test_expert_load_counts_assignments():
    load = expert_load([LAYER0, LAYER1], top_k=1)
    torch.testing.assert_close(load, torch.tensor([[2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert torch.allclose(expert_load([LAYER0], top_k=2).sum(-1), torch.ones(1))


def test_losses_backpropagate_to_logits():
    logits = torch.randn(2, 5, 4, requires_grad=True)
    total = load_balancing_loss(logits, 2) + router_z_loss(logits) + local_entropy_loss(logits) \
        + global_entropy_loss(logits, soft_min_experts=4)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_empty_router_logits_is_an_error():
    with pytest.raises(ValueError, match="router_logits is empty"):
        load_balancing_loss((), top_k=2)
