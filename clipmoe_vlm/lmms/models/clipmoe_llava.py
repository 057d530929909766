"""lmms-eval model ``clipmoe_llava``: a transformers LLaVA-1.5 folder whose vision tower is a CLIP-MoE.

``python -m lmms_eval --model clipmoe_llava --model_args pretrained=FOLDER[,dtype=bfloat16,device=cuda,...]``

The folder is what the training pipeline writes: ``LlavaForConditionalGeneration`` weights and config (the
vision config may be a ``CLIPMoEVisionConfig``) plus a ``LlavaProcessor`` (image processor and tokenizer).

Prompting follows LLaVA-1.5's evaluation (``llava.eval``, lmms-eval's ``llava`` model): the task context becomes
the single user turn of the ``vicuna_v1`` conversation; when the context has no ``<image>`` placeholder and the
document has images, ``"<image>\\n"`` (one per image, space-separated) is put in front of it. Images are padded
to a square with the processor's mean colour (``image_aspect_ratio=pad``, as LLaVA-1.5 trains) unless
``image_aspect_ratio=original``.

Generation is greedy unless the task's ``generation_kwargs`` ask for sampling (``do_sample: true``, or a
temperature > 0 without ``do_sample``). The task's ``until`` strings stop generation and are cut from the answer
(upstream ``llava``/``llava_hf`` ignore them). Requests are batched by identical generation settings, longest
prompt first, with left padding.

``loglikelihood`` returns ``(negative log-likelihood, is_greedy)`` of the continuation scored as the assistant's
answer (``" " + continuation`` after ``ASSISTANT:``, as the template renders answers). lmms-eval picks
multiple-choice answers with ``argmin``, so the first value is a loss (lower is better), as upstream ``llava``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ...data.conversation import Turn, get_template
from ...data.llava_images import expand_to_square
from ..errors import EvalSetupError, check_model_folder

__all__ = ["ClipMoELlava", "check_model_folder"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generation_kwargs keys passed on to `generate`; `until` and `image_aspect_ratio` are handled here.
_GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process
    return torch.device(device)


def _stop_strings(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise TypeError(f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}")
    return [stop for stop in until if isinstance(stop, str) and stop]


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for stop in until:
        position = text.find(stop)
        if position != -1:
            end = min(end, position)
    return text[:end]


class ClipMoELlava(lmms):
    """A transformers LLaVA-1.5 with a CLIP-MoE (or CLIP) vision tower, as an lmms-eval simple model.

    Model args (``--model_args k=v,...``):
        pretrained: the model folder (required).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N``; default ``cuda`` when available. Under ``torchrun`` /
            ``accelerate launch`` ``cuda`` means ``cuda:$LOCAL_RANK``.
        conv_template: a `clipmoe_vlm.data.conversation` template (default ``vicuna_v1``).
        max_new_tokens: default generation length when the task does not set it (1024, as upstream llava).
        batch_size: prompts per ``generate`` call (also ``--batch_size``).
        image_aspect_ratio: ``pad`` (default; LLaVA-1.5) or ``original`` (the processor's resize/crop only).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "",
        dtype: str = "float32",
        device: str | None = None,
        conv_template: str = "vicuna_v1",
        max_new_tokens: int = 1024,
        batch_size: int | str = 1,
        image_aspect_ratio: str = "pad",
        max_batch_size: int | None = None,  # passed by the lmms-eval CLI; unused
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise EvalSetupError(
                f"clipmoe_llava: unknown model_args {sorted(unknown)}; valid: pretrained, dtype, device, "
                "conv_template, max_new_tokens, batch_size, image_aspect_ratio"
            )
        folder = check_model_folder(pretrained)
        if str(dtype) not in _DTYPES:
            raise EvalSetupError(f"clipmoe_llava: dtype={dtype!r}; choose one of {sorted(_DTYPES)}")
        if image_aspect_ratio not in ("pad", "original"):
            raise EvalSetupError(f"clipmoe_llava: image_aspect_ratio={image_aspect_ratio!r}; choose pad or original")
        try:
            self.template = get_template(str(conv_template))
        except ValueError as error:
            raise EvalSetupError(f"clipmoe_llava: {error}") from None
        try:
            self.batch_size_per_gpu = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
        except ValueError:
            raise EvalSetupError(
                f"clipmoe_llava: batch_size={batch_size!r} and max_new_tokens={max_new_tokens!r} must be integers"
            ) from None
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise EvalSetupError("clipmoe_llava: batch_size and max_new_tokens must be >= 1")

        from transformers import AutoProcessor, LlavaForConditionalGeneration

        import clipmoe_vlm  # noqa: F401  (registers the CLIP-MoE classes with the Auto classes)

        self._device = _resolve_device(device)
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=_DTYPES[str(dtype)])
        self.model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_aspect_ratio = image_aspect_ratio
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self._background = tuple(int(value * 255) for value in mean)
        self._warned_keys: set[str] = set()

    # ------------------------------------------------------------------ lmms-eval plumbing
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ prompt and inputs
    def build_prompt(self, context: str, num_images: int) -> str:
        """The ``conv_template`` generation prompt for one user turn, images in front when missing."""
        image_token = self.template.image_token
        if num_images and image_token not in context:
            context = " ".join([image_token] * num_images) + "\n" + context
        return self.template.generation_prompt([Turn("human", context)])

    def _prepare_images(self, visuals: Sequence[Any] | None, aspect: str) -> list[Image.Image]:
        images = []
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise TypeError(f"clipmoe_llava handles images only; doc_to_visual returned {type(visual).__name__}")
            image = visual.convert("RGB")
            if aspect == "pad":
                image = expand_to_square(image, self._background)
            images.append(image)
        return images

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        inputs = {key: value.to(self._device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = {key: gen_kwargs[key] for key in _GENERATE_KEYS if gen_kwargs.get(key) is not None}
        for key in sorted(set(gen_kwargs) - set(_GENERATE_KEYS) - {"until", "image_aspect_ratio"}):
            if key not in self._warned_keys:
                self._warned_keys.add(key)
                logger.warning(f"clipmoe_llava: ignoring generation_kwargs[{key!r}]")
        kwargs["max_new_tokens"] = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.get("temperature", 0.0))
        do_sample = bool(kwargs["do_sample"]) if "do_sample" in kwargs else temperature > 0
        kwargs["do_sample"] = do_sample
        if do_sample:
            kwargs["temperature"] = temperature if temperature > 0 else 1.0
        else:
            kwargs.pop("temperature", None)
            kwargs.pop("top_p", None)
            kwargs.pop("top_k", None)
        kwargs["num_beams"] = int(kwargs.get("num_beams", 1))
        return kwargs

    # ------------------------------------------------------------------ generation
    def generate_batch(
        self, contexts: Sequence[str], visuals: Sequence[Sequence[Any]], gen_kwargs: dict[str, Any]
    ) -> list[str]:
        """Answers for prompts that share ``gen_kwargs`` (one ``generate`` call, left padded)."""
        until = _stop_strings(gen_kwargs.get("until"))
        aspect = gen_kwargs.get("image_aspect_ratio", self.image_aspect_ratio)
        per_doc = [self._prepare_images(v, aspect) for v in visuals]
        prompts = [self.build_prompt(context, len(images)) for context, images in zip(contexts, per_doc)]
        inputs = self._encode(prompts, [image for images in per_doc for image in images])
        kwargs = self._generate_kwargs(gen_kwargs)
        if until:
            kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **kwargs,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop_strings(text, until).strip() for text in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            gen_kwargs = request.args[1]
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(position)
        batches = []
        for positions in groups.values():
            positions.sort(key=lambda p: -len(requests[p].args[0]))  # longest first: OOM shows at once
            for start in range(0, len(positions), self.batch_size):
                batches.append(positions[start : start + self.batch_size])
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="clipmoe_llava generate")
        for batch in batches:
            contexts, visuals = [], []
            for position in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[position].args
                contexts.append(context)
                doc = self.task_dict[task][split][doc_id]
                visuals.append(doc_to_visual(doc) if doc_to_visual is not None else [])
            gen_kwargs = dict(requests[batch[0]].args[1])
            answers = self.generate_batch(contexts, visuals, gen_kwargs)
            for position, answer in zip(batch, answers):
                results[position] = answer
                self.cache_hook.add_partial("generate_until", (requests[position].args[0], gen_kwargs), answer)
            progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        """Multi-round tasks: round 0 answers the context; each later round asks ``doc_to_text(doc,
        previous_output=[answers so far], round_idx=i, previous_round_info=...)`` for
        ``(visuals, context, terminal, round_result, info)`` and stops when ``terminal`` is true. Returns the
        ``round_result`` of the terminal call (or the list of answers when it gives none)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="clipmoe_llava multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            answers: list[str] = []
            info = None
            final = None
            round_idx = 0
            while True:
                answers.append(self.generate_batch([context], [visuals], dict(gen_kwargs))[0])
                round_idx += 1
                visuals, context, terminal, final, info = doc_to_text(
                    doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                )
                if terminal:
                    break
            results.append(final if final is not None else answers)
        return results

    # ------------------------------------------------------------------ scoring
    def continuation_nll(self, context: str, continuation: str, visuals: Sequence[Any]) -> tuple[float, bool]:
        """Summed negative log-likelihood of ``continuation`` as the assistant's answer to ``context``, and
        whether greedy decoding would produce exactly those tokens."""
        images = self._prepare_images(visuals, self.image_aspect_ratio)
        prompt = self.build_prompt(context, len(images))
        inputs = self._encode([prompt], images)
        answer = continuation if continuation[:1].isspace() else " " + continuation
        answer_ids = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        answer_ids = answer_ids.to(self._device)
        if answer_ids.shape[1] == 0:
            return 0.0, True
        prompt_length = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0, prompt_length - 1 : -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = answer_ids[0]
        nll = -log_probs.gather(1, targets[:, None]).sum().item()
        is_greedy = bool((logits.argmax(dim=-1) == targets).all())
        return nll, is_greedy

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="clipmoe_llava loglikelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):  # doc_to_target may give [answer]
                continuation = continuation[0]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            result = self.continuation_nll(context, str(continuation), visuals)
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results
