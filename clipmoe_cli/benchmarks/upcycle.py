"""The ``upcycle`` item: time and peak memory of building a CLIP-MoE from weights at real size.

Each case runs in a fresh Python process (so its peak resident memory is its own): it builds the dense CLIP of
``size`` from its config with random weights (meta device, then ``normal_``, which is cheap), prepares the
case's inputs, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), times the operation and
reads ``VmHWM``. Cases:

- ``sparse_upcycle``: `clipmoe_vlm.convert.sparse_upcycle` of the dense CLIP into E experts in every layer of
  both towers;
- ``dmu_assembly``: the DMU recipe's assembly (upcycle/recipes.py): `sparse_upcycle` with ``expert_sources``,
  expert ``e`` written from the ``e``-th of E FFN sets (E-1 stage copies of the dense FFNs);
- ``load_official``: `load_official_clipmoe` of the same CLIP-MoE in the official release's OpenAI layout.

Target: CPU seconds <= 10 and peak RSS <= (resident before + MoE bytes) * 1.10 (``resident before``: the process
with the dense model and the case's inputs). The time target is on the process's CPU time, which a shared,
loaded machine does not inflate; the wall time is recorded next to it.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

import torch

__all__ = ["UPCYCLE_CASES", "bench_upcycle"]

UPCYCLE_CASES = ("sparse_upcycle", "dmu_assembly", "load_official")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# OpenAI's ViT-L/14-336 CLIP text tower (768 wide, 12 heads, 768-d projection): with it the CLIP has 428M
# parameters, as the release; `vit_clip_config` gives every size ViT-B's 512-wide text tower
_REAL_TEXT = {"vit-l14-336": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)}


def _random_dense(size: str):
    """The dense CLIP of ``size`` with N(0, 0.02) weights, built without transformers' (slow) init."""
    from transformers import CLIPModel

    from .models import vit_clip_config

    config = vit_clip_config(size)
    if size in _REAL_TEXT:
        text = dict(_REAL_TEXT[size])
        config.projection_dim = config.vision_config.projection_dim = text["projection_dim"]
        for key, value in text.items():
            setattr(config.text_config, key, value)
    with torch.device("meta"):
        dense = CLIPModel(config)
    dense.to_empty(device="cpu")
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
        for module in dense.modules():
            ids = getattr(module, "position_ids", None)
            if isinstance(ids, torch.Tensor):
                ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    return dense.eval()


def _official_layout(moe) -> dict[str, torch.Tensor]:
    """``moe``'s state dict in the official release's OpenAI layout (views where the layouts agree)."""
    sd = moe.state_dict()
    v, t = "vision_model.", "text_model."
    out = {"visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd[v + "embeddings.class_embedding"],
           "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t(), "text_projection": sd["text_projection.weight"].t(),
           "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
           "positional_embedding": sd[t + "embeddings.position_embedding.weight"], "logit_scale": sd["logit_scale"]}
    for src, dst in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"visual.{dst}.{kind}"] = sd[f"{v}{src}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = sd[f"{t}final_layer_norm.{kind}"]
    for src, dst, tower in ((v, "visual.transformer.", moe.vision_model), (t, "transformer.", moe.text_model)):
        for i in range(len(tower.encoder.layers)):
            s, d = f"{src}encoder.layers.{i}.", f"{dst}resblocks.{i}."
            for kind in ("weight", "bias"):
                out[d + f"ln_1.{kind}"], out[d + f"ln_2.{kind}"] = sd[s + f"layer_norm1.{kind}"], \
                    sd[s + f"layer_norm2.{kind}"]
                out[d + f"attn.out_proj.{kind}"] = sd[s + f"self_attn.out_proj.{kind}"]
            out[d + "attn.in_proj_weight"] = torch.cat([sd[s + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[d + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{p}_proj.bias"] for p in "qkv"])
            out[d + "gate.weight"] = sd[s + "mlp.gate.weight"]
            for e in range(sd[s + "mlp.experts.up_proj"].shape[0]):
                for name, fc in (("up_proj", "c_fc"), ("down_proj", "c_proj")):
                    out[d + f"experts.{e}.{fc}.weight"] = sd[s + f"mlp.experts.{name}"][e]
                    out[d + f"experts.{e}.{fc}.bias"] = sd[s + f"mlp.experts.{name}_bias"][e]
    return out


def _bytes(module_or_sd) -> int:
    tensors = module_or_sd.values() if isinstance(module_or_sd, dict) else module_or_sd.parameters()
    return sum(x.numel() * x.element_size() for x in tensors)


def measure_case(case: str, size: str, num_experts: int) -> dict:
    """Runs one case in this process (`bench_upcycle` calls it in a child process) and returns its record."""
    from clipmoe_vlm.convert import load_official_clipmoe, sparse_upcycle

    torch.manual_seed(0)
    dense = _random_dense(size)
    dense_bytes = _bytes(dense)
    run = None
    if case == "sparse_upcycle":
        def run():
            return sparse_upcycle(dense, num_experts=num_experts, top_k=2)
    elif case == "dmu_assembly":
        base = dense.state_dict()
        ffns = [{k: v.clone() for k, v in base.items() if ".mlp." in k} for _ in range(num_experts - 1)]
        sources = [base] + [{**base, **ffn} for ffn in ffns]

        def run():
            return sparse_upcycle(dense, num_experts=num_experts, top_k=2, expert_sources=sources)
    elif case == "load_official":
        moe = sparse_upcycle(dense, num_experts=num_experts, top_k=2)
        official = {k: v.clone() for k, v in _official_layout(moe).items()}  # a file's worth of separate tensors
        del moe, dense
        dense_bytes = 0

        def run():
            return load_official_clipmoe(official, num_experts=num_experts)
    else:
        raise ValueError(f"unknown upcycle case {case!r}; valid: {', '.join(UPCYCLE_CASES)}")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    # Read after the reset: memory freed between a read and the reset would leave the peak below "before".
    before_kib = _status_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    result = run()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = _status_kib("VmHWM")
    moe_bytes = _bytes(result)
    return {"case": case, "size": size, "num_experts": num_experts, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(),
            "dense_bytes": dense_bytes, "moe_bytes": moe_bytes, "moe_parameters": sum(p.numel() for p in
                                                                                      result.parameters()),
            "rss_before_bytes": before_kib * 1024, "peak_rss_bytes": peak_kib * 1024,
            "peak_over_before_plus_moe": peak_kib * 1024 / (before_kib * 1024 + moe_bytes)}


def bench_upcycle(size: str = "vit-l14-336", num_experts: int = 4, cases=UPCYCLE_CASES, max_seconds: float = 10.0,
                  log=print) -> list[dict]:
    """Each case of ``cases`` in its own process (see the module docstring); one record per case."""
    records = []
    for case in cases:
        code = ("import json, sys; from clipmoe_cli.benchmarks.upcycle import measure_case; "
                f"print(json.dumps(measure_case({case!r}, {size!r}, {num_experts})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"upcycle case {case} failed:\n{done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r["pass"] = r["cpu_seconds"] <= max_seconds and r["peak_over_before_plus_moe"] <= 1.10
        records.append(r)
        log(f"upcycle {case} {size} E={num_experts}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), peak RSS {r['peak_rss_bytes']/1e9:.2f} GB "
            f"(before {r['rss_before_bytes']/1e9:.2f} GB + MoE {r['moe_bytes']/1e9:.2f} GB; ratio "
            f"{r['peak_over_before_plus_moe']:.3f})")
    return records
