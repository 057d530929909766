"""``scripts/eval_lmms.py``: run lmms-eval on a LLaVA model folder and report one table.

It checks what it can before the (slow) launch (model folder, data files and their columns, the judge when a
task needs one), runs the real ``python -m lmms_eval --model clipmoe_llava ...`` (under ``torchrun`` or
``accelerate launch`` for several processes), then reads the results file. lmms-eval exits 0 even when a task
failed, so the exit status here is 1 when lmms-eval failed, or when any task wrote no results or a non-numeric
score. The summary is printed as a table and written as JSON.
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

__all__ = ["DEFAULT_TASKS", "JUDGE_TASKS", "PRIMARY_METRICS", "build_command", "main", "summarize"]

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
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
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
    return parser


def _model_args(args: argparse.Namespace) -> str:
    parts = [f"pretrained={Path(args.model).resolve()}", f"dtype={args.dtype}", f"conv_template={args.conv_template}"]
    if args.device:
        parts.append(f"device={args.device}")
    if args.max_new_tokens:
        parts.append(f"max_new_tokens={args.max_new_tokens}")
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
    """Per task: ``metric``, ``value`` and ``status`` (``ok``, or why it failed) from an lmms-eval results file."""
    results = json.loads(results_file.read_text()).get("results", {}) if results_file else {}
    n_samples = json.loads(results_file.read_text()).get("n-samples", {}) if results_file else {}
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
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        summary[task] = {
            "metric": metric,
            "value": value if ok else None,
            "n": (n_samples.get(task) or {}).get("effective"),
            "status": "ok" if ok else "failed: no numeric score",
        }
    return summary


def _table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [("task", "metric", "value", "n", "status")]
    for task, entry in summary.items():
        value = entry["value"]
        rows.append((task, str(entry["metric"]), "-" if value is None else f"{value:.2f}", str(entry.get("n") or "-"),
                     entry["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


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
        returncode = subprocess.run(command, env=env, check=False).returncode
    results_file = _newest_results(output_path, started) if output_path.is_dir() else None
    summary = summarize(results_file, tasks)
    failed = returncode != 0 or any(entry["status"] != "ok" for entry in summary.values())
    report = {
        "model": str(Path(args.model).resolve()),
        "tasks": summary,
        "results_file": str(results_file) if results_file else None,
        "lmms_eval_returncode": returncode,
        "ok": not failed,
        "command": command,
    }
    summary_path = Path(args.summary_json or output_path / "summary.json")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(summary))
    print(f"summary: {summary_path}" + ("" if results_file else "  (lmms-eval wrote no results file)"))
    if returncode != 0:
        print(f"lmms-eval exited with status {returncode}", file=sys.stderr)
    return 1 if failed else 0
