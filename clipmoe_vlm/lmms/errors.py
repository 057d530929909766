"""The error type that stops an lmms-eval run, and the model-folder check (light: no torch, no lmms-eval)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["EvalSetupError", "check_model_folder"]


class EvalSetupError(SystemExit):
    """A setup problem (missing model folder, bad data file, judge not configured or unreachable) that must stop
    an lmms-eval run at once, with one line saying what is wrong.

    Why ``SystemExit``: lmms-eval 0.7.3's CLI catches every ``Exception`` raised while it loads the model, the
    tasks or scores samples, prints a traceback, and exits with status 0. The judge code in its tasks also retries
    for minutes and then scores 0. An ``Exception`` raised here would therefore be swallowed. A ``SystemExit`` is
    not caught there, so Python prints only the message and exits with status 1, on every rank of a multi-process
    run. In Python code, catch it as ``EvalSetupError`` (``except Exception`` does not catch it).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_model_folder(pretrained: str | os.PathLike[str]) -> Path:
    """Check that ``pretrained`` is a saved LLaVA folder with a processor.

    Raises:
        EvalSetupError: naming the folder and what is missing.
    """
    folder = Path(pretrained)
    prefix = f"clipmoe_llava: pretrained={str(pretrained)!r}"
    if not str(pretrained):
        raise EvalSetupError("clipmoe_llava: model_args needs pretrained=<LLaVA model folder>")
    if not folder.is_dir():
        raise EvalSetupError(f"{prefix} is not a folder (expected a saved LLaVA model folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise EvalSetupError(f"{prefix} has no config.json (expected a saved LLaVA model folder)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise EvalSetupError(f"{prefix}: cannot read config.json: {error}") from None
    if model_type != "llava":
        raise EvalSetupError(f"{prefix}: config.json has model_type={model_type!r}, expected 'llava'")
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise EvalSetupError(f"{prefix} has no saved LlavaProcessor (processor_config.json / preprocessor_config.json)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise EvalSetupError(f"{prefix} has no saved tokenizer (tokenizer.json / tokenizer_config.json)")
    return folder
