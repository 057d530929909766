"""The model class for lmms-eval's ``LMMS_EVAL_PLUGINS=clipmoe_vlm.lmms`` mechanism, which imports
``clipmoe_vlm.lmms.models`` and reads ``AVAILABLE_MODELS`` (model id -> class in the module of that name). The
``lmms_eval.models`` entry point (`clipmoe_vlm.lmms.model_manifests`) registers the same class."""

AVAILABLE_MODELS = {"clipmoe_llava": "ClipMoELlava"}
