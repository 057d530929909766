"""Pieces of the upcycling recipes: contrastive loss, MCL sampler and labels, trainable sets, config merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from upcycle import sparse_upcycle
from upcycle.config import load_config
from upcycle.contrastive import clip_contrastive_loss
from upcycle.mcl import ClusterBatchSampler, accumulate_labels
from upcycle.trainable import set_trainable


def test_contrastive_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale, eps = 10.0, 0.1
    sim = [[scale * sum(a * b for a, b in zip(i, t)) for t in txt.tolist()] for i in img.tolist()]

    def ce(rows):
        total = 0.0
        for r, row in enumerate(rows):
            lse = math.log(sum(math.exp(v) for v in row))
            logp = [v - lse for v in row]
            # label smoothing: (1 - eps) on the target plus eps spread uniformly over all classes
            total += -((1 - eps) * logp[r] + eps * sum(logp) / len(row))
        return total / len(rows)

    expected = (ce(sim) + ce([list(c) for c in zip(*sim)])) / 2
    got = clip_contrastive_loss(img, txt, scale, label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_uses_the_injected_gather():
    unit = torch.nn.functional.normalize
    img, txt = unit(torch.randn(3, 4), dim=-1), unit(torch.randn(3, 4), dim=-1)
    other_img, other_txt = unit(torch.randn(2, 4), dim=-1), unit(torch.randn(2, 4), dim=-1)
    fake_world = {id(img): other_img, id(txt): other_txt}

    def gather(x):  # this process is rank 0 of 2
        return torch.cat([x, fake_world[id(x)]])

    expected = clip_contrastive_loss(torch.cat([img, other_img]), torch.cat([txt, other_txt]), 5.0)
    torch.testing.assert_close(clip_contrastive_loss(img, txt, 5.0, gather=gather, normalize=False), expected)


def test_cluster_sampler_global_batches_are_homogeneous_and_ranks_lockstep():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=200)
    labels[rng.choice(200, 10, replace=False)] = -1
    labels[labels == 4] = 4  # keep
    labels[np.flatnonzero(labels == 3)[3:]] = 2  # cluster 3 now has 3 members: below a global batch
    world, bs = 2, 4
    ranks = [ClusterBatchSampler(labels, bs, world, r, seed=7) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
    used = []
    for b0, b1 in zip(*per_rank):
        global_batch = b0 + b1
        assert len(b0) == len(b1) == bs
        assert len({int(labels[i]) for i in global_batch}) == 1  # one cluster per global batch
        used += global_batch
    assert len(used) == len(set(used)) and all(labels[i] >= 0 for i in used)
    stats = ranks[0].stats
    assert stats.clusters_below_global_batch == 1 and stats.excluded == 10
    assert stats.samples_used + stats.samples_left_over == 190
    # deterministic per (seed, epoch), different across epochs
    again = ClusterBatchSampler(labels, bs, world, 0, seed=7)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert list(again) != per_rank[0]


def test_cluster_sampler_mixed_leftover_and_resume():
    labels = np.repeat(np.arange(4), [10, 3, 7, 5])
    drop = ClusterBatchSampler(labels, 4, 1, 0, seed=0, leftover="drop")
    mixed = ClusterBatchSampler(labels, 4, 1, 0, seed=0, leftover="mixed")
    assert len(list(drop)) == 2 + 0 + 1 + 1
    assert len(list(mixed)) == 4 + (25 - 16) // 4
    assert mixed.stats.mixed_batches == 2 and mixed.stats.samples_left_over == 1
    resumed = ClusterBatchSampler(labels, 4, 1, 0, seed=0, start_batch=2)
    assert list(resumed) == list(drop)[2:]


def test_accumulated_labels():
    prev = np.array([0, 0, 1, 1, -1])
    ci, ct = np.array([0, 1, 0, 1, 0]), np.array([0, 0, 2, 2, 1])
    out = accumulate_labels(prev, ci, ct, 3, 3)
    # joint = 3 * ct + ci = [0, 1, 6, 7, 3]; combined = 9 * prev + joint; the excluded sample stays -1
    assert out.tolist() == [0, 1, 2, 3, -1]
    assert accumulate_labels(None, ci, ct, 3, 3).tolist() == [0, 1, 3, 4, 2]


def test_trainable_sets_are_exact(tiny_dense_clip):
    ffn = set_trainable(tiny_dense_clip, "mcl")
    expected = {f"{tower}.encoder.layers.{i}.mlp.{fc}.{kind}"
                for tower, n in (("vision_model", 3), ("text_model", 2)) for i in range(n)
                for fc in ("fc1", "fc2") for kind in ("weight", "bias")}
    assert set(ffn) == expected
    assert {n for n, p in tiny_dense_clip.named_parameters() if p.requires_grad} == expected
    moe = sparse_upcycle(tiny_dense_clip, 4, 2, moe_layers={"vision": [0, 2], "text": None})
    routers = set(set_trainable(moe, "router"))
    assert routers == {"vision_model.encoder.layers.0.mlp.gate.weight",
                            "vision_model.encoder.layers.2.mlp.gate.weight",
                            "text_model.encoder.layers.0.mlp.gate.weight", "text_model.encoder.layers.1.mlp.gate.weight"}
    both = set(set_trainable(moe, "experts+router"))
    assert both == routers | {f"{p}.mlp.experts.{n}" for p in ("vision_model.encoder.layers.0",
                                                                 "vision_model.encoder.layers.2",
                                                                 "text_model.encoder.layers.0",
                                                                 "text_model.encoder.layers.1")
                              for n in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")}
    assert "logit_scale" not in set_trainable(moe, "all")
    assert "logit_scale" in set_trainable(moe, "router", learn_temperature=True)
    with pytest.raises(ValueError, match="selects no parameter"):
        set_trainable(tiny_dense_clip, "router")


def test_gradients_only_reach_the_trainable_set(tiny_dense_clip, pixel_values, input_ids):
    moe = sparse_upcycle(tiny_dense_clip, 4, 2).train()
    names = set(set_trainable(moe, "router"))
    out = moe(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    out.loss.backward()
    with_grad = {n for n, p in moe.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == names


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: clip-up\nnum_experts: 8\ntop-k: 1\noptim:\n  batch_size: 16\n  router_lr: 1e-5\n")
    cfg = load_config(path, {"batch_size": 4})
    assert (cfg.recipe, cfg.moe.num_experts, cfg.moe.top_k, cfg.optim.batch_size) == ("clip-up", 8, 1, 4)
    assert cfg.optim.router_lr == 1e-5 and isinstance(cfg.optim.router_lr, float)  # YAML 1.1 reads 1e-5 as text
    path.write_text("recipe: dmu\nnum_expert: 8\n")
    with pytest.raises(ValueError, match=r"run\.yaml: unknown key 'num_expert'"):
        load_config(path, {})
    path.write_text("num_experts: [4]\n")
    with pytest.raises(ValueError, match=r"run\.yaml: num_experts: must be int, got \[4\]"):
        load_config(path, {})
    path.write_text("optim:\n  router_lr: fast\n")
    with pytest.raises(ValueError, match=r"run\.yaml: router_lr: must be float, got 'fast'"):
        load_config(path, {})
    path.write_text("recipe: moe\n")
    with pytest.raises(ValueError, match=r"run\.yaml: recipe: must be one of dmu, clip-up, dense"):
        load_config(path, {})
    with pytest.raises(ValueError, match="top_k"):
        load_config(None, {"top_k": 5})
    with pytest.raises(ValueError, match="stages"):
        load_config(None, {"stages": 2, "num_experts": 4})


def test_shipped_upcycling_presets_parse():
    from upcycle.cli import PRESET_SHAPES

    cfg = load_config(PRESET_SHAPES, {})
    assert (cfg.mcl.clusters, cfg.mcl.mcl_leftover, cfg.optim.mcl_lr, cfg.optim.temperature) == (2, "mixed", 5e-4, None)


def test_flags_reach_their_section_and_help_documents_every_setting(capsys):
    from upcycle.cli import build_parser, parse_config

    cfg = parse_config(["--data", "x.jsonl", "--num-experts", "8", "--top-k", "1", "--router-lr", "3e-4",
                        "--temperature", "none", "--no-norm-topk-prob"])
    assert (cfg.data, cfg.moe.num_experts, cfg.optim.router_lr, cfg.optim.temperature) == (["x.jsonl"], 8, 3e-4, None)
    assert cfg.moe.norm_topk_prob is False and cfg.optim.mcl_lr == 1e-5  # no preset with --data
    text = build_parser().format_help()
    for flag in ("--lb-coef-image", "--mcl-leftover", "--shapes-scale", "--stop-after-steps", "--global-entropy-coef"):
        assert flag in text
