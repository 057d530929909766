"""The LLM judge used by MM-Vet (and by MMBench's optional GPT answer matching): one OpenAI-compatible endpoint.

Configuration, the same for both tasks (upstream reads different variables with different URL meanings):

=============================  ===========================================================================
``CLIPMOE_JUDGE_BASE_URL``     base URL of an OpenAI-compatible API, e.g. ``https://api.openai.com/v1`` or
                               ``http://127.0.0.1:8000/v1`` (vLLM, llama.cpp, Ollama ...). A full
                               ``.../chat/completions`` URL is accepted too. Default: ``https://api.openai.com/v1``
                               when only ``CLIPMOE_JUDGE_API_KEY`` is set.
``CLIPMOE_JUDGE_API_KEY``      bearer key (optional for a local server).
``CLIPMOE_JUDGE_MODEL``        judge model name (default ``gpt-4o-2024-11-20``, upstream's default).
``CLIPMOE_JUDGE_TIMEOUT``      seconds per request (default 60).
=============================  ===========================================================================

The judge is configured when ``CLIPMOE_JUDGE_BASE_URL`` or ``CLIPMOE_JUDGE_API_KEY`` is set. Every failure to
reach it raises :class:`JudgeError` (an :class:`~clipmoe_vlm.lmms.errors.EvalSetupError`), which stops the run
with one line: a score is never silently replaced by 0, and there are no minutes of retries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from .errors import EvalSetupError

__all__ = [
    "DEFAULT_JUDGE_MODEL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "ENV_TIMEOUT",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "JudgeNotConfigured",
    "get_judge",
    "parse_judge_score",
]

ENV_BASE_URL = "CLIPMOE_JUDGE_BASE_URL"
ENV_API_KEY = "CLIPMOE_JUDGE_API_KEY"
ENV_MODEL = "CLIPMOE_JUDGE_MODEL"
ENV_TIMEOUT = "CLIPMOE_JUDGE_TIMEOUT"
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"
OPENAI_BASE_URL = "https://api.openai.com/v1"
_CHAT_SUFFIX = "/chat/completions"


class JudgeError(EvalSetupError):
    """The judge could not be reached or refused the request."""


class JudgeNotConfigured(JudgeError):
    """No judge endpoint is configured."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str = DEFAULT_JUDGE_MODEL
    api_key: str = ""
    timeout: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, task: str = "this task") -> JudgeConfig:
        """Read the ``CLIPMOE_JUDGE_*`` variables.

        Raises:
            JudgeNotConfigured: neither ``CLIPMOE_JUDGE_BASE_URL`` nor ``CLIPMOE_JUDGE_API_KEY`` is set.
            EvalSetupError: ``CLIPMOE_JUDGE_TIMEOUT`` is not a positive number.
        """
        env = os.environ if environ is None else environ
        base_url = env.get(ENV_BASE_URL, "").strip()
        api_key = env.get(ENV_API_KEY, "").strip()
        if not base_url and not api_key:
            raise JudgeNotConfigured(
                f"{task} needs an LLM judge and none is configured: set {ENV_BASE_URL} (an OpenAI-compatible "
                f"API, e.g. http://127.0.0.1:8000/v1) and/or {ENV_API_KEY}, and optionally {ENV_MODEL} "
                f"(see docs/evaluation.md)"
            )
        base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        base_url = base_url.removesuffix(_CHAT_SUFFIX)
        raw_timeout = env.get(ENV_TIMEOUT, "60")
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = -1.0
        if timeout <= 0:
            raise EvalSetupError(f"{ENV_TIMEOUT}={raw_timeout!r} is not a positive number of seconds")
        model = env.get(ENV_MODEL, "").strip() or DEFAULT_JUDGE_MODEL
        return cls(base_url=base_url, model=model, api_key=api_key, timeout=timeout)

    @property
    def chat_url(self) -> str:
        return self.base_url + _CHAT_SUFFIX


def parse_judge_score(reply: str) -> float | None:
    """The score in an MM-Vet judge reply, read as upstream reads it, or ``None`` when the reply is not a score.

    Upstream (``lmms_eval/tasks/mmvet/utils.py``) takes the first whitespace-separated token of the reply and
    parses it with ``float``, accepting it only in [0, 1]. So ``"0.5"``, ``"1.0 because ..."``, ``".3"`` and
    ``"01"`` (= 1.0) are scores; ``"10"``, ``"-0.1"``, ``"nan"`` (out of range), ``"0,5"``, ``"0.5."`` and
    ``"n/a"`` (not a float) are not. One difference: upstream splits on a space only, so ``"0.5\\nwhy"`` is
    unparseable there and 0.5 here.
    """
    tokens = reply.split()
    if not tokens:
        return None
    try:
        score = float(tokens[0])
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None  # False for nan


def _sampling_kwargs(model: str, temperature: float, max_tokens: int) -> dict[str, float | int]:
    # Reasoning models take max_completion_tokens and reject a temperature (as lmms-eval's OpenAI provider does).
    if model.startswith(("gpt-5", "o1", "o3", "o4")):
        return {"max_completion_tokens": max_tokens}
    return {"max_tokens": max_tokens, "temperature": temperature}


class Judge:
    """A thin OpenAI-compatible chat client that fails fast with one clear line."""

    def __init__(self, config: JudgeConfig) -> None:
        from openai import OpenAI  # local import: keeps `import clipmoe_vlm.lmms` light

        self.config = config
        # One transport retry (openai backs off ~0.5 s); a dead endpoint fails within seconds.
        self._client = OpenAI(
            base_url=config.base_url, api_key=config.api_key or "EMPTY", timeout=config.timeout, max_retries=1
        )

    def complete(self, prompt: str, *, temperature: float = 0.0, max_tokens: int = 128) -> str:
        """The judge's reply to one user message (stripped; may be empty).

        Raises:
            JudgeError: the endpoint is unreachable, timed out or answered with an HTTP error.
        """
        import openai

        where = f"LLM judge {self.config.model!r} at {self.config.base_url}"
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=[{"role": "user", "content": prompt}],
                **_sampling_kwargs(self.config.model, temperature, max_tokens),
            )
        except openai.APITimeoutError:
            raise JudgeError(f"{where} timed out after {self.config.timeout:g} s ({ENV_TIMEOUT})") from None
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            raise JudgeError(f"{where} is unreachable: {cause} (check {ENV_BASE_URL})") from None
        except openai.APIStatusError as error:
            raise JudgeError(f"{where} answered HTTP {error.status_code}: {_one_line(error.message)}") from None
        choices = getattr(response, "choices", None)
        if not choices:
            raise JudgeError(f"{where} returned no choices (is it an OpenAI-compatible chat endpoint?)")
        return (choices[0].message.content or "").strip()

    def check(self) -> None:
        """One tiny request, so a wrong URL, key or model name stops the run before any scoring."""
        self.complete("Reply with the number 1.0 and nothing else.", max_tokens=8)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


@lru_cache(maxsize=4)
def get_judge(config: JudgeConfig) -> Judge:
    """A cached :class:`Judge` per configuration (one HTTP client per process)."""
    return Judge(config)
