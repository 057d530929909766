"""Write the three parquet files the offline tasks read (``eval/data/`` by default).

==========================  ===================  =============================================================
file                        task                 source
==========================  ===================  =============================================================
``mmbench_en_dev.parquet``  mmbench_en_dev_local the official ``MMBench_DEV_EN.tsv`` (base64 images)
``mmvet.parquet``           mmvet_local          the official MM-Vet folder (``mm-vet.json`` + ``images/``)
``vizwiz_vqa_val.parquet``  vizwiz_vqa_val_local the official VizWiz ``val.json`` + its image folder
==========================  ===================  =============================================================

or each from the hub's parquet shards (:func:`from_parquet_shards`: ``lmms-lab/MMBench`` en dev, ``lmms-lab/MMVet``,
``lmms-lab/VizWiz-VQA`` val), or all three from the Shapes world (:func:`from_shapes`). Every image written is
decoded once first; a bad input stops with one error naming the file, the row and the column. Columns follow the
``lmms-lab`` hub datasets that lmms-eval 0.7.3's upstream task functions read; images are stored as Hugging Face
``Image`` features (PNG/JPEG bytes), so ``datasets.load_dataset("parquet", ...)`` decodes them to PIL.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import EvalSetupError
from .schemas import mmbench_features, mmvet_features, vizwiz_features

__all__ = [
    "DATA_FILES",
    "ID_COLUMNS",
    "REQUIRED_COLUMNS",
    "check_columns",
    "check_image_bytes",
    "check_parquet",
    "from_parquet_shards",
    "from_shapes",
    "mmbench_from_tsv",
    "mmvet_from_folder",
    "parquet_shards",
    "vizwiz_from_json",
]

DATA_FILES: Mapping[str, str] = MappingProxyType(
    {"mmbench_en_dev": "mmbench_en_dev.parquet", "mmvet": "mmvet.parquet", "vizwiz_vqa_val": "vizwiz_vqa_val.parquet"}
)
"""Dataset name -> file name under the data folder."""

# The columns the upstream task functions read (doc_to_text / doc_to_visual / process_results / aggregation).
# MMBench's `source` and `split` are read by upstream's mmbench_doc_to_text and mmbench_process_results for every
# document, so a file without them would fail only after all generation.
REQUIRED_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "mmbench_en_dev": ("index", "question", "hint", "A", "B", "answer", "category", "image", "L2-category",
                           "source", "split"),
        "mmvet": ("question_id", "image", "question", "answer", "capability"),
        "vizwiz_vqa_val": ("question_id", "image", "question", "answers"),
    }
)

ID_COLUMNS: Mapping[str, str] = MappingProxyType(
    {"mmbench_en_dev": "index", "mmvet": "question_id", "vizwiz_vqa_val": "question_id"}
)
"""The column that names a row in error messages."""

_FEATURES = {"mmbench_en_dev": mmbench_features, "mmvet": mmvet_features, "vizwiz_vqa_val": vizwiz_features}
_INTEGER_INDEX_WHY = "upstream's MMBench aggregation sorts and compares index with 1e6 after all generation"


def check_columns(columns: Iterable[str], dataset: str, source: str | os.PathLike[str],
                  hint: str = "rewrite it with scripts/prepare_eval_data.py") -> None:
    """Raise :class:`EvalSetupError` naming the columns ``dataset`` needs that ``columns`` lacks."""
    present = set(columns)
    missing = [name for name in REQUIRED_COLUMNS[dataset] if name not in present]
    if missing:
        raise EvalSetupError(
            f"{source}: missing column(s) {', '.join(missing)} needed by {dataset} "
            f"(has: {', '.join(sorted(present)) or 'none'}); {hint}"
        )


def check_parquet(path: str | os.PathLike[str], dataset: str) -> None:
    """Check a parquet file's schema (without reading its rows) for ``dataset``'s columns (and, for MMBench, that
    ``index`` is an integer column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        raise EvalSetupError(
            f"{path}: is a folder; the task reads one parquet file. Merge shards with "
            f"scripts/prepare_eval_data.py <benchmark> --parquet {path}"
        )
    if not path.is_file():
        raise EvalSetupError(f"{path}: no such file; write it with scripts/prepare_eval_data.py")
    try:
        schema = pq.read_schema(str(path))
    except (pa.ArrowException, OSError) as error:
        raise EvalSetupError(f"{path}: not a readable parquet file ({error})") from None
    check_columns(schema.names, dataset, path)
    if dataset == "mmbench_en_dev" and not pa.types.is_integer(schema.field("index").type):
        raise EvalSetupError(
            f"{path}: column index has type {schema.field('index').type}, not an integer ({_INTEGER_INDEX_WHY}); "
            "rewrite it with scripts/prepare_eval_data.py mmbench --parquet"
        )


def check_image_bytes(data: bytes | None, where: str) -> bytes:
    """``data`` if it decodes fully as an image, else :class:`EvalSetupError` naming ``where`` (the file and row)."""
    from PIL import Image, ImageFile

    if not data:
        raise EvalSetupError(f"{where}: no image bytes")
    # strict even after `import lmms_eval.api.task`, which sets LOAD_TRUNCATED_IMAGES = True for the process
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: a truncated file fails here
    except Image.UnidentifiedImageError:
        raise EvalSetupError(f"{where}: image does not decode (UnidentifiedImageError: {len(data)} bytes that are "
                             "no image format PIL knows)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise EvalSetupError(f"{where}: image does not decode ({type(error).__name__}: {error})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return data


def _write(path: Path, rows: list[dict[str, Any]], features: Any, dataset: str) -> Path:
    import datasets

    if not rows:
        raise EvalSetupError(f"{dataset}: no rows to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    check_parquet(path, dataset)
    return path


def _image(data: bytes, name: str | None) -> dict[str, Any]:
    return {"bytes": data, "path": name}


def _integer_index(value: Any) -> int | None:
    """``value`` as an int when it is an integer (``7``, ``"7"``, ``7.0``), else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- MMBench
def mmbench_from_tsv(tsv: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert the official MMBench dev TSV (``index, question, hint, A..D, answer, category, image`` as base64,
    ``source, l2-category, comment, split``) to the ``lmms-lab/MMBench`` "en" layout.

    Every image is decoded once; a row whose ``index`` is not an integer, whose base64 is invalid or whose bytes
    are not an image stops the conversion with an error naming the file and the row.
    """
    import pandas as pd

    tsv = Path(tsv)
    if not tsv.is_file():
        raise EvalSetupError(f"{tsv}: no such file (the MMBench dev TSV)")
    frame = pd.read_csv(tsv, sep="\t", keep_default_na=False, dtype=str)
    rename = {column: "L2-category" for column in frame.columns if column.lower() == "l2-category"}
    frame = frame.rename(columns=rename)
    check_columns(frame.columns, "mmbench_en_dev", tsv)
    records = frame.to_dict("records")
    for position, record in enumerate(records, start=1):
        if _integer_index(record["index"]) is None:
            raise EvalSetupError(
                f"{tsv}: data row {position}: column index is {record['index']!r}, not an integer "
                f"({_INTEGER_INDEX_WHY})"
            )
    # Some MMBench TSVs store an image once and give later rows the index of that row instead (VLMEvalKit's layout).
    by_index = {str(record["index"]): record["image"] for record in records if len(record["image"]) > 64}
    decoded: dict[str, bytes] = {}  # base64 text -> checked image bytes (shared images are decoded once)
    rows = []
    for position, record in enumerate(records, start=1):
        where = f"{tsv}: data row {position} (index={record['index']})"
        text = record["image"]
        if len(text) <= 64:
            if text not in by_index:
                raise EvalSetupError(f"{tsv}: row index={record['index']} has no image and refers to no row")
            text = by_index[text]
        if text not in decoded:
            try:
                data = base64.b64decode(text)
            except (binascii.Error, ValueError) as error:
                raise EvalSetupError(f"{where}: column image is not valid base64 ({error})") from None
            decoded[text] = check_image_bytes(data, f"{where}, column image")
        row: dict[str, Any] = {"index": _integer_index(record["index"])}
        for key in ("question", "hint", "A", "B", "C", "D", "E", "answer", "category", "source", "L2-category",
                    "comment", "split"):
            value = record.get(key, "")
            row[key] = None if value in ("", "nan") else str(value)
        row["image"] = _image(decoded[text], f"{row['index']}.jpg")
        rows.append(row)
    has_e = "E" in frame.columns
    if not has_e:
        for row in rows:
            row.pop("E")
    return _write(Path(out), rows, mmbench_features("ABCDE" if has_e else "ABCD"), "mmbench_en_dev")


# --------------------------------------------------------------------------- MM-Vet
def mmvet_from_folder(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert the official MM-Vet folder (``mm-vet.json``: ``{"v1_0": {"imagename", "capability": [...],
    "question", "answer"}}`` and ``images/``) to the ``lmms-lab/MMVet`` layout (capability comma-joined).
    Every image is decoded once; one that does not decode stops the conversion naming the question."""
    folder = Path(folder)
    json_path = folder / "mm-vet.json"
    if not json_path.is_file():
        raise EvalSetupError(f"{json_path}: no such file (the MM-Vet folder holds mm-vet.json and images/)")
    records = _read_json(json_path)
    if not isinstance(records, Mapping):
        raise EvalSetupError(f"{json_path}: expected an object of questions keyed by id, got {type(records).__name__}")
    rows = []
    for question_id, record in records.items():
        missing = [key for key in ("imagename", "capability", "question", "answer") if key not in record]
        if missing:
            raise EvalSetupError(f"{json_path} [{question_id}]: missing field(s) {', '.join(missing)}")
        image_path = folder / "images" / record["imagename"]
        if not image_path.is_file():
            raise EvalSetupError(f"{image_path}: image of {question_id} not found")
        data = check_image_bytes(image_path.read_bytes(), f"{json_path} [{question_id}]: {image_path}")
        capability = record["capability"]
        rows.append(
            {
                "question_id": str(question_id),
                "image": _image(data, record["imagename"]),
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
    "answer_type", ...}]``) and its image folder to the ``lmms-lab/VizWiz-VQA`` layout. Every image is decoded
    once; one that does not decode stops the conversion naming the entry."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise EvalSetupError(f"{json_path}: no such file (the VizWiz val JSON)")
    if not image_dir.is_dir():
        raise EvalSetupError(f"{image_dir}: no such folder (the VizWiz val images)")
    records = _read_json(json_path)
    if not isinstance(records, list):
        raise EvalSetupError(f"{json_path}: expected a list of questions, got {type(records).__name__}")
    rows = []
    for position, record in enumerate(records):
        missing = [key for key in ("image", "question", "answers") if key not in record]
        if missing:
            raise EvalSetupError(f"{json_path} [{position}]: missing field(s) {', '.join(missing)}")
        image_path = image_dir / record["image"]
        if not image_path.is_file():
            raise EvalSetupError(f"{image_path}: image of entry {position} not found")
        data = check_image_bytes(image_path.read_bytes(), f"{json_path} [{position}] ({record['image']})")
        answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in record["answers"]]
        rows.append(
            {
                "question_id": record["image"],
                "image": _image(data, record["image"]),
                "question": record["question"],
                "answers": answers,
                "category": record.get("answer_type", ""),
            }
        )
    return _write(Path(out), rows, vizwiz_features(), "vizwiz_vqa_val")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise EvalSetupError(f"{path}: not valid JSON ({error})") from None


# --------------------------------------------------------------------------- hub parquet shards
def parquet_shards(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The parquet files named by ``sources``: files as given, folders as their ``*.parquet`` files sorted by
    name (the hub's ``...-00000-of-00005.parquet`` order)."""
    shards: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            found = sorted(source.glob("*.parquet"))
            if not found:
                raise EvalSetupError(f"--parquet {source}: folder holds no *.parquet file")
            shards += found
        elif source.is_file():
            shards.append(source)
        else:
            raise EvalSetupError(f"--parquet {source}: no such file or folder")
    if len({shard.resolve() for shard in shards}) != len(shards):
        raise EvalSetupError(f"--parquet: a shard is named twice ({', '.join(map(str, shards))})")
    return shards


def _shard_schema(path: Path, dataset: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(str(path))
    except (pa.ArrowException, OSError) as error:
        raise EvalSetupError(f"{path}: not a readable parquet file ({error})") from None
    check_columns(schema.names, dataset, path, hint=f"is it a shard of the {dataset} dataset?")
    return schema


def _cast_shard(table: Any, path: Path, dataset: str, target: Any, row_offset: int) -> Any:
    """``table`` in the ``target`` schema: known columns cast, optional ones filled with nulls, others dropped;
    for MMBench an integer ``index`` (strings or floats holding integers are converted); every image decoded."""
    import pyarrow as pa

    columns = []
    id_column = ID_COLUMNS[dataset]
    ids = table.column(id_column).to_pylist()

    def where(row: int) -> str:
        return f"{path}: row {row} (0-based; doc_id {row_offset + row} of the merged file, {id_column}={ids[row]!r})"

    for field in target:
        if field.name not in table.column_names:  # optional column (check_columns passed)
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if field.name == "index" and dataset == "mmbench_en_dev" and not pa.types.is_integer(column.type):
            values = []
            for row, value in enumerate(ids):
                number = _integer_index(value)
                if number is None:
                    raise EvalSetupError(
                        f"{where(row)}: column index is {value!r} (type {column.type}), not an integer "
                        f"({_INTEGER_INDEX_WHY})"
                    )
                values.append(number)
            column = pa.array(values, pa.int64())
        elif field.name == "image" and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            column = pa.StructArray.from_arrays(
                [column.combine_chunks().cast(pa.binary()), pa.nulls(table.num_rows, pa.string())], ["bytes", "path"]
            )
        try:
            column = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
            raise EvalSetupError(
                f"{path}: column {field.name} has type {column.type}, expected {field.type} ({error})"
            ) from None
        if field.name == "index" and column.null_count:
            row = column.to_pylist().index(None)
            raise EvalSetupError(f"{where(row)}: column index is empty ({_INTEGER_INDEX_WHY})")
        columns.append(column)
    cast = pa.Table.from_arrays(columns, schema=target)
    images = cast.column("image").combine_chunks().field("bytes")
    for row in range(cast.num_rows):
        check_image_bytes(images[row].as_py(), f"{where(row)}, column image")
    return cast


def from_parquet_shards(
    sources: Sequence[str | os.PathLike[str]], dataset: str, out: str | os.PathLike[str]
) -> Path:
    """Merge hub parquet shards (e.g. the five ``lmms-lab/VizWiz-VQA`` val files, 4,319 rows) into the one file
    the local task reads, in the order given (folders: sorted by file name).

    Each shard's columns are checked first (an error names the shard and the missing columns), then each shard
    is read, cast to this project's schema (`clipmoe_vlm.lmms.schemas`) and every image is decoded; an error
    names the shard, the row and the column. The output is written to a temporary file and renamed only when
    every shard passed, so a failure leaves no partial file.
    """
    import pyarrow.parquet as pq

    if dataset not in DATA_FILES:
        raise EvalSetupError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATA_FILES)}")
    shards = parquet_shards(sources)
    if not shards:
        raise EvalSetupError(f"{dataset}: --parquet names no file")
    schemas = [_shard_schema(shard, dataset) for shard in shards]  # all columns checked before any long decode
    if dataset == "mmbench_en_dev":
        features = mmbench_features("ABCDE" if any("E" in schema.names for schema in schemas) else "ABCD")
    else:
        features = _FEATURES[dataset]()
    target = features.arrow_schema  # carries the `huggingface` metadata: `image` loads as an Image feature
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    total = 0
    try:
        with pq.ParquetWriter(str(partial), target) as writer:
            for shard in shards:
                table = pq.read_table(str(shard))
                writer.write_table(_cast_shard(table, shard, dataset, target, total), row_group_size=100)
                total += table.num_rows
                print(f"  {shard}: {table.num_rows} rows", flush=True)
        if total == 0:
            raise EvalSetupError(f"{dataset}: the shards hold no rows ({', '.join(map(str, shards))})")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    check_parquet(out, dataset)
    written = pq.read_metadata(str(out)).num_rows
    if written != total:  # cannot happen unless the writer dropped rows; checked because scores depend on it
        raise EvalSetupError(f"{out}: wrote {written} rows, the shards hold {total}")
    return out


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
    parquet_help = ("hub parquet file(s) or folder(s) of shards (e.g. the lmms-lab dataset's files), merged into "
                    "the one file the task reads; columns checked per shard, every image decoded")
    mmbench = sub.add_parser("mmbench", help="from the official MMBench dev TSV (base64 images) or hub parquet shards")
    source = mmbench.add_mutually_exclusive_group(required=True)
    source.add_argument("--tsv", help="the official MMBench_DEV_EN.tsv")
    source.add_argument("--parquet", nargs="+", metavar="PATH", help=parquet_help)
    mmvet = sub.add_parser("mmvet", help="from the official MM-Vet folder (mm-vet.json and images/) or hub parquet")
    source = mmvet.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="the official MM-Vet folder")
    source.add_argument("--parquet", nargs="+", metavar="PATH", help=parquet_help)
    vizwiz = sub.add_parser("vizwiz", help="from the official VizWiz-VQA val JSON and its image folder, or hub "
                                           "parquet shards (lmms-lab/VizWiz-VQA val: 5 shards, 4,319 rows)")
    vizwiz.add_argument("--json", help="the official val.json (with --images)")
    vizwiz.add_argument("--images", help="the official val image folder (with --json)")
    vizwiz.add_argument("--parquet", nargs="+", metavar="PATH", help=parquet_help)
    sub.add_parser("check", help="check the columns of the files in --out_dir")
    return parser


def _row_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(str(path)).num_rows


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
        out = out_dir / DATA_FILES["mmbench_en_dev"]
        written = [from_parquet_shards(args.parquet, "mmbench_en_dev", out) if args.parquet
                   else mmbench_from_tsv(args.tsv, out)]
    elif args.source == "mmvet":
        out = out_dir / DATA_FILES["mmvet"]
        written = [from_parquet_shards(args.parquet, "mmvet", out) if args.parquet
                   else mmvet_from_folder(args.folder, out)]
    elif args.source == "vizwiz":
        out = out_dir / DATA_FILES["vizwiz_vqa_val"]
        if args.parquet:
            if args.json or args.images:
                raise EvalSetupError("vizwiz: give either --parquet or --json with --images, not both")
            written = [from_parquet_shards(args.parquet, "vizwiz_vqa_val", out)]
        elif args.json and args.images:
            written = [vizwiz_from_json(args.json, args.images, out)]
        else:
            raise EvalSetupError("vizwiz: give --json and --images (the official files) or --parquet (hub shards)")
    else:
        found = [(name, out_dir / file) for name, file in DATA_FILES.items() if (out_dir / file).is_file()]
        if not found:
            raise EvalSetupError(f"{out_dir}: none of {', '.join(DATA_FILES.values())} found")
        for name, path in found:
            check_parquet(path, name)
        written = [path for _, path in found]
    for path in written:
        print(f"ok {path} ({_row_count(path)} rows)")
    return 0
