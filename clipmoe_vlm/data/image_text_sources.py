"""The readers behind ``--data``: each source format yields image–caption pairs; `ImageTextDataset`
(`clipmoe_vlm.data.image_text`) concatenates them.

Each ``--data`` item is one source; several are concatenated in order. The format is detected from the path, or
forced with a prefix (``jsonl:``, ``csv:``, ``llava:``, ``files:``, ``wds:``, ``hf:``):

==========  ==============================================================  ============================================
format      detected from                                                   pairs
==========  ==============================================================  ============================================
``jsonl``   a ``.jsonl`` file                                               one object per line: ``image``, ``caption``
``csv``     a ``.csv`` file                                                 columns ``image`` and ``caption``
``llava``   a ``.json`` file (``FILE.json::IMAGE_ROOT`` sets the image      ShareGPT4V / LLaVA list of samples: the first
            root)                                                           ``gpt`` turn, newlines -> spaces
``hf``      a folder with ``dataset_info.json`` or ``state.json``           ``datasets.save_to_disk``: ``image`` (Image
                                                                            feature or path), ``caption`` or ``text``
``wds``     a ``.tar`` file, a folder holding ``.tar`` files, or a brace    WebDataset: members grouped by key, an image
            pattern ``shards-{00000..00009}.tar``                           (jpg/jpeg/png/webp) + ``txt`` or ``json``
``files``   any other folder                                                img2dataset "files": ``KEY.jpg`` +
                                                                            ``KEY.txt``, in shard sub-folders
==========  ==============================================================  ============================================

Relative image paths (``jsonl``, ``csv``, ``llava``, path columns of ``hf``) resolve against ``SPEC::IMAGE_ROOT``
when given, else against the folder holding the file (for ``hf``: the folder holding the dataset folder).

Everything that can be checked is checked when the dataset is built, before any training: a path that does not
exist (`FileNotFoundError`), an unreadable or malformed file, a missing column or key, an empty source
(`DataSourceError`, a `ValueError`); each message names the file (and line or record). Images are only decoded in
``__getitem__``: a missing, truncated or corrupt image gives ``pixel_values=None`` and an error string, which
`collate_image_text` drops and counts in the batch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "DATA_SOURCE_FORMS",
    "IMAGE_DECODE_ERRORS",
    "LOADERS",
    "MISSING_FILE",
    "SOURCE_FORMATS",
    "UNREADABLE_IMAGE",
    "DataSourceError",
    "ImageTextSource",
    "SourceSpec",
    "parse_source",
]

SOURCE_FORMATS = ("jsonl", "csv", "llava", "files", "wds", "hf")

# One line per accepted `--data` form, for `--help` and error messages.
DATA_SOURCE_FORMS = (
    "FILE.jsonl (lines of {\"image\": path, \"caption\": text})",
    "FILE.csv (columns image, caption)",
    "FILE.json[::IMAGE_ROOT] (ShareGPT4V / LLaVA conversations; caption = first gpt turn)",
    "DIR saved with datasets' save_to_disk (columns image, caption or text)",
    "SHARD.tar, a folder of .tar shards, or shards-{00000..00009}.tar (WebDataset)",
    "DIR of img2dataset 'files' output (KEY.jpg + KEY.txt, in shard sub-folders)",
    "any of these with a FORMAT: prefix (jsonl, csv, llava, hf, wds, files) to force the format",
)

# What decoding a bad image raises in PIL: OSError (truncated data, decoder errors; UnidentifiedImageError and
# FileNotFoundError are subclasses), ValueError (bad sizes or modes), SyntaxError (PIL's "broken PNG file"), and
# DecompressionBombError (absurd declared sizes, usually corrupt headers).
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Skip reasons, the prefix of every `error` string `ImageTextDataset.__getitem__` returns.
MISSING_FILE = "missing file"
UNREADABLE_IMAGE = "unreadable image"


class DataSourceError(ValueError):
    """A data source that cannot be used: unreadable, malformed or empty. The message names the file."""



# Source specs


@dataclass(frozen=True)
class SourceSpec:
    """One ``--data`` item, resolved: its format, its path (or the shard list of a WebDataset pattern), and the
    image root given with ``::`` (or None)."""

    format: str
    path: Path
    spec: str
    image_root: Path | None = None
    shards: tuple[Path, ...] = ()


_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` lists too."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end():]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") else 0
        if int(last) < int(first):
            raise DataSourceError(f"{pattern}: empty range {{{body}}}")
        options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataSourceError(f"{pattern}: cannot expand {{{body}}}; use {{00000..00009}} or {{a,b,c}}")
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def _is_brace_pattern(text: str) -> bool:
    return bool(_BRACE.search(text)) and any(".." in m or "," in m for m in _BRACE.findall(text))


def parse_source(spec: str | os.PathLike[str]) -> SourceSpec:
    """Resolves one ``--data`` item to a `SourceSpec` (format detection as in the module docstring).

    Raises `FileNotFoundError` naming the path when it (or a shard of a pattern) does not exist, and
    `DataSourceError` when the format cannot be told or the spec is malformed.
    """
    text = os.fspath(spec)
    forced = None
    prefix, sep, rest = text.partition(":")
    if sep and prefix in SOURCE_FORMATS:
        forced, text = prefix, rest
    path_text, sep, root_text = text.partition("::")
    image_root = Path(root_text).expanduser() if sep else None
    if sep and not root_text:
        raise DataSourceError(f"--data {spec}: empty image root after '::'")

    if forced in (None, "wds") and _is_brace_pattern(path_text):
        shards = tuple(Path(p).expanduser() for p in _expand_braces(path_text))
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"--data {spec}: {len(missing)} of {len(shards)} shards not found "
                                    f"(first: {missing[0]})")
        return _checked(SourceSpec("wds", Path(path_text), str(spec), image_root, shards))

    path = Path(path_text).expanduser()
    if not path_text or not path.exists():
        raise FileNotFoundError(f"--data {spec}: path not found: {path}")
    if image_root is not None and not image_root.is_dir():
        raise FileNotFoundError(f"--data {spec}: image root is not a folder: {image_root}")
    if forced is not None:
        return _checked(SourceSpec(forced, path, str(spec), image_root))
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            fmt = "hf"
        elif any(child.suffix == ".tar" and child.is_file() for child in path.iterdir()):
            fmt = "wds"
        else:
            fmt = "files"
        return _checked(SourceSpec(fmt, path, str(spec), image_root))
    by_suffix = {".jsonl": "jsonl", ".csv": "csv", ".json": "llava", ".tar": "wds"}
    fmt = by_suffix.get(path.suffix.lower())
    if fmt is None:
        raise DataSourceError(f"--data {spec}: cannot tell the format of {path}; accepted: "
                              + "; ".join(DATA_SOURCE_FORMS))
    return _checked(SourceSpec(fmt, path, str(spec), image_root))


def _checked(source: SourceSpec) -> SourceSpec:
    is_dir = source.path.is_dir()
    if source.format in ("jsonl", "csv", "llava") and is_dir:
        raise DataSourceError(f"--data {source.spec}: {source.format} expects a file, {source.path} is a folder")
    if source.format in ("files", "hf") and not is_dir:
        raise DataSourceError(f"--data {source.spec}: {source.format} expects a folder, {source.path} is a file")
    if source.format in ("files", "wds") and source.image_root is not None:
        raise DataSourceError(f"--data {source.spec}: '::IMAGE_ROOT' only applies to jsonl, csv, llava and hf "
                              "sources (images sit beside their captions here)")
    return source


# --------------------------------------------------------------------------------------------------------------
# Sources: captions in memory, images read on demand


class ImageTextSource:
    """Pairs of one ``--data`` item. Subclasses fill ``captions`` and implement `open_image`/`location`."""

    format = ""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.captions: list[str] = []
        self.notes: list[str] = []  # what was ignored at construction, for describe()
        self.truncated = False      # stopped early because of max_samples

    def __len__(self) -> int:
        return len(self.captions)

    def open_image(self, j: int) -> Image.Image:
        """The decoded RGB image of pair ``j``; raises one of `IMAGE_DECODE_ERRORS` when it cannot."""
        raise NotImplementedError

    def location(self, j: int) -> str:
        raise NotImplementedError

    def where(self) -> str:
        extra = f" (images under {self.spec.image_root})" if self.spec.image_root is not None else ""
        return f"{self.spec.path}{extra}"


def _decode(fp) -> Image.Image:
    with Image.open(fp) as image:
        return image.convert("RGB")  # forces the full decode, so every decoding error surfaces here


def _resolve(root: Path, image: str) -> str:
    path = Path(image).expanduser()
    return str(path if path.is_absolute() else root / path)


class _PathSource(ImageTextSource):
    """Images are files named by path (jsonl, csv, llava, files)."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self.image_paths: list[str] = []

    def open_image(self, j: int) -> Image.Image:
        return _decode(self.image_paths[j])

    def location(self, j: int) -> str:
        return self.image_paths[j]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataSourceError(f"{path}: cannot read: {error}") from error


def _string_field(record: Mapping, key: str, where: str) -> str:
    if key not in record:
        raise DataSourceError(f"{where}: missing '{key}' (keys: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise DataSourceError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


class _JsonlSource(_PathSource):
    format = "jsonl"

    def __init__(self, spec: SourceSpec, limit: int | None) -> None:
        super().__init__(spec)
        root = spec.image_root or spec.path.parent
        try:
            with spec.path.open(encoding="utf-8-sig") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    if limit is not None and len(self.captions) >= limit:
                        self.truncated = True
                        break
                    where = f"{spec.path}, line {line_number}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataSourceError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") \
                            from error
                    if not isinstance(record, dict):
                        raise DataSourceError(f"{where}: expected an object with 'image' and 'caption', got "
                                              f"{type(record).__name__}")
                    image = _string_field(record, "image", where)
                    caption = _string_field(record, "caption", where)
                    if not image:
                        raise DataSourceError(f"{where}: empty 'image'")
                    self.image_paths.append(_resolve(root, image))
                    self.captions.append(caption.strip())
        except (OSError, UnicodeDecodeError) as error:
            raise DataSourceError(f"{spec.path}: cannot read: {error}") from error


class _CsvSource(_PathSource):
    format = "csv"

    def __init__(self, spec: SourceSpec, limit: int | None) -> None:
        super().__init__(spec)
        root = spec.image_root or spec.path.parent
        try:
            with spec.path.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle)
                columns = reader.fieldnames or []
                for column in ("image", "caption"):
                    if column not in columns:
                        raise DataSourceError(f"{spec.path}: no '{column}' column (columns: "
                                              f"{', '.join(columns) or 'none, the file is empty'})")
                for row in reader:
                    if limit is not None and len(self.captions) >= limit:
                        self.truncated = True
                        break
                    where = f"{spec.path}, line {reader.line_num}"
                    image, caption = row["image"], row["caption"]
                    if not image or caption is None:
                        raise DataSourceError(f"{where}: empty 'image' or missing 'caption' cell")
                    self.image_paths.append(_resolve(root, image))
                    self.captions.append(caption.strip())
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise DataSourceError(f"{spec.path}: cannot read: {error}") from error


class _LlavaSource(_PathSource):
    """ShareGPT4V / LLaVA JSON. The caption is the first ``gpt`` turn with newlines replaced by spaces, as
    CLIP-MoE's ShareGPT4V loader (``conversations[1]['value']``)."""

    format = "llava"
    ANSWER_ROLES = ("gpt", "assistant")

    def __init__(self, spec: SourceSpec, limit: int | None) -> None:
        super().__init__(spec)
        root = spec.image_root or spec.path.parent
        try:
            records = json.loads(_read_text(spec.path))
        except json.JSONDecodeError as error:
            raise DataSourceError(f"{spec.path}: not valid JSON ({error.msg}, line {error.lineno})") from error
        if not isinstance(records, list):
            raise DataSourceError(f"{spec.path}: expected a JSON list of samples, got {type(records).__name__}")
        without_image = 0
        for number, record in enumerate(records):
            if limit is not None and len(self.captions) >= limit:
                self.truncated = True
                break
            where = f"{spec.path}, record {number}"
            if not isinstance(record, dict):
                raise DataSourceError(f"{where}: expected an object, got {type(record).__name__}")
            if "id" in record:
                where += f" (id {record['id']})"
            image = record.get("image")
            if not image:
                without_image += 1
                continue
            if not isinstance(image, str):
                raise DataSourceError(f"{where}: 'image' must be one path (a string), got {type(image).__name__}")
            conversations = record.get("conversations")
            if not isinstance(conversations, list):
                raise DataSourceError(f"{where}: missing 'conversations' list")
            answer = next((turn.get("value") for turn in conversations
                           if isinstance(turn, dict) and turn.get("from") in self.ANSWER_ROLES), None)
            if not isinstance(answer, str):
                raise DataSourceError(f"{where}: no 'gpt' turn with a string 'value' to use as the caption")
            self.image_paths.append(_resolve(root, image))
            self.captions.append(answer.replace("\n", " ").strip())
        if without_image:
            self.notes.append(f"{_plural(without_image, 'record')} without image skipped")


class _FilesSource(_PathSource):
    """img2dataset's "files" output: ``KEY.jpg`` beside ``KEY.txt`` (and ``KEY.json``), in any sub-folders,
    walked in sorted order."""

    format = "files"

    def __init__(self, spec: SourceSpec, limit: int | None) -> None:
        super().__init__(spec)
        without_caption = 0
        try:
            for folder, subfolders, names in os.walk(spec.path, onerror=_raise):
                subfolders.sort()
                by_key: dict[str, dict[str, str]] = {}
                for name in names:
                    key, dot, ext = name.rpartition(".")
                    if dot:
                        by_key.setdefault(key, {})[ext.lower()] = name
                for key in sorted(by_key):
                    members = by_key[key]
                    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                    if image is None:
                        continue
                    if "txt" not in members:
                        without_caption += 1
                        continue
                    if limit is not None and len(self.captions) >= limit:
                        self.truncated = True
                        break
                    self.captions.append(_read_text(Path(folder, members["txt"])).strip())
                    self.image_paths.append(os.path.join(folder, image))
                if self.truncated:
                    break
        except OSError as error:
            raise DataSourceError(f"{spec.path}: cannot read: {error}") from error
        if without_caption:
            self.notes.append(f"{_plural(without_caption, 'image')} without a .txt caption ignored")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _raise(error: OSError) -> None:
    raise error


def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is everything before the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _TarSource(ImageTextSource):
    """WebDataset shards. The index (shard, data offset, size of each image member) is built once; images are
    read by seeking into the shard, through file handles opened lazily in each process."""

    format = "wds"
    MAX_OPEN_SHARDS = 16

    def __init__(self, spec: SourceSpec, limit: int | None) -> None:
        super().__init__(spec)
        if spec.shards:
            self.shards = list(spec.shards)
        elif spec.path.is_dir():
            self.shards = sorted(p for p in spec.path.iterdir() if p.suffix == ".tar" and p.is_file())
        else:
            self.shards = [spec.path]
        self._members: list[tuple[int, int, int, str]] = []  # (shard, data offset, size, member name)
        incomplete = 0
        for shard_id, shard in enumerate(self.shards):
            if limit is not None and len(self.captions) >= limit:
                self.truncated = True
                break
            incomplete += self._index_shard(shard_id, shard, limit)
        if incomplete:
            self.notes.append(f"{_plural(incomplete, 'sample')} without an image or a caption ignored")
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _index_shard(self, shard_id: int, shard: Path, limit: int | None) -> int:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            # "r:" = uncompressed only: compressed tars cannot be read by seeking.
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        key, ext = _wds_key(member.name)
                        groups.setdefault(key, {})[ext] = member
                incomplete = 0
                for key, members in groups.items():
                    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                    caption = self._caption(archive, shard, members)
                    if image is None or caption is None:
                        incomplete += 1
                        continue
                    if limit is not None and len(self.captions) >= limit:
                        self.truncated = True
                        break
                    self.captions.append(caption.strip())
                    self._members.append((shard_id, image.offset_data, image.size, image.name))
        except tarfile.ReadError as error:
            raise DataSourceError(f"{shard}: not an uncompressed tar file ({error}); WebDataset shards must be "
                                  "plain .tar to be read by seeking") from error
        except (OSError, tarfile.TarError) as error:
            raise DataSourceError(f"{shard}: cannot read: {error}") from error
        return incomplete

    @staticmethod
    def _caption(archive: tarfile.TarFile, shard: Path, members: Mapping[str, tarfile.TarInfo]) -> str | None:
        where = f"{shard}: member {{}}"
        if "txt" in members:
            member = members["txt"]
            try:
                return archive.extractfile(member).read().decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataSourceError(f"{where.format(member.name)}: not UTF-8 text ({error})") from error
        if "json" in members:
            member = members["json"]
            try:
                record = json.loads(archive.extractfile(member).read())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise DataSourceError(f"{where.format(member.name)}: not valid JSON ({error})") from error
            caption = record.get("caption") if isinstance(record, dict) else None
            return caption if isinstance(caption, str) else None
        return None

    def close(self) -> None:
        """Closes this process's open shard handles (reading again reopens them)."""
        for handle in getattr(self, "_handles", {}).values():
            handle.close()
        if getattr(self, "_handles", None):
            self._handles.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handle(self, shard_id: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's file handles
            self._handles, self._pid, self._lock = OrderedDict(), os.getpid(), threading.Lock()
        handle = self._handles.get(shard_id)
        if handle is None:
            handle = open(self.shards[shard_id], "rb")  # noqa: SIM115 (kept open, closed on eviction)
            self._handles[shard_id] = handle
            if len(self._handles) > self.MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(shard_id)
        return handle

    def read_member(self, j: int) -> bytes:
        shard_id, offset, size, name = self._members[j]
        with self._lock:
            handle = self._handle(shard_id)
            if hasattr(os, "pread"):
                data = os.pread(handle.fileno(), size, offset)
            else:
                handle.seek(offset)
                data = handle.read(size)
        if len(data) != size:
            raise OSError(f"tar member {name} is truncated ({len(data)} of {size} bytes)")
        return data

    def open_image(self, j: int) -> Image.Image:
        return _decode(io.BytesIO(self.read_member(j)))

    def location(self, j: int) -> str:
        shard_id, _, _, name = self._members[j]
        return f"{self.shards[shard_id]}:{name}"

    def where(self) -> str:
        return f"{self.spec.path} ({_plural(len(self.shards), 'shard')})"


class _HFSource(ImageTextSource):
    """A ``datasets.Dataset`` saved with ``save_to_disk``. Image bytes are decoded here with PIL (the Image
    feature is cast to ``decode=False``) so a bad image is skipped like any other."""

    format = "hf"

    def __init__(self, spec: SourceSpec, limit: int | None) -> None:
        super().__init__(spec)
        import datasets

        try:
            loaded = datasets.load_from_disk(str(spec.path))
        except (OSError, ValueError) as error:  # datasets raises FileNotFoundError/ValueError for bad folders
            raise DataSourceError(f"{spec.path}: cannot load with datasets.load_from_disk: {error}") from error
        if isinstance(loaded, datasets.DatasetDict):
            raise DataSourceError(f"{spec.path}: holds a DatasetDict with splits {list(loaded)}; pass one split's "
                                  f"folder, e.g. {spec.path / next(iter(loaded), 'train')}")
        columns = loaded.column_names
        caption_column = next((c for c in ("caption", "text") if c in columns), None)
        if "image" not in columns or caption_column is None:
            missing = "image" if "image" not in columns else "caption (or text)"
            raise DataSourceError(f"{spec.path}: no '{missing}' column (columns: {', '.join(columns)})")
        loaded = loaded.with_format(None)
        n = len(loaded) if limit is None else min(limit, len(loaded))
        self.truncated = n < len(loaded)
        for row, caption in enumerate(loaded[caption_column][:n]):
            if not isinstance(caption, str):
                raise DataSourceError(f"{spec.path}, row {row}: '{caption_column}' must be a string, got "
                                      f"{type(caption).__name__}")
            self.captions.append(caption.strip())
        feature = loaded.features["image"]
        images = loaded.select_columns(["image"])
        if isinstance(feature, datasets.Image):
            images = images.cast_column("image", datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataSourceError(f"{spec.path}: column 'image' must be a datasets Image feature or a path string, "
                                  f"got {feature}")
        self._images = images
        self._root = spec.image_root or spec.path.parent
        self.caption_column = caption_column

    def _value(self, j: int) -> Any:
        return self._images[j]["image"]

    def open_image(self, j: int) -> Image.Image:
        value = self._value(j)
        if isinstance(value, dict):
            if value.get("bytes"):
                return _decode(io.BytesIO(value["bytes"]))
            value = value.get("path")
        if not value:
            raise FileNotFoundError(f"row {j} has no image bytes and no path")
        return _decode(_resolve(self._root, value))

    def location(self, j: int) -> str:
        value = self._value(j)
        path = value.get("path") if isinstance(value, dict) else value
        return f"{self.spec.path}, row {j}" + (f" ({path})" if path else "")


LOADERS = {"jsonl": _JsonlSource, "csv": _CsvSource, "llava": _LlavaSource, "files": _FilesSource,
            "wds": _TarSource, "hf": _HFSource}

