"""lmms-eval model ``clipmoe_llava``: a transformers LLaVA-1.5 folder whose vision tower is a CLIP-MoE.

``python -m lmms_eval --model clipmoe_llava --model_args pretrained=FOLDER[,dtype=bfloat16,device=cuda,...]``

The folder is what the training pipeline writes: ``LlavaForConditionalGeneration`` weights and config (the
vision config may be a ``CLIPMoEVisionConfig``) plus a ``LlavaProcessor`` (image processor and tokenizer).

Prompting follows LLaVA-1.5's evaluation (``llava.eval``, lmms-eval's ``llava`` model): the task context becomes
the single user turn of the ``vicuna_v1`` conversation; when the context has no ``<image>`` placeholder and the
document has images, ``"<image>\\n"`` (one per image, space-separated) is put in front of it. Images are padded
to a square with the processor's mean colour (``image_aspect_ratio=pad``, as LLaVA-1.5 trains) unless
``image_aspect_ratio=original``: then the image goes to the processor as it is, with the processor's own padding
turned off (``do_pad=False``; this project's folders save a ``LlavaImageProcessor(do_pad=True)``), so only its
resize and centre crop apply.

Default precision (``dtype=auto``): float16 on a GPU (LLaVA-1.5's evaluation precision), float32 on the CPU.

A document whose inputs cannot be built (an image that does not decode, a processor error) does not stop the
run: it is answered with an empty string (scored as failed), logged with its task and doc id, and counted. The
count is logged at the end (``clean``) and, with ``skipped_report=DIR``, written to
``DIR/clipmoe_skipped.rank<R>.json`` after every request type; ``clipmoe eval`` sets it and exits non-zero when
any document was skipped (unless ``--allow_skipped``).

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

__all__ = ["SKIPPED_FILE_GLOB", "ClipMoELlava", "check_model_folder", "resolve_dtype", "skipped_file"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SKIPPED_FILE_GLOB = "clipmoe_skipped.rank*.json"
_MAX_LOGGED_TRACEBACKS = 3
# generation_kwargs keys passed on to `generate`; `until` and `image_aspect_ratio` are handled here.
_GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto`` (or empty): float16 on CUDA (LLaVA-1.5 evaluates in half precision), float32 elsewhere."""
    name = str(dtype or "auto")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise EvalSetupError(f"clipmoe_llava: dtype={dtype!r}; choose auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def skipped_file(folder: str | os.PathLike[str], rank: int) -> str:
    """The JSON file where rank ``rank`` lists the documents it skipped."""
    return os.path.join(os.fspath(folder), SKIPPED_FILE_GLOB.replace("*", str(rank)))


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
        dtype: ``auto`` (default: float16 on a GPU, float32 on the CPU), ``float32``, ``bfloat16``, ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N``; default ``cuda`` when available. Under ``torchrun`` /
            ``accelerate launch`` ``cuda`` means ``cuda:$LOCAL_RANK``.
        conv_template: a `clipmoe_vlm.data.conversation` template (default ``vicuna_v1``).
        max_new_tokens: default generation length when the task does not set it (1024, as upstream llava).
        batch_size: prompts per ``generate`` call (also ``--batch_size``).
        image_aspect_ratio: ``pad`` (default; LLaVA-1.5) or ``original`` (the processor's resize/crop only,
            its padding off).
        skipped_report: folder for ``clipmoe_skipped.rank<R>.json``, the documents skipped for bad inputs.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "",
        dtype: str = "auto",
        device: str | None = None,
        conv_template: str = "vicuna_v1",
        max_new_tokens: int = 1024,
        batch_size: int | str = 1,
        image_aspect_ratio: str = "pad",
        skipped_report: str | None = None,
        max_batch_size: int | None = None,  # passed by the lmms-eval CLI; unused
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise EvalSetupError(
                f"clipmoe_llava: unknown model_args {sorted(unknown)}; valid: pretrained, dtype, device, "
                "conv_template, max_new_tokens, batch_size, image_aspect_ratio, skipped_report"
            )
        folder = check_model_folder(pretrained)
        if str(dtype or "auto") not in ("auto", *_DTYPES):
            raise EvalSetupError(f"clipmoe_llava: dtype={dtype!r}; choose auto or one of {sorted(_DTYPES)}")
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
        self.model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=resolve_dtype(dtype, self._device))
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
        self._skipped: dict[tuple[str, str, int], str] = {}  # (task, split, doc_id) -> error
        self._skipped_report = skipped_file(skipped_report, self._rank) if skipped_report else None
        if self._skipped_report:
            os.makedirs(os.path.dirname(self._skipped_report) or ".", exist_ok=True)
            self._write_skipped()  # a stale file from an earlier run must not survive this one

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

    def _processor_kwargs(self, aspect: str) -> dict[str, Any]:
        """``original``: the processor's own padding off (``LlavaImageProcessor(do_pad=True)`` would pad)."""
        if aspect == "original" and hasattr(self.processor.image_processor, "do_pad"):
            return {"do_pad": False}
        return {}

    def _process(self, prompts: list[str], images: list[Image.Image], aspect: str) -> dict[str, torch.Tensor]:
        """Processor outputs on the CPU (left padded)."""
        return dict(self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt",
                                   **self._processor_kwargs(aspect)))

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {key: value.to(self._device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _encode(self, prompts: list[str], images: list[Image.Image],
                aspect: str | None = None) -> dict[str, torch.Tensor]:
        return self._to_device(self._process(prompts, images, aspect or self.image_aspect_ratio))

    def _collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-document processor outputs as one left-padded batch (what the processor gives for the batch)."""
        length = max(item["input_ids"].shape[1] for item in encoded)
        batch: dict[str, list[torch.Tensor]] = {}
        for item in encoded:
            own = item["input_ids"].shape[1]
            for key, value in item.items():
                if key != "pixel_values" and value.dim() == 2 and value.shape[1] == own and own < length:
                    fill = self.tokenizer.pad_token_id if key == "input_ids" else 0  # mask and token types: 0
                    value = torch.nn.functional.pad(value, (length - own, 0), value=fill)
                batch.setdefault(key, []).append(value)
        return self._to_device({key: torch.cat(values, dim=0) for key, values in batch.items()})

    # ------------------------------------------------------------------ documents that cannot be read
    def _skip(self, task: str, split: str, doc_id: int, error: BaseException) -> None:
        """Record a document whose inputs could not be built; it is answered with an empty string."""
        key = (str(task), str(split), int(doc_id))
        message = f"{type(error).__name__}: {error}"
        if key not in self._skipped:
            self._skipped[key] = message
            text = f"clipmoe_llava: skipped {task} doc {doc_id} (answered ''): {message}"
            if len(self._skipped) <= _MAX_LOGGED_TRACEBACKS:
                logger.opt(exception=error).warning(text)
            else:
                logger.warning(text)

    @property
    def skipped_documents(self) -> list[dict[str, Any]]:
        """The documents skipped so far on this rank: ``task``, ``split``, ``doc_id``, ``error``."""
        return [{"task": task, "split": split, "doc_id": doc_id, "error": error}
                for (task, split, doc_id), error in sorted(self._skipped.items())]

    def _write_skipped(self) -> None:
        if not self._skipped_report:
            return
        report = {"rank": self._rank, "world_size": self._world_size, "skipped": len(self._skipped),
                  "documents": self.skipped_documents}
        partial = self._skipped_report + ".partial"
        with open(partial, "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(partial, self._skipped_report)

    def _report_skipped(self) -> None:
        self._write_skipped()
        if self._skipped:
            where = f" (listed in {self._skipped_report})" if self._skipped_report else ""
            logger.warning(f"clipmoe_llava: rank {self._rank} skipped {len(self._skipped)} document(s) whose inputs "
                           f"could not be built; each was answered with an empty string and scores as failed{where}")

    def clean(self) -> None:
        """Called by lmms-eval after the last request: report the skipped documents, then free the model."""
        self._report_skipped()
        super().clean()

    def _document_inputs(self, request: Instance, context: str, aspect: str) -> dict[str, torch.Tensor] | None:
        """Processor outputs (CPU) for one ``generate_until`` request, or ``None`` (recorded) when its document's
        images cannot be read or processed."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        try:
            doc = self.task_dict[task][split][doc_id]  # datasets decodes the image here
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            images = self._prepare_images(visuals, aspect)
            return self._process([self.build_prompt(context, len(images))], images, aspect)
        except Exception as error:  # one bad document must not end a run of thousands
            self._skip(task, split, doc_id, error)
            return None

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
        aspect = gen_kwargs.get("image_aspect_ratio", self.image_aspect_ratio)
        per_doc = [self._prepare_images(v, aspect) for v in visuals]
        prompts = [self.build_prompt(context, len(images)) for context, images in zip(contexts, per_doc)]
        inputs = self._encode(prompts, [image for images in per_doc for image in images], aspect)
        return self._generate(inputs, gen_kwargs)

    def _generate(self, inputs: dict[str, torch.Tensor], gen_kwargs: dict[str, Any]) -> list[str]:
        until = _stop_strings(gen_kwargs.get("until"))
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
            gen_kwargs = dict(requests[batch[0]].args[1])
            aspect = gen_kwargs.get("image_aspect_ratio", self.image_aspect_ratio)
            encoded = {position: self._document_inputs(requests[position], requests[position].args[0], aspect)
                       for position in batch}
            ready = [position for position in batch if encoded[position] is not None]
            answers = self._generate(self._collate([encoded[p] for p in ready]), gen_kwargs) if ready else []
            by_position = dict(zip(ready, answers))
            for position in batch:
                answer = by_position.get(position, "")  # skipped document: empty answer, scored as failed
                results[position] = answer
                if position in by_position:
                    self.cache_hook.add_partial("generate_until", (requests[position].args[0], gen_kwargs), answer)
            progress.update(len(batch))
        progress.close()
        self._report_skipped()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        """Multi-round tasks: round 0 answers the context; each later round asks ``doc_to_text(doc,
        previous_output=[answers so far], round_idx=i, previous_round_info=...)`` for
        ``(visuals, context, terminal, round_result, info)`` and stops when ``terminal`` is true. Returns the
        ``round_result`` of the terminal call (or the list of answers when it gives none)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="clipmoe_llava multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            try:
                doc = self.task_dict[task][split][doc_id]
                visuals = doc_to_visual(doc) if doc_to_visual is not None else []
                aspect = gen_kwargs.get("image_aspect_ratio", self.image_aspect_ratio)
                images = self._prepare_images(visuals, aspect)  # a bad image fails here, not mid-dialogue
                self._process([self.build_prompt(context, len(images))], images, aspect)
            except Exception as error:
                self._skip(task, split, doc_id, error)
                results.append("")
                continue
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
        self._report_skipped()
        return results

    # ------------------------------------------------------------------ scoring
    def continuation_nll(self, context: str, continuation: str, visuals: Sequence[Any]) -> tuple[float, bool]:
        """Summed negative log-likelihood of ``continuation`` as the assistant's answer to ``context``, and
        whether greedy decoding would produce exactly those tokens."""
        return self._continuation_nll(self._nll_inputs(context, visuals), continuation)

    def _nll_inputs(self, context: str, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        images = self._prepare_images(visuals, self.image_aspect_ratio)
        return self._process([self.build_prompt(context, len(images))], images, self.image_aspect_ratio)

    def _continuation_nll(self, inputs: dict[str, torch.Tensor], continuation: str) -> tuple[float, bool]:
        inputs = self._to_device(inputs)
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
            try:
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                if isinstance(continuation, list):  # doc_to_target may give [answer]
                    continuation = continuation[0]
                visuals = doc_to_visual(doc) if doc_to_visual is not None else []
                inputs = self._nll_inputs(context, visuals)
            except Exception as error:
                self._skip(task, split, doc_id, error)
                results.append((float("inf"), False))  # every option of a skipped document is equally unlikely
                continue
            result = self._continuation_nll(inputs, str(continuation))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        self._report_skipped()
        return results
