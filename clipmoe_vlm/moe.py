"""The sparse Mixture-of-Experts FFN block that replaces a CLIP MLP.

Shapes: T tokens (batch * sequence, flattened), H hidden size, I intermediate size, E experts, k experts per
token.

Routing (`CLIPMoERouter`): a bias-free linear layer gives logits (T, E); softmax in fp32; top-k. The combine
weights are either renormalised over the k selected experts (CLIP-MoE, Mixtral) or the raw softmax gates
(V-MoE, LIMoE). Optional Gaussian jitter on the logits in training (V-MoE's noisy top-k).

Dispatch (`CLIPMoESparseBlock`): the T*k (token, expert) assignments are sorted by expert, so each expert's
tokens form one contiguous slice; each expert runs one matrix product over its slice (a loop over E experts,
never over tokens), or one grouped matrix product on GPU; results are weighted and summed back per token
with ``index_add_``. An optional capacity limit drops assignments past ``ceil(k * T * capacity_factor / E)``
per expert, filling the buffers first with every token's top-1 choice, then top-2, ..., and within each
level in token order or, with batch priority routing, in order of the token's top-1 gate value (V-MoE/LIMoE).
A dropped assignment contributes nothing: the token keeps its residual.

Experts are stored as stacked tensors, ``fc1_weight`` (E, I, H), ``fc1_bias`` (E, I), ``fc2_weight``
(E, H, I), ``fc2_bias`` (E, H), so that ``fc1_weight[e]`` is exactly a dense CLIP ``mlp.fc1.weight``: upcycling
is a stack, every expert is one parameter for DDP/ZeRO-3 (no "unused parameter" when an expert gets no
token), and a grouped GEMM needs no copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

__all__ = ["CLIPMoEExperts", "CLIPMoERouter", "CLIPMoESparseBlock", "RoutingPlan", "plan_routing"]


class CLIPMoERouter(nn.Module):
    """Bias-free linear router. ``forward`` returns ``(router_logits, combine_weights, expert_indices)``.

    ``router_logits`` (T, E) are the logits the routing decision was made from (after jitter in training);
    transformers' output capturing records them as ``router_logits``. ``combine_weights`` (T, k) are fp32.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True,
                 jitter_noise: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # nn.Linear's default, U(+-1/sqrt(hidden_size)), as the official CLIP-MoE gate; the CLIP-MoE models'
        # _init_weights applies the same init, so a model's new routers get exactly this.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden_states, self.weight)  # (T, E)
        if self.training and self.jitter_noise > 0:
            logits = logits + torch.randn_like(logits) * self.jitter_noise
        probs = logits.float().softmax(dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)  # (T, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices


class CLIPMoEExperts(nn.Module):
    """E CLIP MLPs (fc1 -> activation -> dropout -> fc2) stored as stacked tensors."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.activation_fn = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout)
        for e in range(num_experts):  # each expert initialised like an nn.Linear
            nn.init.kaiming_uniform_(self.fc1_weight[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.fc2_weight[e], a=math.sqrt(5))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x`` (N, H) -> (N, H)."""
        h = F.linear(x, self.fc1_weight[e], self.fc1_bias[e])
        h = self.dropout(self.activation_fn(h))
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])

    def grouped_forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """All experts over tokens sorted by expert; ``counts[e]`` tokens belong to expert ``e``.

        On CUDA with a PyTorch that has ``torch._grouped_mm`` and bf16 inputs, one grouped GEMM per projection;
        elsewhere a loop over the E experts (each a single matmul over its slice).
        """
        if _can_use_grouped_mm(x_sorted):
            offs = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
            bias1 = torch.repeat_interleave(self.fc1_bias, torch.tensor(counts, device=x_sorted.device), dim=0)
            h = torch._grouped_mm(x_sorted, self.fc1_weight.transpose(1, 2).to(x_sorted.dtype), offs=offs)
            h = self.dropout(self.activation_fn(h + bias1.to(h.dtype)))
            bias2 = torch.repeat_interleave(self.fc2_bias, torch.tensor(counts, device=x_sorted.device), dim=0)
            out = torch._grouped_mm(h, self.fc2_weight.transpose(1, 2).to(h.dtype), offs=offs)
            return out + bias2.to(out.dtype)
        pieces = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self.expert_forward(e, x_sorted[start:start + n]))
            start += n
        if not pieces:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(pieces, dim=0)


def _can_use_grouped_mm(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class RoutingPlan:
    """Where each kept (token, expert) assignment goes, sorted by expert.

    Attributes: ``token_index`` (N,) source token of each sorted assignment, ``weight`` (N,) its combine
    weight (fp32), ``counts`` list of E ints (assignments per expert), ``kept`` (T, k) bool mask of the
    assignments that fit in capacity.
    """

    def __init__(self, token_index: torch.Tensor, weight: torch.Tensor, counts: list[int], kept: torch.Tensor):
        self.token_index = token_index
        self.weight = weight
        self.counts = counts
        self.kept = kept


def plan_routing(weights: torch.Tensor, indices: torch.Tensor, num_experts: int,
                 capacity_factor: float | None = None, priority: torch.Tensor | None = None) -> RoutingPlan:
    """Sorts the top-k assignments by expert and applies the capacity limit.

    Args:
        weights: (T, k) combine weights. indices: (T, k) expert ids.
        capacity_factor: None keeps every assignment; else each expert keeps at most
            ``ceil(k * T * capacity_factor / E)`` assignments.
        priority: (T,) score; with a capacity, higher scores claim buffer slots first within each of the k
            levels (batch priority routing). None means token order.
    """
    num_tokens, top_k = indices.shape
    if capacity_factor is None:
        kept = torch.ones_like(indices, dtype=torch.bool)
    else:
        capacity = math.ceil(top_k * num_tokens * capacity_factor / num_experts)
        token_order = (torch.argsort(priority, descending=True, stable=True) if priority is not None
                       else torch.arange(num_tokens, device=indices.device))
        # k-major order: every token's top-1 choice claims a slot before any top-2 choice.
        ordered = indices[token_order].t().reshape(-1)  # (k*T,)
        one_hot = F.one_hot(ordered, num_experts)  # (k*T, E)
        position = (one_hot.cumsum(dim=0) - 1).gather(1, ordered[:, None]).squeeze(1)  # slot in its expert
        kept_ordered = (position < capacity).view(top_k, num_tokens).t()  # (T, k) in token_order
        kept = torch.empty_like(kept_ordered)
        kept[token_order] = kept_ordered
    flat_expert = indices.reshape(-1)
    flat_token = torch.arange(num_tokens, device=indices.device).repeat_interleave(top_k)
    flat_weight = weights.reshape(-1)
    flat_kept = kept.reshape(-1)
    if capacity_factor is not None:
        flat_expert, flat_token, flat_weight = flat_expert[flat_kept], flat_token[flat_kept], flat_weight[flat_kept]
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    return RoutingPlan(flat_token[order], flat_weight[order], counts, kept)


class CLIPMoESparseBlock(nn.Module):
    """Drop-in replacement for ``CLIPMLP``: (B, S, H) -> (B, S, H)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.batch_priority_routing = config.batch_priority_routing
        self.gate = CLIPMoERouter(config.hidden_size, config.num_experts, config.top_k,
                                  config.norm_topk_prob, config.router_jitter_noise)
        self.experts = CLIPMoEExperts(config.num_experts, config.hidden_size, config.intermediate_size,
                                      config.hidden_act, config.expert_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # (T, H)
        logits, weights, indices = self.gate(x)
        priority = None
        if self.capacity_factor is not None and self.batch_priority_routing:
            # BPR ranks tokens by their raw top-1 gate value (not the renormalised weight).
            priority = logits.float().softmax(dim=-1).amax(dim=-1)
        plan = plan_routing(weights, indices, self.num_experts, self.capacity_factor, priority)
        out_sorted = self.experts.grouped_forward(x[plan.token_index], plan.counts)  # (N, H)
        out_sorted = out_sorted * plan.weight[:, None].to(out_sorted.dtype)
        out = torch.zeros_like(x, dtype=out_sorted.dtype).index_add_(0, plan.token_index, out_sorted)
        return out.to(hidden_states.dtype).view(batch, seq, hidden)
