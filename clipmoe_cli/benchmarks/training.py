"""The ``train`` and ``generate`` items: a CLIP-MoE training step's FLOP/s against the peak matmul FLOP/s, and
LLaVA generation tokens/s with a CLIP-MoE tower against a dense tower."""

from __future__ import annotations

import statistics

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from clipmoe_vlm.losses import load_balancing_loss
from upcycle.contrastive import clip_contrastive_loss
from upcycle.trainable import set_trainable

from .models import clip_moe, vision_configs, vit_clip_config
from .timing import count_flops, interleaved, peak_matmul, vision_tower_flops

__all__ = ["bench_generate", "bench_train", "train_step_fn"]


def train_step_fn(model, stage: str, batch: int, moe_losses: bool = True):
    """One training step of ``model`` at ``stage`` (``"router"`` or ``"mcl"`` trainable set) on a fixed random
    batch: CLIP loss (+ load-balancing loss), backward, AdamW. Returns the step as a callable."""
    set_trainable(model, "router" if stage == "router" else "mcl")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    vc, tc = model.config.vision_config, model.config.text_config
    pix = torch.randn(batch, 3, vc.image_size, vc.image_size)
    ids = torch.randint(1, tc.vocab_size - 1, (batch, tc.max_position_embeddings))
    ids[:, -1] = tc.vocab_size - 1

    def step():
        out = model(input_ids=ids, pixel_values=pix, output_router_logits=moe_losses)
        loss = clip_contrastive_loss(out.image_embeds, out.text_embeds, 100.0, 0.1)
        if moe_losses and out.image_router_logits:
            loss = loss + 0.01 * load_balancing_loss(out.image_router_logits, vc.top_k)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def bench_train(size: str, layers: int | None, batch: int, repeats: int, peak_n: int, log=print) -> list[dict]:
    config = vit_clip_config(size, layers)
    rows = []
    for stage in ("router", "mcl"):
        model = clip_moe(config)
        step = train_step_fn(model, stage, batch)
        step()  # warm-up (optimizer state)
        flops = count_flops(step)
        mm = peak_matmul(peak_n)
        res = interleaved({"step": step, "peak_matmul": mm}, repeats=repeats, reference="peak_matmul")
        peak = 2 * peak_n ** 3 / res["median_s"]["peak_matmul"]
        achieved_rounds = [flops / a / (2 * peak_n ** 3 / b)
                           for a, b in zip(res["times_s"]["step"], res["times_s"]["peak_matmul"])]
        frac = statistics.median(achieved_rounds)
        row = {"stage": stage, "size": size, "vision_layers": config.vision_config.num_hidden_layers,
               "text_layers": config.text_config.num_hidden_layers, "batch": batch,
               "flops_per_step": flops, "step_median_s": res["median_s"]["step"],
               "achieved_gflops_per_s": flops / res["median_s"]["step"] / 1e9,
               "peak_matmul_n": peak_n, "peak_gflops_per_s": peak / 1e9,
               "fraction_of_peak": frac, "target": ">= 0.50", "pass": frac >= 0.5}
        rows.append(row)
        log(f"train     {stage:6s} {size:12s} B={batch}  {flops/1e9:8.1f} GFLOP/step  step "
            f"{row['step_median_s']*1e3:8.1f} ms  achieved {row['achieved_gflops_per_s']:6.1f} GFLOP/s  peak "
            f"{row['peak_gflops_per_s']:6.1f} GFLOP/s  fraction {frac:.3f} (target >= 0.50, "
            f"{'ok' if row['pass'] else 'MISS'})")
        del model
    return rows


def _llava(vision_config, lm: dict):
    n_patch = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config,
                         text_config=LlamaConfig(vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                 max_position_embeddings=2048, **lm),
                         image_token_id=1000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=n_patch)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), n_patch


def bench_generate(vision_size: str, vision_layers: int, lm: dict, new_tokens: int, repeats: int,
                   name: str = "", log=print) -> dict:
    dcfg, mcfg = vision_configs(vision_size, vision_layers)
    dense, n_patch = _llava(dcfg, lm)
    moe, _ = _llava(mcfg, lm)
    moe.model.language_model.load_state_dict(dense.model.language_model.state_dict())  # same LM
    moe.lm_head.load_state_dict(dense.lm_head.state_dict())
    moe.model.multi_modal_projector.load_state_dict(dense.model.multi_modal_projector.state_dict())
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 900, (1, 16), generator=g)
    ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.full((1, n_patch), 1000), text], dim=1)
    pix = torch.randn(1, 3, dcfg.image_size, dcfg.image_size, generator=g)

    def run(m):
        def f():
            with torch.no_grad():
                return m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=0)
        return f
    res = interleaved({"dense": run(dense), "moe": run(moe)}, repeats=repeats, reference="dense")
    tok_s = {k: new_tokens / v for k, v in res["median_s"].items()}
    ratio = 1.0 / res["ratio_to_dense"]["moe"]
    # FLOP-ideal ratio: LM ~ 2 * (non-embedding params + lm_head) per token processed, plus the tower once.
    lm_model = dense.model.language_model
    lm_params = sum(p.numel() for p in lm_model.parameters()) - lm_model.embed_tokens.weight.numel() \
        + dense.lm_head.weight.numel()
    lm_flops = 2 * lm_params * (ids.shape[1] + new_tokens)
    tower_d = vision_tower_flops(dcfg, 1, moe=False)["total"]
    tower_m = vision_tower_flops(mcfg, 1, moe=True)["total"]
    ideal = (tower_d + lm_flops) / (tower_m + lm_flops)
    row = {"case": name, "vision": vision_size, "vision_layers": vision_layers, "lm": lm,
           "prompt_tokens": ids.shape[1],
           "new_tokens": new_tokens, "median_s": res["median_s"], "tokens_per_s": tok_s,
           "flops_lm_approx": lm_flops, "flops_tower_dense": tower_d, "flops_tower_moe": tower_m,
           "tower_share_of_dense_flops": tower_d / (tower_d + lm_flops), "flop_ideal_tokens_per_s_ratio": ideal,
           "moe_over_dense_tokens_per_s": ratio, "target": ">= 0.95", "pass": ratio >= 0.95}
    log(f"generate  {name}: {vision_size}/L{vision_layers} + Llama h{lm['hidden_size']} L{lm['num_hidden_layers']}  "
        f"{new_tokens} new tokens  dense {tok_s['dense']:7.1f} tok/s  moe {tok_s['moe']:7.1f} tok/s  ratio "
        f"{ratio:.3f} (FLOP-ideal {ideal:.3f}, tower share {row['tower_share_of_dense_flops']:.1%}; "
        f"target >= 0.95, {'ok' if row['pass'] else 'MISS'})")
    return row
