"""lmms-eval integration: the ``clipmoe_llava`` model, offline task helpers, the LLM judge, data preparation.

lmms-eval finds the model through the ``lmms_eval.models`` entry point, which calls :func:`model_manifests`.
Nothing heavy is imported here: the model class is named by a string and loaded only when requested, and
``import clipmoe_vlm`` never imports this subpackage.
"""

from __future__ import annotations

__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "model_manifests"]

MODEL_ID = "clipmoe_llava"
MODEL_CLASS_PATH = "clipmoe_vlm.lmms.models.clipmoe_llava.ClipMoELlava"


def model_manifests():
    """The ``lmms_eval.models`` entry point: the manifest of ``clipmoe_llava`` (alias ``clipmoe``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH, aliases=("clipmoe",))]
