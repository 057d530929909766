"""The sparse Mixture-of-Experts FFN block that replaces a CLIP MLP.

Shapes: T tokens (batch * sequence, flattened), H hidden size, I intermediate size, E experts, k experts per
token.

Routing (`CLIPMoERouter`): a bias-free linear layer gives logits (T, E); softmax in fp32; top-k. The combine
weights are either renormalised over the k selected experts (CLIP-MoE, Mixtral) or the raw softmax gates
(V-MoE, LIMoE). Optional Gaussian jitter on the logits in training (V-MoE's noisy top-k).

Capacity (`capacity_mask`): an optional limit of ``ceil(k * T * capacity_factor / E)`` assignments per expert,
filling the buffers first with every token's top-1 choice, then top-2, ..., and within each level in token order
or, with batch priority routing, in order of the token's top-1 gate value (V-MoE/LIMoE). A dropped assignment
keeps its (valid) expert index and gets combine weight 0, so it contributes nothing under every experts
implementation, forward and backward: the token keeps its residual.

Experts (`CLIPMoEExperts`): E CLIP MLPs on transformers' experts interface
(``transformers.integrations.moe.use_experts_implementation``, non-gated, with biases, weights stored
(E, out, in)): ``up_proj`` (E, I, H), ``up_proj_bias`` (E, I), ``down_proj`` (E, H, I), ``down_proj_bias``
(E, H), so that ``up_proj[e]`` is exactly a dense CLIP ``mlp.fc1.weight``. Upcycling is a stack, every expert
tensor is one parameter for DDP/ZeRO-3 (no "unused parameter" when an expert gets no token). The kernel is
the config's ``experts_implementation``: ``"eager"`` (the `CLIPMoEExperts.forward` below: tokens sorted by
expert, one matmul per expert over its slice; the default without CUDA; under torch.compile/export it runs as
grouped_mm), ``"grouped_mm"`` (one grouped GEMM per projection; the default with CUDA) or ``"batched_mm"`` (one
batched matmul over the T*k gathered expert weights), chosen at ``from_pretrained(..., experts_implementation=...)``
or with ``model.set_experts_implementation(...)``.
The expert dropout (``expert_dropout``) sits inside ``act_fn`` (activation, then dropout), so every
implementation applies it where CLIP-MoE does, between the activation and the output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import grouped_mm_experts_forward, use_experts_implementation

__all__ = [
    "LEGACY_EXPERT_KEYS",
    "CLIPMoEExperts",
    "CLIPMoERouter",
    "CLIPMoESparseBlock",
    "ExpertActivation",
    "capacity_mask",
    "default_experts_implementation",
    "rename_legacy_expert_key",
]

# Expert key names before the experts interface -> now (same layout: (E, out, in) weights, (E, out) biases).
# `from_pretrained` maps them through transformers' conversion mapping (see clipmoe_vlm.modeling_clip_moe), and
# `CLIPMoEExperts` accepts them in a plain ``load_state_dict`` (a state dict or safetensors file of an older run).
LEGACY_EXPERT_KEYS = {
    "mlp.experts.fc1_weight": "mlp.experts.up_proj",
    "mlp.experts.fc1_bias": "mlp.experts.up_proj_bias",
    "mlp.experts.fc2_weight": "mlp.experts.down_proj",
    "mlp.experts.fc2_bias": "mlp.experts.down_proj_bias",
}


def rename_legacy_expert_key(key: str) -> str:
    """``key`` with a pre-interface expert parameter name replaced by its new name (any other key unchanged)."""
    for old, new in LEGACY_EXPERT_KEYS.items():
        if key == old or key.endswith("." + old):
            return key[: len(key) - len(old)] + new
    return key


class CLIPMoERouter(nn.Module):
    """Bias-free linear router. ``forward`` returns ``(router_logits, combine_weights, expert_indices)``.

    ``router_logits`` (T, E) are the logits the routing decision was made from (after jitter in training);
    the encoder layer returns them and transformers' output capturing records them as ``router_logits``.
    ``combine_weights`` (T, k) are fp32.
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


class ExpertActivation(nn.Module):
    """The experts' ``act_fn``: CLIP's activation, then the expert dropout (identity when 0 or in eval)."""

    def __init__(self, hidden_act: str, dropout: float = 0.0):
        super().__init__()
        self.activation = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(hidden_states))


@use_experts_implementation(has_gate=False, has_bias=True, is_transposed=False)
class CLIPMoEExperts(nn.Module):
    """E CLIP MLPs (fc1 -> activation -> dropout -> fc2) stored as stacked tensors (see the module docstring).

    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` -> (T, H): the weighted sum of
    each token's experts, dispatched to ``config._experts_implementation``; the code below is ``"eager"``.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        num_experts, hidden, inter = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, inter))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.act_fn = ExpertActivation(config.hidden_act, config.expert_dropout)
        for e in range(num_experts):  # each expert initialised like an nn.Linear
            nn.init.kaiming_uniform_(self.up_proj[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.down_proj[e], a=math.sqrt(5))
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x`` (N, H) -> (N, H), unweighted."""
        h = self.act_fn(F.linear(x, self.up_proj[e], self.up_proj_bias[e]))
        return F.linear(h, self.down_proj[e], self.down_proj_bias[e])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # "eager": the T*k assignments sorted by expert, so each expert's tokens form one contiguous slice and
        # each expert runs one matmul over it (a loop over E experts, never over tokens); the weighted results
        # are summed per token in fp32 (as the grouped_mm and batched_mm implementations do).
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            # the loop below needs each expert's token count as a Python int, which a traced graph cannot have:
            # under torch.compile and torch.export the same function runs as transformers' grouped_mm kernel
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        num_tokens, top_k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_index = order // top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # data-dependent: not exportable
        x_sorted = hidden_states[token_index]
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self.expert_forward(e, x_sorted[start:start + n]))
            start += n
        out_sorted = torch.cat(pieces, dim=0) if pieces else x_sorted
        out_sorted = out_sorted * top_k_weights.reshape(-1)[order, None]
        out = out_sorted.new_zeros(num_tokens, hidden_states.shape[-1]).index_add_(0, token_index, out_sorted)
        return out.to(hidden_states.dtype)


def default_experts_implementation() -> str:
    """The kernel a CLIP-MoE model gets when none is asked for: ``eager`` on a machine without CUDA (on CPU it beat
    ``grouped_mm`` in 9 of 10 measured rows, docs/performance.md), transformers' ``grouped_mm`` where CUDA is."""
    return "grouped_mm" if torch.cuda.is_available() else "eager"


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: this module's pre-interface keys (``fc1_weight``, ...) get their new names."""
    for old, new in LEGACY_EXPERT_KEYS.items():
        old_key, new_key = prefix + old.rsplit(".", 1)[1], prefix + new.rsplit(".", 1)[1]
        if old_key in state_dict and new_key not in state_dict:
            state_dict[new_key] = state_dict.pop(old_key)


def capacity_mask(indices: torch.Tensor, num_experts: int, capacity_factor: float,
                  priority: torch.Tensor | None = None) -> torch.Tensor:
    """(T, k) bool: the top-k assignments that fit in the experts' capacity.

    Each expert keeps at most ``ceil(k * T * capacity_factor / E)`` assignments, filled k-major (every token's
    top-1 choice before any top-2 choice) and, within a level, in token order or, with ``priority`` (T,) given,
    highest priority first (batch priority routing). Free of data-dependent Python values (exportable).
    """
    num_tokens, top_k = indices.shape
    capacity = math.ceil(top_k * num_tokens * capacity_factor / num_experts)
    token_order = (torch.argsort(priority, descending=True, stable=True) if priority is not None
                   else torch.arange(num_tokens, device=indices.device))
    ordered = indices[token_order].t().reshape(-1)  # (k*T,) k-major
    one_hot = (ordered[:, None] == torch.arange(num_experts, device=indices.device)).long()  # (k*T, E)
    position = (one_hot.cumsum(dim=0) - 1).gather(1, ordered[:, None]).squeeze(1)  # slot in its expert
    kept_ordered = (position < capacity).view(top_k, num_tokens).t()  # (T, k) in token_order
    kept = torch.empty_like(kept_ordered)
    kept[token_order] = kept_ordered
    return kept


class CLIPMoESparseBlock(nn.Module):
    """The MoE replacement of ``CLIPMLP``: (B, S, H) -> ``(hidden_states (B, S, H), router_logits (B*S, E))``."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.batch_priority_routing = config.batch_priority_routing
        self.gate = CLIPMoERouter(config.hidden_size, config.num_experts, config.top_k,
                                  config.norm_topk_prob, config.router_jitter_noise)
        self.experts = CLIPMoEExperts(config)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(router_logits (T, E), combine weights (T, k) fp32, expert indices (T, k))`` for tokens ``x`` (T, H);
        with a capacity factor, the dropped assignments' weights are 0."""
        logits, weights, indices = self.gate(x)
        if self.capacity_factor is not None:
            # BPR ranks tokens by their raw top-1 gate value (not the renormalised weight).
            priority = logits.float().softmax(dim=-1).amax(dim=-1) if self.batch_priority_routing else None
            kept = capacity_mask(indices, self.num_experts, self.capacity_factor, priority)
            weights = weights * kept.to(weights.dtype)
        return logits, weights, indices

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # (T, H)
        logits, weights, indices = self.route(x)
        out = self.experts(x, indices, weights)
        return out.to(hidden_states.dtype).view(batch, seq, hidden), logits
