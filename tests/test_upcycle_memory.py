"""Upcycling builds the CLIP-MoE without a random initialisation and without a second copy (issue #14).

The bytes each call allocates are counted with a ``TorchDispatchMode`` (every op output whose storage is new),
and compared with the MoE model's own size: sparse upcycling writes every MoE tensor once, so it allocates the
MoE and little else (the old path allocated a randomly initialised MoE and a stacked state dict, twice as much).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import CLIPModel

from clipmoe_vlm.convert import StackedStateDict, load_state_dict_checked, sparse_upcycle, upcycle_state_dict
from clipmoe_vlm.loading import tiny_clip_config


class AllocationCounter(TorchDispatchMode):
    """Sums the bytes of the new CPU storages that ops create (views and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.random_fills = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        seen = set(inputs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr and ptr not in seen:
                    seen.add(ptr)
                    self.bytes += t.untyped_storage().nbytes()
        if func.overloadpacket in (torch.ops.aten.normal_, torch.ops.aten.uniform_) and args[0].device.type == "cpu":
            self.random_fills += args[0].numel()
        return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config()).eval()


def test_sparse_upcycle_allocates_the_moe_once_and_no_random_init(dense):
    with AllocationCounter() as counter:
        moe = sparse_upcycle(dense, num_experts=4, top_k=2)
    moe_bytes = _nbytes(moe.parameters())
    routers = [p for n, p in moe.named_parameters() if n.endswith("mlp.gate.weight")]
    assert routers
    # the MoE itself plus small change (buffers, the routers' clone); the old path allocated over 2x
    assert moe_bytes <= counter.bytes <= 1.05 * moe_bytes, (counter.bytes, moe_bytes)
    # only the routers are drawn at random (kaiming-uniform), nothing of expert or model size
    assert counter.random_fills == sum(r.numel() for r in routers)
    bound = 1 / routers[0].shape[1] ** 0.5  # nn.Linear's U(+-1/sqrt(fan_in))
    assert all(0 < r.abs().max() <= bound and r.std() > bound / 4 for r in routers)
    experts = moe.vision_model.encoder.layers[1].mlp.experts
    for e in range(4):
        assert torch.equal(experts.down_proj[e], dense.vision_model.encoder.layers[1].mlp.fc2.weight)
    # the expert tensors are the model's own storage, not views of the dense weights
    assert experts.up_proj.untyped_storage().data_ptr() != \
        dense.vision_model.encoder.layers[1].mlp.fc1.weight.untyped_storage().data_ptr()


def test_routers_are_seeded(dense):
    torch.manual_seed(3)
    a = sparse_upcycle(dense, num_experts=4, top_k=2)
    torch.manual_seed(3)
    b = sparse_upcycle(dense, num_experts=4, top_k=2)
    key = "text_model.encoder.layers.1.mlp.gate.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])


def test_expert_assembly_stacks_lazily_one_tensor_at_a_time(dense):
    moe = sparse_upcycle(dense, num_experts=3, top_k=2)
    base = dense.state_dict()
    sources = [base] + [{**base, **{k: v + s for k, v in base.items() if ".mlp." in k}} for s in (1.0, 2.0)]
    expert_bytes = _nbytes(p for n, p in moe.named_parameters() if ".experts." in n)
    with AllocationCounter() as counter:
        state = upcycle_state_dict(base, moe, expert_sources=sources)
    assert isinstance(state, StackedStateDict)
    assert counter.bytes < 0.05 * expert_bytes  # nothing stacked yet
    load_state_dict_checked(moe, state, source="assembled")
    for e, shift in enumerate((0.0, 1.0, 2.0)):
        torch.testing.assert_close(moe.text_model.encoder.layers[0].mlp.experts.up_proj_bias[e],
                                   dense.text_model.encoder.layers[0].mlp.fc1.bias + shift, rtol=0, atol=0)
    assert state.shape("text_model.encoder.layers.0.mlp.experts.up_proj") == \
        tuple(moe.text_model.encoder.layers[0].mlp.experts.up_proj.shape)


def test_sparse_upcycle_with_expert_sources_writes_each_expert_once(dense):
    """DMU's assembly in one call: expert ``e`` is source ``e``'s FFN exactly, everything else and the routers are
    what plain upcycling gives under the same seed, and the call allocates the MoE once (no stacked temporaries)."""
    base = dense.state_dict()
    sources = [base] + [{**base, **{k: v * (1 + s) for k, v in base.items() if ".mlp." in k}} for s in (1.0, 2.0)]
    torch.manual_seed(5)
    plain = sparse_upcycle(dense, num_experts=3, top_k=2)
    torch.manual_seed(5)
    with AllocationCounter() as counter:
        moe = sparse_upcycle(dense, num_experts=3, top_k=2, expert_sources=sources)
    moe_bytes = _nbytes(moe.parameters())
    assert moe_bytes <= counter.bytes <= 1.05 * moe_bytes, (counter.bytes, moe_bytes)
    got, want = moe.state_dict(), plain.state_dict()
    assert got.keys() == want.keys()
    for key in got:
        if ".mlp.experts." not in key:
            assert torch.equal(got[key], want[key]), key
    for e, factor in enumerate((1.0, 2.0, 3.0)):
        for tower in (moe.vision_model, moe.text_model):
            dense_tower = getattr(dense, "vision_model" if tower is moe.vision_model else "text_model")
            for layer, dense_layer in zip(tower.encoder.layers, dense_tower.encoder.layers):
                assert torch.equal(layer.mlp.experts.up_proj[e], dense_layer.mlp.fc1.weight * factor)
                assert torch.equal(layer.mlp.experts.down_proj_bias[e], dense_layer.mlp.fc2.bias * factor)
