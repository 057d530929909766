"""The LLaVA output folder as the record of one run: what ``train-llava`` may do with a folder that holds one.

transformers' Trainer writes ``checkpoint-N`` folders into any output folder and resumes from the highest N it
finds there. Into a folder that holds another run this goes wrong without a word: ``--resume`` loads the old
run's optimizer state into a schedule made from the new settings, and a new run's checkpoints sit beside the old
run's, whose higher step numbers make the checkpoint rotation delete the new ones and a later ``--resume``
continue the old run. So the settings are written first (``llava_train_config.json``) and a folder is only:

- continued (``--resume``) with the settings it was saved with;
- started again from its beginning with the same settings (its checkpoints are deleted first);
- started over with other settings when ``--overwrite`` asks for it (its run files are deleted first).

Anything else is refused before any work, naming each setting that differs.

The Trainer writes a checkpoint's files in place, process by process, so a run killed while saving leaves a
``checkpoint-N`` folder that looks like the newest checkpoint and is not whole. Each checkpoint therefore gets a
record (``clipmoe_checkpoint.json``: its step, and how the run was launched) once every process has written its
files; ``--resume`` continues from the newest recorded checkpoint, deletes the newer unrecorded ones, and refuses a
checkpoint written under another engine or number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..distributed import describe_launch
from ..files import atomic_write_text
from ..run_config import changed_settings, read_saved_settings, refuse_changed_settings

__all__ = ["CHECKPOINT_RECORD", "NEUTRAL_SETTINGS", "SETTINGS_FILE", "check_checkpoint", "check_output_dir",
           "checkpoint_to_resume", "clear_run_files", "data_digest", "write_checkpoint_record", "write_settings"]

SETTINGS_FILE = "llava_train_config.json"
CHECKPOINT_RECORD = "clipmoe_checkpoint.json"  # in each checkpoint-N, written once every process has saved
# Settings that change how a run goes, not what it trains: they may differ when a run is resumed. The experts
# kernels compute the same function; checkpoints hold the optimizer and scheduler, whatever the save cadence.
NEUTRAL_SETTINGS = ("output_dir", "resume", "overwrite", "torch_threads", "logging_steps", "save_steps",
                    "save_total_limit", "dataloader_num_workers", "report_to", "experts_implementation")
# What a run writes into its folder (deleted by --overwrite): the trainer's checkpoints and logs, the model or
# adapter, the processor, the LoRA base built from parts, the card and the settings
_RUN_FILES = (SETTINGS_FILE, "README.md", "config.json", "generation_config.json", "training_args.bin",
              "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
              "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "base", "runs")
_RUN_GLOBS = ("checkpoint-*", "model*.safetensors*", "*.tmp")
# What marks a folder as holding a run (not a README.md or runs/ folder a user may keep there)
_MARKERS = ("checkpoint-", "model", SETTINGS_FILE, "config.json", "adapter_config.json", "adapter_model.safetensors")


DATA_KEY = "data_sha256"  # beside the settings in SETTINGS_FILE: the data file's content (`data_digest`)


def _settings(cfg) -> dict:
    """The resolved configuration as it reads back from its JSON file (compared like with like)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def data_digest(cfg) -> str | None:
    """sha256 of the ``--data-path`` file (None when it is missing: the data loader names it), so that a data file
    edited in place under the same path is not taken for the data of the saved run."""
    path = Path(cfg.data.data_path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _present_run_files(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    names = {path.name for pattern in _RUN_GLOBS for path in out.glob(pattern)}
    names |= {name for name in _RUN_FILES if (out / name).exists()}
    return sorted(names)


def check_output_dir(cfg, data_sha256: str | None = None) -> str:
    """What the run ``cfg`` (resolved) does with its ``output_dir``: ``"new"``, ``"resume"`` (continue from the
    last checkpoint), ``"restart"`` (same settings, without --resume: from the beginning) or ``"overwrite"``.
    Raises a ValueError naming each setting that differs from the saved run, and the data when ``data_sha256``
    (`data_digest`) differs from the saved one. Reads only."""
    out = Path(cfg.output_dir)
    if cfg.run.overwrite:
        return "overwrite"
    present = _present_run_files(out)
    if not any(name.startswith(_MARKERS) for name in present):
        return "new"
    restart = "pass --overwrite to delete its run files and start over, or choose another --output-dir"
    saved_path = out / SETTINGS_FILE
    if not saved_path.is_file():
        if cfg.run.resume and any(name.startswith("checkpoint-") for name in present):
            return "resume"  # a folder of the trainer alone (or of an earlier version): its settings are unknown
        raise ValueError(f"{out} holds run files ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}) "
                         f"but no {SETTINGS_FILE}, so the settings they were made with are unknown: {restart}")
    saved = read_saved_settings(saved_path, restart)
    saved_data = saved.pop(DATA_KEY, None)
    diffs = changed_settings(saved, _settings(cfg), NEUTRAL_SETTINGS)
    if saved_data and data_sha256 and saved_data != data_sha256 and not any(d.startswith("--data-path ")
                                                                             for d in diffs):
        diffs.append(f"the data (--data-path {cfg.data.data_path}): its content changed (sha256 {saved_data[:12]} "
                     f"-> {data_sha256[:12]})")
    refuse_changed_settings(out, saved_path, diffs, resume=cfg.run.resume, output_flag="--output-dir")
    return "resume" if cfg.run.resume else "restart"


def clear_run_files(out: Path, checkpoints_only: bool = False) -> None:
    """Deletes the run files of ``out`` (only its ``checkpoint-N`` folders with ``checkpoints_only``)."""
    names = [path.name for path in out.glob("checkpoint-*")] if checkpoints_only else _present_run_files(out)
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write_json(path: Path, content: dict) -> None:
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def write_checkpoint_record(folder: Path, step: int, engine: str | None, processes: int) -> None:
    """Marks the Trainer checkpoint ``folder`` whole; call it once every process has written its files."""
    _write_json(Path(folder) / CHECKPOINT_RECORD, {"step": step, "engine": engine, "processes": processes})


def _step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def checkpoint_to_resume(out: Path, engine: str | None, processes: int) -> tuple[Path | None, list[Path]]:
    """The checkpoint of ``out`` that ``--resume`` continues from (None: there is none), and the newer checkpoint
    folders without a record: the run was killed while writing them, so the caller deletes them (their step is
    trained again). Raises a ValueError naming the checkpoint when it was written under another launch than
    ``engine`` and ``processes`` (`clipmoe_vlm.distributed`), or when one of its files is damaged.

    A folder whose checkpoints have no record at all was written by a Trainer of its own or by an earlier
    version: its newest checkpoint holding ``trainer_state.json`` (the Trainer's last file) is taken, and nothing
    is deleted."""
    out = Path(out)
    checkpoints = sorted((path for path in out.glob("checkpoint-*")
                          if path.is_dir() and re.fullmatch(r"checkpoint-\d+", path.name)), key=_step)
    recorded = [path for path in checkpoints if (path / CHECKPOINT_RECORD).is_file()]
    if not recorded:
        whole = [path for path in checkpoints if (path / "trainer_state.json").is_file()]
        if whole:
            check_checkpoint(whole[-1])
        return (whole[-1] if whole else None), []
    chosen = recorded[-1]
    check_checkpoint(chosen)  # the record is JSON too: read whole here
    record = json.loads((chosen / CHECKPOINT_RECORD).read_text())
    written_by = (record.get("engine"), record.get("processes"))
    if written_by != (engine, processes):
        raise ValueError(f"{chosen}: the checkpoint was written by {describe_launch(*written_by)}, this run is "
                         f"{describe_launch(engine, processes)}; resume it as it was launched, or start over "
                         f"without --resume")
    return chosen, [path for path in checkpoints if _step(path) > _step(chosen)]


def write_settings(cfg, data_sha256: str | None = None) -> None:
    """Writes ``llava_train_config.json``, with the data's digest when given (through a temporary file: a kill
    leaves the old file or the new)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / SETTINGS_FILE, _settings(cfg) | ({DATA_KEY: data_sha256} if data_sha256 else {}))


def check_checkpoint(folder: Path) -> None:
    """Reads the structure of every file of the Trainer checkpoint ``folder`` without loading any tensor
    (safetensors headers, the zip directory of torch's files, JSON): a truncated or damaged file is a ValueError
    naming it, before any work, instead of an unnamed deserialisation error from inside the Trainer."""
    remedy = f"delete {folder} to resume from the checkpoint before it (if any), or start over with --overwrite"
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save writes zip archives
                zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (SafetensorError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err}); {remedy}") from None
