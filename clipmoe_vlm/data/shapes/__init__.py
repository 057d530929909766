"""The Shapes world: a small, deterministic, procedurally generated image–text world.

The toolkit carries this world so that every pipeline (CLIP training and upcycling, encoder evaluation, LLaVA
projector pretraining and instruction tuning, lmms-eval benchmarks) runs without pretrained weights or public
datasets, through the same loaders and file formats as real data. One job per module:

- `world`: vocabulary, :class:`ShapesConfig`, the scene model, per-item random generators and scene sampling;
- `render`: drawing scenes, and the PNG/JPEG encodings;
- `language`: captions, canonical captions, referring expressions and relations;
- `questions`: :class:`QA`, :func:`make_qa`, options, and the LLaVA / MMBench / VizWiz prompt formats;
- `writers`: :class:`WriteResult` and the file helpers every writer shares;
- `writers_llava`: CLIP image-caption pairs, LLaVA pretraining and instruction JSON;
- `benchmarks`: the MMBench, VizWiz and MM-Vet parquet files (schemas in `clipmoe_vlm.lmms.schemas`);
- `encoder_sets`: the retrieval, zero-shot and MMVP-VLM encoder evaluation sets;
- `generate`: :func:`generate_world` (the file layout is in its docstring), the manifest cache and
  ``DEFAULT_WORLD_SIZES``.

The public names are re-exported here; private helpers are imported from their module.
"""

from .benchmarks import write_mmbench, write_mmvet, write_vizwiz
from .encoder_sets import write_mmvp_vlm, write_retrieval, write_zeroshot
from .generate import DEFAULT_WORLD_SIZES, generate_world
from .language import canonical_caption, caption_scene, refer, relations
from .questions import (
    MC_ANSWER_PROMPT,
    MMBENCH_ANSWER_STYLES,
    MMBENCH_OPTIONS_HEADER,
    QA,
    QA_KINDS,
    SHORT_ANSWER_PROMPT,
    VIZWIZ_POST_PROMPT,
    make_qa,
    mmbench_prompt,
    mmbench_target,
    vizwiz_prompt,
)
from .render import object_rgb, render_scene
from .world import (
    ATTRIBUTES,
    DEFAULT_COLORS,
    DEFAULT_CONFIG,
    DEFAULT_COUNT_WEIGHTS,
    DEFAULT_POSITIONS,
    DEFAULT_SHAPES,
    DEFAULT_SIZES,
    FILLS,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    RGB,
    SUPPORTED_SHAPES,
    Scene,
    ShapeObject,
    ShapesConfig,
    item_rng,
    sample_scene,
)
from .writers import WriteResult
from .writers_llava import write_clip_pairs, write_llava_instruct, write_llava_pretrain

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_COLORS",
    "DEFAULT_CONFIG",
    "DEFAULT_COUNT_WEIGHTS",
    "DEFAULT_POSITIONS",
    "DEFAULT_SHAPES",
    "DEFAULT_SIZES",
    "DEFAULT_WORLD_SIZES",
    "FILLS",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "MAX_IMAGE_SIZE",
    "MC_ANSWER_PROMPT",
    "MIN_IMAGE_SIZE",
    "MMBENCH_ANSWER_STYLES",
    "MMBENCH_OPTIONS_HEADER",
    "QA",
    "QA_KINDS",
    "RGB",
    "SHORT_ANSWER_PROMPT",
    "SUPPORTED_SHAPES",
    "VIZWIZ_POST_PROMPT",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "WriteResult",
    "canonical_caption",
    "caption_scene",
    "generate_world",
    "item_rng",
    "make_qa",
    "mmbench_prompt",
    "mmbench_target",
    "object_rgb",
    "refer",
    "relations",
    "render_scene",
    "sample_scene",
    "vizwiz_prompt",
    "write_clip_pairs",
    "write_llava_instruct",
    "write_llava_pretrain",
    "write_mmbench",
    "write_mmvet",
    "write_mmvp_vlm",
    "write_retrieval",
    "write_vizwiz",
    "write_zeroshot",
]
