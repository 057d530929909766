"""Functions the offline task YAMLs beside this file name with ``!function clipmoe_vlm.lmms.tasks.<fn>``.

The YAMLs call lmms-eval's upstream functions directly wherever they can. What is here:

* ``*_process_docs``: check the loaded parquet for the columns the upstream functions read, so a wrong file
  stops the run at load time with the missing column names (instead of a ``KeyError`` per sample later).
* MM-Vet: upstream ``lmms_eval.tasks.mmvet.utils`` builds its judge client when imported (it needs
  ``OPENAI_API_KEY`` even to load) and retries a dead judge for minutes before scoring 0. Here the upstream
  module is imported with ``API_TYPE=dummy`` (no client, no network), its prompt, ``doc_to_visual``,
  ``doc_to_text`` and aggregation are reused, and the judging itself goes through `clipmoe_vlm.lmms.judge`
  (``CLIPMOE_JUDGE_*`` variables; checked once at load; any failure stops the run with one line).
  A judge reply that is no score in [0, 1] after three tries scores 0 and counts in the task's ``unjudged``
  metric (a count), which ``clipmoe eval`` reports and checks against ``--max_unjudged``.
* MMBench with the judge (task ``mmbench_en_dev_local_gpt``): upstream's evaluator with its API call routed
  through the same judge. The default ``mmbench_en_dev_local`` uses upstream's API-free aggregation.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType
from typing import Any

from loguru import logger

from ..errors import EvalSetupError
from ..judge import JudgeConfig, get_judge, parse_judge_score
from ..prepare import check_columns

__all__ = [
    "mmbench_aggregate_dev_results_judge",
    "mmbench_aggregate_dev_results_submission",
    "mmbench_gpt_process_docs",
    "mmbench_process_docs",
    "mmvet_aggregate_results",
    "mmvet_doc_to_text",
    "mmvet_doc_to_visual",
    "mmvet_process_docs",
    "mmvet_process_results",
    "mmvet_unjudged_count",
    "parse_judge_score",
    "vizwiz_process_docs",
]

_UPSTREAM_MMVET = "lmms_eval.tasks.mmvet.utils"
_IMPORT_LOCK = threading.Lock()


def _source(dataset: Any, task: str) -> str:
    files = sorted({entry.get("filename", "") for entry in getattr(dataset, "cache_files", []) or []})
    return f"{task} data ({', '.join(files) or 'see dataset_kwargs.data_files in its YAML'})"


def mmbench_process_docs(dataset: Any) -> Any:
    """Column check, and ``index`` must be an integer: upstream's aggregation compares it with ``1e6`` and a
    string ``index`` would fail only after all generation."""
    source = _source(dataset, "mmbench_en_dev_local")
    check_columns(dataset.column_names, "mmbench_en_dev", source)
    features = getattr(dataset, "features", None) or {}
    index = features.get("index") if hasattr(features, "get") else None
    dtype = getattr(index, "dtype", None)
    if dtype is not None and not str(dtype).startswith(("int", "uint")):
        raise EvalSetupError(
            f"{source}: column index has type {dtype}, not an integer (upstream's aggregation compares it with "
            "1e6); rewrite it with scripts/prepare_eval_data.py mmbench"
        )
    return dataset


def vizwiz_process_docs(dataset: Any) -> Any:
    check_columns(dataset.column_names, "vizwiz_vqa_val", _source(dataset, "vizwiz_vqa_val_local"))
    return dataset


def _checked_judge(task: str):
    judge = get_judge(JudgeConfig.from_env(task=task))
    judge.check()
    logger.info(f"{task}: LLM judge {judge.config.model!r} at {judge.config.base_url} answered")
    return judge


def mmvet_process_docs(dataset: Any) -> Any:
    """Column check plus one request to the judge, so a missing or dead judge stops the run before generation."""
    check_columns(dataset.column_names, "mmvet", _source(dataset, "mmvet_local"))
    _checked_judge("mmvet_local")
    return dataset


def mmbench_gpt_process_docs(dataset: Any) -> Any:
    mmbench_process_docs(dataset)
    _checked_judge("mmbench_en_dev_local_gpt")
    return dataset


# --------------------------------------------------------------------------- MM-Vet
def _upstream_mmvet() -> ModuleType:
    """``lmms_eval.tasks.mmvet.utils``, imported with ``API_TYPE=dummy`` so that importing builds no client."""
    with _IMPORT_LOCK:
        module = sys.modules.get(_UPSTREAM_MMVET)
        if module is not None:
            return module
        saved = os.environ.get("API_TYPE")
        os.environ["API_TYPE"] = "dummy"
        try:
            return importlib.import_module(_UPSTREAM_MMVET)
        finally:
            if saved is None:
                os.environ.pop("API_TYPE", None)
            else:
                os.environ["API_TYPE"] = saved


def mmvet_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return _upstream_mmvet().mmvet_doc_to_visual(doc)


def mmvet_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return _upstream_mmvet().doc_to_text(doc, lmms_eval_specific_kwargs)


def mmvet_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """Judge one answer with upstream's MM-Vet prompt; same output as upstream ``mmvet_process_results``.

    The judge is asked at temperature 0, then 0.5 and 1.0 if its reply is not a score in [0, 1] (upstream
    ramps the temperature the same way); replies are read by `clipmoe_vlm.lmms.judge.parse_judge_score`, as
    upstream reads them. A reply that never parses scores 0 with a warning naming the question, and the
    ``unjudged`` metric counts it (1 for this document); an unreachable judge raises
    :class:`~clipmoe_vlm.lmms.judge.JudgeError`.
    """
    upstream = _upstream_mmvet()
    prediction = results[0]
    answer = doc["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    prompt = f"{upstream.MM_VET_PROMPT}\n{doc['question']} | {answer} | {prediction} |"
    judge = get_judge(JudgeConfig.from_env(task="mmvet_local"))
    score, reply = None, ""
    for temperature in (0.0, 0.5, 1.0):
        reply = judge.complete(prompt, temperature=temperature, max_tokens=128)
        score = parse_judge_score(reply)
        if score is not None:
            break
    if score is None:
        logger.warning(f"mmvet_local: judge reply {reply[:80]!r} for {doc['question_id']} is not a score in [0, 1] "
                       "after 3 tries; scored 0 and counted as unjudged")
    return {
        "gpt_eval_score": {
            "question_id": doc["question_id"],
            "question": doc["question"],
            "gt_answer": doc["answer"],
            "capabilities": doc["capability"],
            "pred_answer": prediction,
            "score": 0.0 if score is None else score,
            "eval_model": judge.config.model,
        },
        "unjudged": int(score is None),
    }


def mmvet_aggregate_results(results: list[dict[str, Any]]) -> float:
    return _upstream_mmvet().mmvet_aggregate_results(results)


def mmvet_unjudged_count(flags: list[int]) -> int:
    """How many answers the judge never scored (each scored 0); ``clipmoe eval`` fails above ``--max_unjudged``."""
    count = int(sum(flags))
    if count:
        logger.warning(f"mmvet_local: {count} of {len(flags)} answers could not be judged (scored 0)")
    return count


# --------------------------------------------------------------------------- MMBench
def mmbench_aggregate_dev_results_submission(results: list[dict[str, Any]], args: Any) -> None:
    """Upstream's submission spreadsheet, with the control characters that Excel files cannot hold removed
    from the answers (upstream raises ``IllegalCharacterError`` and the whole run fails). Scores and the
    sample logs keep the answers as generated."""
    from lmms_eval.tasks.mmbench import en_utils
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    cleaned = [
        {key: ILLEGAL_CHARACTERS_RE.sub("", value) if isinstance(value, str) else value for key, value in row.items()}
        for row in results
    ]
    return en_utils.mmbench_aggregate_dev_results_submission(cleaned, args)


# --------------------------------------------------------------------------- MMBench with the judge
def mmbench_aggregate_dev_results_judge(results: list[dict[str, Any]], args: Any) -> float:
    """Upstream ``mmbench_aggregate_dev_results_eval`` with the GPT fallback sent to the configured judge.

    Answers that the rules parse never reach the judge. A judge failure stops the run (upstream would retry
    for ~45 s per item and then pick a random letter).
    """
    import json

    from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
    from lmms_eval.tasks.mmbench import en_utils
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    judge = get_judge(JudgeConfig.from_env(task="mmbench_en_dev_local_gpt"))

    class _JudgedEvaluator(MMBench_Evaluator):
        def get_chat_response(self, prompt, temperature=0, max_tokens=256, n=1, patience=5, sleep_time=3):
            return judge.complete(prompt, temperature=float(temperature), max_tokens=max_tokens)

    evaluator = _JudgedEvaluator(
        sys_prompt=en_utils.config["metadata"]["sys_prompt"], API_URL=judge.config.chat_url,
        model_version=judge.config.model,
    )
    overall, by_category, by_l2 = evaluator.eval_result(results, eval_method="openai")
    path = generate_submission_file("mmbench_en_dev_judge_results.json", args)
    with open(path, "w") as handle:
        json.dump({"overall_acc": overall, "category_acc": by_category, "l2_category_acc": by_l2,
                   "judge": judge.config.model}, handle)
    return overall * 100

