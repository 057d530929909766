"""Encoder evaluation (retrieval, zero-shot classification, MMVP-VLM pairs) and routing analysis of CLIP-MoE.

``from clipmoe_vlm.evaluation import evaluate_encoder, evaluate_shapes_encoder, analyze_routing``; see
`clipmoe_vlm.evaluation.encoder` and `clipmoe_vlm.evaluation.routing`. open_clip and matplotlib are imported only
when a function needs them.
"""

from .encoder import (
    EvalDataError,
    RetrievalSet,
    default_templates,
    encode_images,
    encode_texts,
    evaluate_encoder,
    evaluate_retrieval,
    flatten_metrics,
    load_coco_captions,
    load_flickr_karpathy,
    load_flickr_token,
    mmvp_vlm,
    retrieval_metrics,
    zeroshot_classification,
    zeroshot_classifier,
)
from .routing import (
    TowerRouting,
    analyze_routing,
    collect_routing,
    default_map_layers,
    format_routing_summary,
    plot_expert_usage,
    plot_patch_experts,
    routing_summary,
    text_token_mask,
)
from .shapes import evaluate_shapes_encoder, shapes_encoder_tasks, standard_errors

__all__ = [
    "EvalDataError",
    "RetrievalSet",
    "TowerRouting",
    "analyze_routing",
    "collect_routing",
    "default_map_layers",
    "default_templates",
    "encode_images",
    "encode_texts",
    "evaluate_encoder",
    "evaluate_retrieval",
    "evaluate_shapes_encoder",
    "flatten_metrics",
    "format_routing_summary",
    "load_coco_captions",
    "load_flickr_karpathy",
    "load_flickr_token",
    "mmvp_vlm",
    "plot_expert_usage",
    "plot_patch_experts",
    "retrieval_metrics",
    "routing_summary",
    "shapes_encoder_tasks",
    "standard_errors",
    "text_token_mask",
    "zeroshot_classification",
    "zeroshot_classifier",
]
