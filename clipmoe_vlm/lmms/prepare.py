"""Write the three parquet files the offline tasks read (``eval/data/`` by default).

==========================  ===================  =============================================================
file                        task                 source
==========================  ===================  =============================================================
``mmbench_en_dev.parquet``  mmbench_en_dev_local the official ``MMBench_DEV_EN.tsv`` (base64 images)
``mmvet.parquet``           mmvet_local          the official MM-Vet folder (``mm-vet.json`` + ``images/``)
``vizwiz_vqa_val.parquet``  vizwiz_vqa_val_local the official VizWiz ``val.json`` + its image folder
==========================  ===================  =============================================================

or all three from the Shapes world (:func:`from_shapes`). Columns follow the ``lmms-lab`` hub datasets that
lmms-eval 0.7.3's upstream task functions read; images are stored as Hugging Face ``Image`` features (PNG/JPEG
bytes), so ``datasets.load_dataset("parquet", ...)`` decodes them to PIL.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import EvalSetupError
from .schemas import mmbench_features, mmvet_features, vizwiz_features

__all__ = [
    "DATA_FILES",
    "REQUIRED_COLUMNS",
    "check_columns",
    "check_parquet",
    "from_shapes",
    "mmbench_from_tsv",
    "mmvet_from_folder",
    "vizwiz_from_json",
]

DATA_FILES: Mapping[str, str] = MappingProxyType(
    {"mmbench_en_dev": "mmbench_en_dev.parquet", "mmvet": "mmvet.parquet", "vizwiz_vqa_val": "vizwiz_vqa_val.parquet"}
)
"""Dataset name -> file name under the data folder."""

# The columns the upstream task functions read (doc_to_text / doc_to_visual / process_results / aggregation).
REQUIRED_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "mmbench_en_dev": ("index", "question", "hint", "A", "B", "answer", "category", "image", "L2-category"),
        "mmvet": ("question_id", "image", "question", "answer", "capability"),
        "vizwiz_vqa_val": ("question_id", "image", "question", "answers"),
    }
)


def check_columns(columns: Iterable[str], dataset: str, source: str | os.PathLike[str]) -> None:
    """Raise :class:`EvalSetupError` naming the columns ``dataset`` needs that ``columns`` lacks."""
    present = set(columns)
    missing = [name for name in REQUIRED_COLUMNS[dataset] if name not in present]
    if missing:
        raise EvalSetupError(
            f"{source}: missing column(s) {', '.join(missing)} needed by {dataset} "
            f"(has: {', '.join(sorted(present)) or 'none'}); rewrite it with scripts/prepare_eval_data.py"
        )


def check_parquet(path: str | os.PathLike[str], dataset: str) -> None:
    """Check a parquet file's schema (without reading its rows) for ``dataset``'s columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise EvalSetupError(f"{path}: no such file; write it with scripts/prepare_eval_data.py")
    check_columns(pq.read_schema(str(path)).names, dataset, path)


def _write(path: Path, rows: list[dict[str, Any]], features: Any, dataset: str) -> Path:
    import datasets

    if not rows:
        raise ValueError(f"{dataset}: no rows to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    check_parquet(path, dataset)
    return path


def _image(data: bytes, name: str | None) -> dict[str, Any]:
    return {"bytes": data, "path": name}


# --------------------------------------------------------------------------- MMBench
def mmbench_from_tsv(tsv: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert the official MMBench dev TSV (``index, question, hint, A..D, answer, category, image`` as base64,
    ``source, l2-category, comment, split``) to the ``lmms-lab/MMBench`` "en" layout."""
    import pandas as pd

    tsv = Path(tsv)
    if not tsv.is_file():
        raise EvalSetupError(f"{tsv}: no such file (the MMBench dev TSV)")
    frame = pd.read_csv(tsv, sep="\t", keep_default_na=False, dtype=str)
    rename = {column: "L2-category" for column in frame.columns if column.lower() == "l2-category"}
    frame = frame.rename(columns=rename)
    check_columns(frame.columns, "mmbench_en_dev", tsv)
    records = frame.to_dict("records")
    # Some MMBench TSVs store an image once and give later rows the index of that row instead (VLMEvalKit's layout).
    by_index = {str(record["index"]): record["image"] for record in records if len(record["image"]) > 64}
    rows = []
    for record in records:
        if len(record["image"]) <= 64:
            if record["image"] not in by_index:
                raise EvalSetupError(f"{tsv}: row index={record['index']} has no image and refers to no row")
            record["image"] = by_index[record["image"]]
        row: dict[str, Any] = {"index": int(record["index"])}
        for key in ("question", "hint", "A", "B", "C", "D", "E", "answer", "category", "source", "L2-category",
                    "comment", "split"):
            value = record.get(key, "")
            row[key] = None if value in ("", "nan") else str(value)
        row["image"] = _image(base64.b64decode(record["image"]), f"{row['index']}.jpg")
        rows.append(row)
    has_e = "E" in frame.columns
    if not has_e:
        for row in rows:
            row.pop("E")
    return _write(Path(out), rows, mmbench_features("ABCDE" if has_e else "ABCD"), "mmbench_en_dev")


# --------------------------------------------------------------------------- MM-Vet
def mmvet_from_folder(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert the official MM-Vet folder (``mm-vet.json``: ``{"v1_0": {"imagename", "capability": [...],
    "question", "answer"}}`` and ``images/``) to the ``lmms-lab/MMVet`` layout (capability comma-joined)."""
    folder = Path(folder)
    json_path = folder / "mm-vet.json"
    if not json_path.is_file():
        raise EvalSetupError(f"{json_path}: no such file (the MM-Vet folder holds mm-vet.json and images/)")
    records = json.loads(json_path.read_text())
    rows = []
    for question_id, record in records.items():
        missing = [key for key in ("imagename", "capability", "question", "answer") if key not in record]
        if missing:
            raise EvalSetupError(f"{json_path} [{question_id}]: missing field(s) {', '.join(missing)}")
        image_path = folder / "images" / record["imagename"]
        if not image_path.is_file():
            raise EvalSetupError(f"{image_path}: image of {question_id} not found")
        capability = record["capability"]
        rows.append(
            {
                "question_id": str(question_id),
                "image": _image(image_path.read_bytes(), record["imagename"]),
                "question": record["question"],
                "answer": record["answer"],
                "image_source": record.get("image_source", ""),
                "capability": ",".join(capability) if isinstance(capability, list) else str(capability),
            }
        )
    return _write(Path(out), rows, mmvet_features(), "mmvet")


# --------------------------------------------------------------------------- VizWiz
def vizwiz_from_json(
    json_path: str | os.PathLike[str], image_dir: str | os.PathLike[str], out: str | os.PathLike[str]
) -> Path:
    """Convert the official VizWiz-VQA ``val.json`` (``[{"image", "question", "answers": [{"answer", ...}],
    "answer_type", ...}]``) and its image folder to the ``lmms-lab/VizWiz-VQA`` layout."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise EvalSetupError(f"{json_path}: no such file (the VizWiz val JSON)")
    if not image_dir.is_dir():
        raise EvalSetupError(f"{image_dir}: no such folder (the VizWiz val images)")
    rows = []
    for position, record in enumerate(json.loads(json_path.read_text())):
        missing = [key for key in ("image", "question", "answers") if key not in record]
        if missing:
            raise EvalSetupError(f"{json_path} [{position}]: missing field(s) {', '.join(missing)}")
        image_path = image_dir / record["image"]
        if not image_path.is_file():
            raise EvalSetupError(f"{image_path}: image of entry {position} not found")
        answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in record["answers"]]
        rows.append(
            {
                "question_id": record["image"],
                "image": _image(image_path.read_bytes(), record["image"]),
                "question": record["question"],
                "answers": answers,
                "category": record.get("answer_type", ""),
            }
        )
    return _write(Path(out), rows, vizwiz_features(), "vizwiz_vqa_val")


# --------------------------------------------------------------------------- Shapes world
def from_shapes(
    out_dir: str | os.PathLike[str],
    *,
    n_eval: int = 300,
    n_mmvet: int = 100,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> dict[str, Path]:
    """All three files from the Shapes world (`clipmoe_vlm.data.shapes` writers), into ``out_dir``."""
    from ..data.shapes import write_mmbench, write_mmvet, write_vizwiz

    out_dir = Path(out_dir)
    paths = {name: out_dir / file for name, file in DATA_FILES.items()}
    common = {"seed": seed, "image_size": image_size, "progress": progress}
    write_mmbench(paths["mmbench_en_dev"], n_eval, **common)
    write_vizwiz(paths["vizwiz_vqa_val"], n_eval, **common)
    write_mmvet(paths["mmvet"], n_mmvet, **common)
    for name, path in paths.items():
        check_parquet(path, name)
    return paths


# --------------------------------------------------------------------------- command line
def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        description="Write the parquet files read by the offline lmms-eval tasks (packaged in clipmoe_vlm/lmms/tasks/).",
    )
    parser.add_argument("--out_dir", default=str(_DEFAULT_OUT), help="output folder (default: eval/data under the working folder)")
    sub = parser.add_subparsers(dest="source", required=True)
    shapes = sub.add_parser("shapes", help="all three files from the Shapes world")
    shapes.add_argument("--n_eval", type=int, default=300, help="MMBench and VizWiz rows")
    shapes.add_argument("--n_mmvet", type=int, default=100, help="MM-Vet rows (each needs a judge call)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image_size", type=int, default=64)
    mmbench = sub.add_parser("mmbench", help="from the official MMBench dev TSV (base64 images)")
    mmbench.add_argument("--tsv", required=True)
    mmvet = sub.add_parser("mmvet", help="from the official MM-Vet folder (mm-vet.json and images/)")
    mmvet.add_argument("--folder", required=True)
    vizwiz = sub.add_parser("vizwiz", help="from the official VizWiz-VQA val JSON and its image folder")
    vizwiz.add_argument("--json", required=True)
    vizwiz.add_argument("--images", required=True)
    sub.add_parser("check", help="check the columns of the files in --out_dir")
    return parser


# The task YAMLs read eval/data/ under the working folder (`clipmoe eval --data_dir` reads another folder).
_DEFAULT_OUT = Path("eval") / "data"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.source == "shapes":
        paths = from_shapes(out_dir, n_eval=args.n_eval, n_mmvet=args.n_mmvet, seed=args.seed,
                            image_size=args.image_size)
        written = list(paths.values())
    elif args.source == "mmbench":
        written = [mmbench_from_tsv(args.tsv, out_dir / DATA_FILES["mmbench_en_dev"])]
    elif args.source == "mmvet":
        written = [mmvet_from_folder(args.folder, out_dir / DATA_FILES["mmvet"])]
    elif args.source == "vizwiz":
        written = [vizwiz_from_json(args.json, args.images, out_dir / DATA_FILES["vizwiz_vqa_val"])]
    else:
        found = [(name, out_dir / file) for name, file in DATA_FILES.items() if (out_dir / file).is_file()]
        if not found:
            raise EvalSetupError(f"{out_dir}: none of {', '.join(DATA_FILES.values())} found")
        for name, path in found:
            check_parquet(path, name)
        written = [path for _, path in found]
    for path in written:
        print(f"ok {path}")
    return 0
