"""What each MCL stage changed, and how different the assembled experts are.

DMU only helps if the stage models encode something the base does not: experts that compute the same function
make a mixture that is the base again. So a dmu run reports

- per stage (the base, then each MCL stage model): held-out retrieval, plus whatever extra evaluation the caller
  supplies (the embedded default adds the Shapes world's zero-shot and MMVP-style metrics);
- per MoE layer of the assembled model: the mean pairwise cosine similarity of the experts' outputs on the same
  held-out tokens (1.0: identical experts), and each expert's relative weight distance from expert 0, the base
  FFN.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from clipmoe_vlm.moe import CLIPMoESparseBlock

__all__ = ["expert_diversity", "stage_table"]


@torch.no_grad()
def expert_diversity(model, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, dict[str, list]]:
    """Per tower (``image``, ``text``): ``output_cosine`` (per MoE layer, the mean over expert pairs of the mean
    cosine similarity of their outputs on the tokens that reach the layer) and ``weight_distance`` (per MoE
    layer, per expert, ``||W_e - W_0|| / ||W_0||`` over both projections)."""
    inputs: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
    hooks = []
    for tower, module in (("image", model.vision_model), ("text", model.text_model)):
        for block in module.modules():
            if isinstance(block, CLIPMoESparseBlock):
                hooks.append(block.register_forward_pre_hook(
                    lambda _, args, tower=tower: inputs[tower].append(args[0].reshape(-1, args[0].shape[-1]))))
    was_training = model.training
    model.eval()
    try:
        model(pixel_values=pixel_values, input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    report: dict[str, dict[str, list]] = {}
    for tower, module in (("image", model.vision_model), ("text", model.text_model)):
        blocks = [b for b in module.modules() if isinstance(b, CLIPMoESparseBlock)]
        cosine, distance = [], []
        for block, tokens in zip(blocks, inputs[tower]):
            experts = block.experts
            outputs = [experts.expert_forward(e, tokens) for e in range(experts.num_experts)]
            pairs = itertools.combinations(range(experts.num_experts), 2)
            cosine.append(round(float(torch.stack([F.cosine_similarity(outputs[a], outputs[b], dim=-1).mean()
                                                   for a, b in pairs]).mean()), 4))
            base = torch.cat([experts.up_proj[0].flatten(), experts.down_proj[0].flatten()])
            distance.append([round(float(torch.cat([experts.up_proj[e].flatten(), experts.down_proj[e].flatten()])
                                         .sub(base).norm() / base.norm()), 4) for e in range(experts.num_experts)])
        report[tower] = {"output_cosine": cosine, "weight_distance": distance}
    return report


def stage_table(stages: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per metric, one column per stage (percent, with ``± se`` where a ``<metric>/se`` is
    given), and the change from the first column (the base) in the last column."""
    names = list(stages)
    keys = [k for k in dict.fromkeys(k for m in stages.values() for k in m)
            if not k.endswith("/se") and k != "n" and isinstance(stages[names[0]].get(k), float)]
    lines = ["| metric | " + " | ".join(names) + f" | {names[-1]} − {names[0]} |",
             "| --- |" + " --- |" * (len(names) + 1)]
    for key in keys:
        cells = []
        for name in names:
            value, se = stages[name].get(key), stages[name].get(f"{key}/se")
            cells.append("-" if value is None else f"{value * 100:.1f}" + (f" ± {se * 100:.1f}" if se else ""))
        first, last = stages[names[0]].get(key), stages[names[-1]].get(key)
        change = "-" if first is None or last is None else f"{(last - first) * 100:+.1f}"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines) + "\n"
