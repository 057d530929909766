"""``scripts/eval_lmms.py``: run lmms-eval on a LLaVA model folder and report one table.

It checks what it can before the (slow) launch (model folder, data files and their columns, the judge when a
task needs one), runs the real ``python -m lmms_eval --model clipmoe_llava ...`` (under ``torchrun`` or
``accelerate launch`` for several processes), then reads the results file. lmms-eval exits 0 even when a task
failed, so the exit status here is 1 when lmms-eval failed, when any task wrote no results or a non-numeric
score, when a judged task has more unjudged answers than ``--max_unjudged`` allows, or when the model skipped a
document whose inputs could not be built (unless ``--allow_skipped``). The summary is printed as a table and
written as JSON.

Skipped documents reach this wrapper through files, not through lmms-eval: the model (``skipped_report=`` model
arg, set here to the output folder) writes ``clipmoe_skipped.rank<R>.json`` per process, listing task, doc id
and error. An empty answer in the sample logs could also be a real answer, and the sample logs may be off
(``--no_log_samples``), so they are not used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import MODEL_ID
from .errors import EvalSetupError, check_model_folder
from .judge import JudgeConfig, get_judge
from .prepare import DATA_FILES, check_parquet

__all__ = ["DEFAULT_TASKS", "JUDGE_TASKS", "PRIMARY_METRICS", "build_command", "main", "read_skipped", "summarize"]

DEFAULT_TASKS = ("mmbench_en_dev_local", "mmvet_local", "vizwiz_vqa_val_local")
PRIMARY_METRICS = {
    "mmbench_en_dev_local": "gpt_eval_score",
    "mmbench_en_dev_local_gpt": "gpt_eval_score",
    "mmvet_local": "gpt_eval_score",
    "vizwiz_vqa_val_local": "exact_match",
    "mmbench_en_dev": "gpt_eval_score",
    "mmvet": "gpt_eval_score",
    "vizwiz_vqa_val": "exact_match",
}
JUDGE_TASKS = ("mmvet_local", "mmbench_en_dev_local_gpt")
UNJUDGED_METRIC = "unjudged"  # per-task count of answers the judge never scored (mmvet_local)
DEFAULT_MAX_UNJUDGED = 0.05
SKIPPED_FILE_GLOB = "clipmoe_skipped.rank*.json"  # = clipmoe_vlm.lmms.models.clipmoe_llava.SKIPPED_FILE_GLOB
LOCAL_DATA = {
    "mmbench_en_dev_local": "mmbench_en_dev",
    "mmbench_en_dev_local_gpt": "mmbench_en_dev",
    "mmvet_local": "mmvet",
    "vizwiz_vqa_val_local": "vizwiz_vqa_val",
}
PLUGIN = "clipmoe_vlm.lmms"  # the package whose `tasks` folder holds the local task YAMLs
DEFAULT_DATA_DIR = Path("eval") / "data"  # the task YAMLs' data_files, relative to the working folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a clipmoe-vlm LLaVA folder on MMBench-EN dev, MM-Vet and VizWiz-VQA val with lmms-eval.",
        epilog="Arguments after '--' go to lmms-eval unchanged. The MM-Vet judge is set with CLIPMOE_JUDGE_* "
        "variables (docs/evaluation.md).",
    )
    parser.add_argument("model", help="LLaVA model folder (LlavaForConditionalGeneration + LlavaProcessor)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lmms-eval tasks")
    parser.add_argument("--include_path", default=None,
                        help="folder of extra task YAMLs (the local tasks come with the package)")
    parser.add_argument("--data_dir", default=None,
                        help="read the local tasks' parquet files from this folder instead of ./eval/data")
    parser.add_argument("--output_path", default=None, help="default: runs/eval/<model folder name>")
    parser.add_argument("--summary_json", default=None, help="default: <output_path>/summary.json")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction (<1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto (default): float16 on a GPU (LLaVA-1.5's evaluation precision), float32 on the CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--conv_template", default="vicuna_v1")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="model default when a task sets none")
    parser.add_argument("--gen_kwargs", default=None, help="override generation settings, e.g. max_new_tokens=64")
    parser.add_argument("--num_processes", type=int, default=1, help="processes (one per GPU); >1 uses --launcher")
    parser.add_argument("--launcher", choices=("torchrun", "accelerate"), default="torchrun",
                        help="multi-process launcher (torchrun also works on CPU; accelerate uses --multi_gpu)")
    parser.add_argument("--no_log_samples", action="store_true", help="do not write per-sample JSONL files")
    parser.add_argument("--verbosity", default="INFO")
    parser.add_argument("--no_preflight", action="store_true", help="skip the data and judge checks")
    parser.add_argument("--max_unjudged", type=_share, default=DEFAULT_MAX_UNJUDGED,
                        help="largest share (0-1) of a judged task's answers that the judge may fail to score "
                             f"(each scores 0) before the run fails (default {DEFAULT_MAX_UNJUDGED})")
    parser.add_argument("--allow_skipped", action="store_true",
                        help="exit 0 even when documents were skipped because their images could not be read "
                             "(they are answered with an empty string and score as failed)")
    return parser


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (e.g. 0.05)")
    return value


def _model_args(args: argparse.Namespace) -> str:
    parts = [f"pretrained={Path(args.model).resolve()}", f"dtype={args.dtype}", f"conv_template={args.conv_template}"]
    if args.device:
        parts.append(f"device={args.device}")
    if args.max_new_tokens:
        parts.append(f"max_new_tokens={args.max_new_tokens}")
    if getattr(args, "skipped_report", None):
        parts.append(f"skipped_report={args.skipped_report}")
    return ",".join(parts)


def build_command(args: argparse.Namespace, tasks: Sequence[str], include_path: Path | None, output_path: Path,
                  extra: Sequence[str] = ()) -> list[str]:
    """The lmms-eval command line (with its launcher)."""
    lmms = ["-m", "lmms_eval", "--model", MODEL_ID, "--model_args", _model_args(args), "--tasks", ",".join(tasks),
            *(["--include_path", str(include_path)] if include_path else []), "--batch_size", str(args.batch_size),
            "--output_path", str(output_path), "--verbosity", args.verbosity]
    if args.limit is not None:
        lmms += ["--limit", str(int(args.limit) if args.limit >= 1 else args.limit)]
    if args.gen_kwargs:
        lmms += ["--gen_kwargs", args.gen_kwargs]
    if not args.no_log_samples:
        lmms.append("--log_samples")
    lmms += list(extra)
    if args.num_processes <= 1:
        return [sys.executable, *lmms]
    if args.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(args.num_processes), *lmms]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(args.num_processes), *lmms]


def _preflight(args: argparse.Namespace, tasks: Sequence[str], data_dir: Path) -> None:
    check_model_folder(args.model)
    for task in tasks:
        if task in LOCAL_DATA:
            check_parquet(data_dir / DATA_FILES[LOCAL_DATA[task]], LOCAL_DATA[task])
    judged = [task for task in tasks if task in JUDGE_TASKS]
    if judged:
        get_judge(JudgeConfig.from_env(task=", ".join(judged))).check()


def packaged_tasks() -> Path:
    """The folder of the local task YAMLs shipped inside the package."""
    return Path(importlib.util.find_spec(f"{PLUGIN}.tasks").submodule_search_locations[0])


def _tasks_with_data_dir(data_dir: Path, into: Path) -> Path:
    """Copies of the packaged task YAMLs whose ``eval/data/`` files point at ``data_dir`` (absolute)."""
    into.mkdir(parents=True, exist_ok=True)
    for source in packaged_tasks().glob("*.yaml"):
        text = source.read_text().replace(f"{DEFAULT_DATA_DIR.as_posix()}/", data_dir.resolve().as_posix() + "/")
        (into / source.name).write_text(text)
    return into


def _newest_results(output_path: Path, since: float) -> Path | None:
    # <output_path>/<model>/<date>_results.json; MMBench also writes submissions/*_results.json
    files = [path for path in output_path.rglob("*_results.json")
             if path.parent.name != "submissions" and path.stat().st_mtime >= since - 1]
    return max(files, key=lambda path: path.stat().st_mtime) if files else None


def summarize(results_file: Path | None, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: ``metric``, ``value``, ``n`` and ``status`` (``ok``, or why it failed) from an lmms-eval results
    file; judged tasks with an ``unjudged`` metric also get ``unjudged`` (a count)."""
    payload = json.loads(results_file.read_text()) if results_file else {}
    results = payload.get("results", {})
    n_samples = payload.get("n-samples", {})
    summary: dict[str, dict[str, Any]] = {}
    for task in tasks:
        entry = results.get(task)
        if entry is None:
            summary[task] = {"metric": PRIMARY_METRICS.get(task), "value": None, "status": "failed: no results"}
            continue
        metric = PRIMARY_METRICS.get(task)
        if metric is None:  # first numeric metric of a task this table does not know
            numeric = [key.split(",")[0] for key, value in entry.items()
                       if "_stderr" not in key and key != "alias" and isinstance(value, (int, float))]
            metric = numeric[0] if numeric else None
        value = entry.get(f"{metric},none") if metric else None
        ok = _is_number(value)
        summary[task] = {
            "metric": metric,
            "value": value if ok else None,
            "n": (n_samples.get(task) or {}).get("effective"),
            "status": "ok" if ok else "failed: no numeric score",
        }
        unjudged = entry.get(f"{UNJUDGED_METRIC},none")
        if _is_number(unjudged):
            summary[task]["unjudged"] = int(unjudged)
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_skipped(output_path: Path) -> list[dict[str, Any]]:
    """The documents the model skipped (all ranks' ``clipmoe_skipped.rank<R>.json`` under ``output_path``), each
    ``{"task", "split", "doc_id", "error"}``, one entry per document. A report that cannot be read counts as one
    entry (task ``?``, doc_id -1) whose error names the file, so it fails the run without losing the summary."""
    documents: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in sorted(output_path.glob(SKIPPED_FILE_GLOB)):
        try:
            entries = [{key: entry[key] for key in ("task", "split", "doc_id", "error")}
                       for entry in json.loads(path.read_text())["documents"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            entries = [{"task": "?", "split": "?", "doc_id": -1,
                        "error": f"{path}: unreadable skipped-documents report ({type(error).__name__}: {error})"}]
        for entry in entries:
            documents.setdefault((str(entry["task"]), str(entry["split"]), int(entry["doc_id"])), entry)
    return [documents[key] for key in sorted(documents)]


def _apply_checks(summary: dict[str, dict[str, Any]], skipped: list[dict[str, Any]], max_unjudged: float,
                  allow_skipped: bool) -> None:
    """Adds ``skipped`` counts per task and fails tasks over the unjudged share or with skipped documents (the
    run also fails on skipped documents of a task outside the table, e.g. a subtask of a group)."""
    for task, entry in summary.items():
        count = sum(1 for document in skipped if document["task"] == task)
        entry["skipped"] = count
        if not entry["status"] == "ok":
            continue
        unjudged, n = entry.get("unjudged"), entry.get("n")
        if unjudged and n and unjudged / n > max_unjudged:
            entry["status"] = (f"failed: {unjudged} of {n} answers unjudged ({unjudged / n:.1%} > "
                               f"--max_unjudged {max_unjudged:g})")
        elif count and not allow_skipped:
            entry["status"] = f"failed: {count} document(s) skipped (unreadable input; --allow_skipped accepts)"


def _table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [("task", "metric", "value", "n", "unjudged", "skipped", "status")]
    for task, entry in summary.items():
        value = entry["value"]
        unjudged = entry.get("unjudged")
        rows.append((task, str(entry["metric"]), "-" if value is None else f"{value:.2f}", str(entry.get("n") or "-"),
                     "-" if unjudged is None else str(unjudged), str(entry.get("skipped") or 0), entry["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def _launch(command: Sequence[str], env: dict[str, str]) -> int:
    """Run lmms-eval; its exit status."""
    return subprocess.run(list(command), env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = _parser().parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    include_path = Path(args.include_path) if args.include_path else None
    if include_path is not None and not include_path.is_dir():
        raise EvalSetupError(f"--include_path {include_path}: no such folder")
    data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
    output_path = Path(args.output_path or Path("runs") / "eval" / Path(args.model).resolve().name)
    if not args.no_preflight:
        _preflight(args, tasks, data_dir)
    output_path.mkdir(parents=True, exist_ok=True)
    for stale in output_path.glob(SKIPPED_FILE_GLOB):  # an earlier run's report must not count in this one
        stale.unlink()
    args.skipped_report = str(output_path.resolve())

    env = dict(os.environ)
    if all(task in LOCAL_DATA for task in tasks):
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="clipmoe-lmms-tasks-") as scratch:
        # lmms-eval takes one --include_path: copies of the packaged tasks reading data_dir (absolute, so the
        # run does not depend on the working folder), with the user's own task folder beside them.
        # (LMMS_EVAL_PLUGINS cannot do this in lmms-eval 0.7.3: it adds the plugin's tasks after building the
        # task index, so they are never found.)
        copies = _tasks_with_data_dir(data_dir, Path(scratch))
        if include_path is not None:
            shutil.copytree(include_path, copies, dirs_exist_ok=True)
        include_path = copies
        command = build_command(args, tasks, include_path, output_path, extra)
        print("+ " + " ".join(command), flush=True)
        started = time.time()
        returncode = _launch(command, env)
    results_file = _newest_results(output_path, started) if output_path.is_dir() else None
    summary = summarize(results_file, tasks)
    skipped = read_skipped(output_path)
    _apply_checks(summary, skipped, args.max_unjudged, args.allow_skipped)
    failed = (returncode != 0 or any(entry["status"] != "ok" for entry in summary.values())
              or (bool(skipped) and not args.allow_skipped))
    report = {
        "model": str(Path(args.model).resolve()),
        "tasks": summary,
        "results_file": str(results_file) if results_file else None,
        "lmms_eval_returncode": returncode,
        "skipped_documents": len(skipped),
        "skipped": skipped,
        "allow_skipped": args.allow_skipped,
        "max_unjudged": args.max_unjudged,
        "ok": not failed,
        "command": command,
    }
    summary_path = Path(args.summary_json or output_path / "summary.json")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(summary))
    print(f"summary: {summary_path}" + ("" if results_file else "  (lmms-eval wrote no results file)"))
    if skipped:
        shown = ", ".join(f"{d['task']} doc {d['doc_id']}" for d in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        print(f"{len(skipped)} document(s) skipped (answered with an empty string, scored as failed): {shown}{more}; "
              f"errors in {summary_path}" + ("" if args.allow_skipped else " (--allow_skipped accepts them)"),
              file=sys.stderr)
    if returncode != 0:
        print(f"lmms-eval exited with status {returncode}", file=sys.stderr)
    return 1 if failed else 0
