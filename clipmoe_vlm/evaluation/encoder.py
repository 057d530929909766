"""Encoder evaluation of a (dense or MoE) CLIP: image-text retrieval, zero-shot classification, MMVP-VLM pairs.

Every function takes a model with ``get_image_features(pixel_values=...)`` and ``get_text_features(input_ids=...)``
(transformers ``CLIPModel``, `clipmoe_vlm.CLIPMoEModel`; the outputs' ``pooler_output`` is the projected embedding,
a plain tensor is accepted too), an image ``transform`` (PIL image -> (3, H, W) tensor, e.g.
``clipmoe_vlm.processing.clip_image_transform``) and a ``tokenizer`` (list of strings -> (B, L) LongTensor, e.g.
``clipmoe_vlm.processing.open_clip_tokenizer``). Features are computed in batches under ``torch.no_grad`` with the model in
eval mode (its mode is restored afterwards), optionally under bf16 autocast, and L2-normalised in fp32.

Protocols (those of CLIP-MoE's and the MCL repositories' evaluation code):

- **Retrieval** (`retrieval_metrics`): image->text Recall@K counts an image as a hit when any of its captions is
  among the K most similar texts; text->image Recall@K counts a caption as a hit when its image is among the K
  most similar images. Data: COCO captions JSON (`load_coco_captions`, first 5 captions per image),
  Flickr30k Karpathy JSON (`load_flickr_karpathy`, the 1K test split, 5 sentences each: the usual protocol) or
  Flickr30k ``results_20130124.token`` (`load_flickr_token`, all 31,783 images: the protocol of CLIP-MoE's /
  Long-CLIP's code, whose numbers are much lower than 1K-test numbers and not comparable with them).
- **Zero-shot classification** (`zeroshot_classification`): ImageNet-style class folders; a class embedding is the
  mean of its normalised template embeddings, renormalised; logits are ``100 * image @ classes``; top-1, top-5
  (when there are more than 5 classes), per-class and mean per-class accuracy.
- **MMVP-VLM** (`mmvp_vlm`): statements ``2k-1`` and ``2k`` form a pair over the images ``<Type>/<qid>.jpg``; the
  prompt is ``"a photo of " + statement``; a statement picks the image with the larger softmax probability over
  the pair's two images (scale 100; as the upstream script, statement ``2k-1`` is right when its image has
  probability > 0.5, statement ``2k`` when image ``2k-1``'s probability is not > 0.5); a pair scores only when
  both statements are right. Accuracy per ``Type`` and their average.

Results are dicts of fractions in [0, 1] plus counts (ints) and nested details; `flatten_metrics` keeps the
fractions for a results table. `evaluate_encoder` runs any set of these; `evaluate_shapes_encoder` runs all of
them on the Shapes world's ``encoder_eval/`` folder (see `clipmoe_vlm.data.shapes`).

A folder or file in the wrong layout raises `FileNotFoundError` (missing file, the message names the file the
layout expects) or `EvalDataError` (a `ValueError`: the file exists but its content is malformed; the message
names the file and the record).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = [
    "EvalDataError",
    "RetrievalSet",
    "default_templates",
    "encode_images",
    "encode_texts",
    "evaluate_encoder",
    "evaluate_retrieval",
    "flatten_metrics",
    "load_coco_captions",
    "load_flickr_karpathy",
    "load_flickr_token",
    "mmvp_vlm",
    "retrieval_metrics",
    "zeroshot_classification",
    "zeroshot_classifier",
]

PathLike = str | os.PathLike[str]
Transform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
RECALL_KS = (1, 5, 10)
LOGIT_SCALE = 100.0
MMVP_PROMPT = "a photo of "
_WNID = re.compile(r"n\d{8}")


class EvalDataError(ValueError):
    """An evaluation file that exists but cannot be used (malformed, inconsistent, empty); the message names it."""


# --------------------------------------------------------------------------------------------------------------
# Feature extraction


def _features(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"the model's feature method returned {type(output).__name__} without pooler_output")
    return pooled


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _inference(model: torch.nn.Module, device: torch.device, bf16: bool) -> Iterator[None]:
    """Eval mode (restored on exit), no grad, optional bf16 autocast."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            yield
    finally:
        model.train(was_training)


def _check_model(model: Any) -> None:
    missing = [m for m in ("get_image_features", "get_text_features") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"{type(model).__name__} has no {' / '.join(missing)}; the encoder evaluation needs a "
                        "two-tower CLIP (transformers CLIPModel or clipmoe_vlm.CLIPMoEModel)")


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[PathLike], transform: Transform):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:
            raise EvalDataError(f"cannot read image {path}: {err}") from err


def _check_files(paths: Sequence[PathLike], what: str) -> None:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what}: expected image {missing[0]}{more}")


def encode_images(model, images: Sequence[PathLike], transform: Transform, *, batch_size: int = 64,
                  device: str | torch.device | None = None, bf16: bool = False, num_workers: int = 0,
                  progress: bool = True, desc: str = "images") -> torch.Tensor:
    """(N, D) L2-normalised fp32 CPU image embeddings of the image files ``images`` (in order).

    ``device`` moves the model there; None keeps the model where it is. Missing files fail before any work.
    """
    _check_model(model)
    _check_files(images, desc)
    device = _model_device(model, device)
    loader = DataLoader(_ImageFiles(images, transform), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False)
    chunks = []
    with _inference(model, device, bf16):
        for pixels in tqdm(loader, desc=f"encode {desc}", disable=not progress, leave=False):
            feats = _features(model.get_image_features(pixel_values=pixels.to(device)))
            chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    if not chunks:
        raise EvalDataError(f"{desc}: no images to encode")
    return torch.cat(chunks)


def encode_texts(model, texts: Sequence[str], tokenizer: Tokenizer, *, batch_size: int = 256,
                 device: str | torch.device | None = None, bf16: bool = False, progress: bool = True,
                 desc: str = "texts") -> torch.Tensor:
    """(N, D) L2-normalised fp32 CPU text embeddings of ``texts`` (in order)."""
    _check_model(model)
    device = _model_device(model, device)
    texts = list(texts)
    chunks = []
    with _inference(model, device, bf16):
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=f"encode {desc}", disable=not progress, leave=False):
            ids = torch.as_tensor(tokenizer(texts[start:start + batch_size])).to(device)
            feats = _features(model.get_text_features(input_ids=ids))
            chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    if not chunks:
        raise EvalDataError(f"{desc}: no texts to encode")
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------------------------------
# Retrieval


@dataclass
class RetrievalSet:
    """Images, captions and which image each caption describes (``text_to_image[j]`` indexes ``images``)."""

    images: list[Path]
    texts: list[str]
    text_to_image: list[int]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.text_to_image):
            raise ValueError(f"{self.source}: {len(self.texts)} texts but {len(self.text_to_image)} image indices")
        if not self.images or not self.texts:
            raise EvalDataError(f"{self.source}: no images with captions")
        bad = [i for i in self.text_to_image if not 0 <= i < len(self.images)]
        if bad:
            raise ValueError(f"{self.source}: text_to_image holds indices outside range({len(self.images)}): "
                             f"{bad[:5]}")


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} ({expected})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalDataError(f"{path}: not valid JSON ({expected}): {err}") from err


def _require_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"expected {path}/ ({expected})")
    return path


def load_coco_captions(captions: PathLike, images: PathLike | None = None,
                       captions_per_image: int = 5) -> RetrievalSet:
    """A COCO-captions retrieval set: ``captions`` is the JSON file (``{"images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]}``) or a folder holding ``captions.json`` (and ``images/``);
    ``images`` is the image folder (default: ``images/`` next to the JSON when it exists, else the JSON's folder).

    The first ``captions_per_image`` captions of each image, in file order, are kept (CLIP-MoE's eval keeps 5);
    images without captions are left out.
    """
    path = Path(captions)
    if path.is_dir():
        path = path / "captions.json"
    data = _read_json(path, "COCO captions format")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise EvalDataError(f"{path}: expected COCO captions format, an object with 'images' and 'annotations' "
                            "lists")
    if images is None:
        images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_dir = _require_dir(Path(images), f"images of {path.name}")
    by_image: dict[Any, list[str]] = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise EvalDataError(f"{path}: annotations[{k}] needs 'image_id' and a string 'caption'")
        by_image[ann["image_id"]].append(ann["caption"].strip())
    paths, texts, owner = [], [], []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise EvalDataError(f"{path}: images[{k}] needs 'id' and a string 'file_name'")
        caps = by_image.get(img["id"], [])[:captions_per_image]
        if not caps:
            continue
        owner.extend([len(paths)] * len(caps))
        texts.extend(caps)
        paths.append(image_dir / img["file_name"])
    return RetrievalSet(paths, texts, owner, source=str(path))


def load_flickr_karpathy(karpathy_json: PathLike, images: PathLike, split: str = "test",
                         captions_per_image: int = 5) -> RetrievalSet:
    """Flickr30k (or COCO) in Karpathy's ``dataset_flickr30k.json`` format: images of ``split`` (the 1K test split
    by default) with their first ``captions_per_image`` sentences (``raw``)."""
    path = Path(karpathy_json)
    data = _read_json(path, "Karpathy split format, e.g. dataset_flickr30k.json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise EvalDataError(f"{path}: expected Karpathy split format, an object with an 'images' list")
    image_dir = _require_dir(Path(images), f"images of {path.name}")
    paths, texts, owner = [], [], []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) or "sentences" not in img:
            raise EvalDataError(f"{path}: images[{k}] needs 'filename', 'split' and 'sentences'")
        if img.get("split") != split:
            continue
        caps = [s["raw"].strip() for s in img["sentences"][:captions_per_image]
                if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        if not caps:
            continue
        owner.extend([len(paths)] * len(caps))
        texts.extend(caps)
        paths.append(image_dir / img.get("filepath", "") / img["filename"])
    if not paths:
        raise EvalDataError(f"{path}: no image of split '{split}'")
    return RetrievalSet(paths, texts, owner, source=f"{path} (split {split})")


def load_flickr_token(token_file: PathLike, images: PathLike, captions_per_image: int = 5) -> RetrievalSet:
    """Flickr30k ``results_20130124.token`` (lines ``IMAGE.jpg#N<TAB>caption``): every image (31,783 in the full
    file) with its first ``captions_per_image`` captions, the protocol of CLIP-MoE's code."""
    path = Path(token_file)
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} (Flickr30k results_20130124.token: IMAGE.jpg#N<TAB>caption)")
    image_dir = _require_dir(Path(images), f"images of {path.name}")
    by_image: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, caption = line.rstrip("\n").partition("\t")
            name = key.rsplit("#", 1)[0]
            if not sep or "#" not in key or not caption.strip():
                raise EvalDataError(f"{path}:{line_no}: expected 'IMAGE.jpg#N<TAB>caption'")
            by_image.setdefault(name, []).append(caption.strip())
    paths, texts, owner = [], [], []
    for name, caps in by_image.items():
        caps = caps[:captions_per_image]
        owner.extend([len(paths)] * len(caps))
        texts.extend(caps)
        paths.append(image_dir / name)
    return RetrievalSet(paths, texts, owner, source=str(path))


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Sequence[int] | torch.Tensor, ks: Sequence[int] = RECALL_KS,
                      chunk_size: int = 1024) -> dict[str, float]:
    """Recall@K both ways from (N, D) image and (T, D) text embeddings (normalised: similarity = dot product).

    Returns ``{"i2t_R@K": ..., "t2i_R@K": ...}`` as fractions. Similarities are computed ``chunk_size`` rows at a
    time, so the full (N, T) matrix is never held (31K x 159K for full Flickr30k).
    """
    img = image_features.float()
    txt = text_features.float()
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=txt.device)
    num_images, num_texts = img.shape[0], txt.shape[0]
    if owner.numel() != num_texts:
        raise ValueError(f"text_to_image has {owner.numel()} entries for {num_texts} texts")
    kmax = max(ks)
    i2t_hits = {k: 0 for k in ks}
    for start in range(0, num_images, chunk_size):
        sims = img[start:start + chunk_size] @ txt.T  # (c, T)
        top = sims.topk(min(kmax, num_texts), dim=1).indices  # (c, kmax)
        correct = owner[top] == torch.arange(start, start + sims.shape[0], device=owner.device)[:, None]
        for k in ks:
            i2t_hits[k] += int(correct[:, :k].any(dim=1).sum())
    t2i_hits = {k: 0 for k in ks}
    for start in range(0, num_texts, chunk_size):
        sims = txt[start:start + chunk_size] @ img.T  # (c, N)
        top = sims.topk(min(kmax, num_images), dim=1).indices
        correct = top == owner[start:start + sims.shape[0], None]
        for k in ks:
            t2i_hits[k] += int(correct[:, :k].any(dim=1).sum())
    out = {f"i2t_R@{k}": i2t_hits[k] / num_images for k in ks}
    out.update({f"t2i_R@{k}": t2i_hits[k] / num_texts for k in ks})
    return out


def evaluate_retrieval(model, dataset: RetrievalSet, transform: Transform, tokenizer: Tokenizer, *,
                       batch_size: int = 64, device: str | torch.device | None = None, bf16: bool = False,
                       num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """I->T and T->I Recall@1/5/10 of ``model`` on ``dataset``, plus ``num_images`` and ``num_texts``."""
    common = {"device": device, "bf16": bf16, "progress": progress}
    img = encode_images(model, dataset.images, transform, batch_size=batch_size, num_workers=num_workers,
                        desc="retrieval images", **common)
    txt = encode_texts(model, dataset.texts, tokenizer, batch_size=batch_size, desc="retrieval captions", **common)
    return {**retrieval_metrics(img, txt, dataset.text_to_image), "num_images": len(dataset.images),
            "num_texts": len(dataset.texts)}


# --------------------------------------------------------------------------------------------------------------
# Zero-shot classification


def _format_template(template: str | Callable[[str], str], classname: str, source: str) -> str:
    if callable(template):
        return template(classname)
    if "{}" not in template:
        raise EvalDataError(f"{source}: template {template!r} has no '{{}}' slot for the class name")
    return template.replace("{}", classname)


def default_templates() -> tuple[Callable[[str], str], ...]:
    """open_clip's 80 OpenAI ImageNet prompt templates."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES  # heavy import (timm): only when needed

    return tuple(OPENAI_IMAGENET_TEMPLATES)


@torch.no_grad()
def zeroshot_classifier(model, classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]],
                        tokenizer: Tokenizer, *, batch_size: int = 256, device: str | torch.device | None = None,
                        bf16: bool = False, progress: bool = True, source: str = "templates") -> torch.Tensor:
    """(D, C) class embeddings: per class, the mean of the L2-normalised embeddings of its prompts (one per
    template, ``"{}"`` replaced by the class name, or a callable template), renormalised."""
    if not classnames or not templates:
        raise EvalDataError(f"{source}: need at least one class name and one template")
    prompts = [_format_template(t, c, source) for c in classnames for t in templates]
    feats = encode_texts(model, prompts, tokenizer, batch_size=batch_size, device=device, bf16=bf16,
                         progress=progress, desc="class prompts")
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(feats, dim=-1).T.contiguous()


def _class_folders(root: Path) -> tuple[list[str], list[Path], list[int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"expected class folders {root}/<class>/*.jpg|png (ImageNet-style layout); "
                                f"{root} has no sub-folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise FileNotFoundError(f"expected images {root}/<class>/*.jpg|png; the class folders hold none")
    return classes, paths, labels


def _load_classnames(root: Path, folders: list[str], classnames: Sequence[str] | PathLike | None) -> list[str]:
    source = "classnames"
    if classnames is None:
        file = root / "classnames.json"
        if file.is_file():
            classnames, source = file, str(file)
        elif len(folders) == 1000 and all(_WNID.fullmatch(f) for f in folders):
            from open_clip import IMAGENET_CLASSNAMES  # ImageNet-1k folders named by WordNet id

            return list(IMAGENET_CLASSNAMES)
        else:
            return list(folders)
    if isinstance(classnames, (str, os.PathLike)):
        source = str(classnames)
        classnames = _read_json(Path(classnames), "a JSON list of class names in sorted folder order")
    names = list(classnames)
    if len(names) != len(folders) or not all(isinstance(n, str) for n in names):
        raise EvalDataError(f"{source}: expected {len(folders)} class names (one string per class folder of "
                            f"{root}, in sorted order), got {len(names)}")
    return names


def _load_templates(root: Path, templates: Sequence[str | Callable[[str], str]] | PathLike | None) -> tuple[list, str]:
    if templates is None:
        file = root / "templates.json"
        if not file.is_file():
            return list(default_templates()), "open_clip OPENAI_IMAGENET_TEMPLATES"
        templates = file
    if isinstance(templates, (str, os.PathLike)):
        source = str(templates)
        loaded = _read_json(Path(templates), "a JSON list of prompt templates with a '{}' slot")
        if not isinstance(loaded, list) or not loaded or not all(isinstance(t, str) for t in loaded):
            raise EvalDataError(f"{source}: expected a non-empty JSON list of template strings")
        return loaded, source
    return list(templates), "templates"


def zeroshot_classification(model, root: PathLike, transform: Transform, tokenizer: Tokenizer, *,
                            classnames: Sequence[str] | PathLike | None = None,
                            templates: Sequence[str | Callable[[str], str]] | PathLike | None = None,
                            batch_size: int = 64, device: str | torch.device | None = None, bf16: bool = False,
                            num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Zero-shot accuracy on ImageNet-style class folders ``root/<class>/*.jpg|png`` (classes in sorted order).

    Class names: ``classnames`` (a list or a JSON file), else ``root/classnames.json``, else open_clip's ImageNet
    names when ``root`` holds the 1000 WordNet-id folders of ImageNet-1k, else the folder names. Templates:
    ``templates`` (a list or a JSON file), else ``root/templates.json``, else open_clip's 80 OpenAI templates.

    Returns ``top1``, ``top5`` (only with more than 5 classes), ``mean_per_class``, ``per_class`` (class name ->
    accuracy), ``num_images``, ``num_classes``.
    """
    root = Path(root)
    _require_dir(root, "ImageNet-style class folders <class>/*.jpg|png")
    folders, paths, labels = _class_folders(root)
    names = _load_classnames(root, folders, classnames)
    template_list, template_source = _load_templates(root, templates)
    common = {"device": device, "bf16": bf16, "progress": progress}
    weights = zeroshot_classifier(model, names, template_list, tokenizer, batch_size=batch_size,
                                  source=template_source, **common)
    feats = encode_images(model, paths, transform, batch_size=batch_size, num_workers=num_workers,
                          desc=f"zero-shot {root.name}", **common)
    logits = LOGIT_SCALE * feats @ weights
    target = torch.tensor(labels)
    num_classes = len(names)
    ranked = logits.topk(min(5, num_classes), dim=1).indices
    hit1 = ranked[:, 0] == target
    out: dict[str, Any] = {"top1": float(hit1.double().mean())}
    if num_classes > 5:
        out["top5"] = float((ranked == target[:, None]).any(dim=1).double().mean())
    per_class = {}
    for label, name in enumerate(names):
        sel = target == label
        if sel.any():
            per_class[name] = float(hit1[sel].double().mean())
    out["mean_per_class"] = sum(per_class.values()) / len(per_class)
    out.update(per_class=per_class, num_images=len(paths), num_classes=num_classes)
    return out


# --------------------------------------------------------------------------------------------------------------
# MMVP-VLM


def _read_mmvp_questions(csv_path: Path) -> list[tuple[int, str, str]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"expected {csv_path} (MMVP-VLM layout: columns \"Question ID\",\"Type\","
                                "\"Statement\" and images 'MLLM_VLM Images/<Type>/<qid>.jpg')")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in ("Question ID", "Type", "Statement") if c not in fields]
        if missing:
            raise EvalDataError(f"{csv_path}: missing columns {missing}; expected \"Question ID\",\"Type\","
                                f"\"Statement\", found {fields}")
        rows = []
        for line_no, row in enumerate(reader, 2):
            row = {(k or "").strip(): v for k, v in row.items()}
            try:
                qid = int(str(row["Question ID"]).strip())
            except ValueError:
                raise EvalDataError(f"{csv_path}:{line_no}: 'Question ID' {row['Question ID']!r} is not an "
                                    "integer") from None
            rows.append((qid, str(row["Type"]).strip(), str(row["Statement"]).strip()))
    if not rows:
        raise EvalDataError(f"{csv_path}: no statements")
    return rows


def mmvp_vlm(model, root: PathLike, transform: Transform, tokenizer: Tokenizer, *, batch_size: int = 64,
             device: str | torch.device | None = None, bf16: bool = False, num_workers: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """MMVP-VLM pair accuracy on ``root/Questions.csv`` + ``root/MLLM_VLM Images/<Type>/<qid>.jpg``.

    Returns one accuracy per ``Type`` found in the CSV (key = the type), ``average`` (the mean over types),
    ``num_pairs`` and ``pairs_per_type``.
    """
    root = Path(root)
    csv_path = root / "Questions.csv"
    rows = _read_mmvp_questions(csv_path)
    by_id = {}
    for qid, qtype, statement in rows:
        if qid in by_id:
            raise EvalDataError(f"{csv_path}: Question ID {qid} appears twice")
        by_id[qid] = (qtype, statement)
    pairs = []
    for qid in sorted(q for q in by_id if q % 2 == 1):
        if qid + 1 not in by_id:
            raise EvalDataError(f"{csv_path}: Question ID {qid} has no partner {qid + 1} (pairs are 2k-1, 2k)")
        if by_id[qid][0] != by_id[qid + 1][0]:
            raise EvalDataError(f"{csv_path}: Question IDs {qid} and {qid + 1} form a pair but have different "
                                f"Types ({by_id[qid][0]!r}, {by_id[qid + 1][0]!r})")
        pairs.append((qid, qid + 1))
    unpaired = sorted(q for q in by_id if q % 2 == 0 and q - 1 not in by_id)
    if unpaired:
        raise EvalDataError(f"{csv_path}: Question ID {unpaired[0]} has no partner {unpaired[0] - 1}")
    image_dir = root / "MLLM_VLM Images"
    _require_dir(image_dir, f"MMVP-VLM images <Type>/<qid>.jpg next to {csv_path.name}")
    qids = [q for pair in pairs for q in pair]
    images = [image_dir / by_id[q][0] / f"{q}.jpg" for q in qids]
    common = {"device": device, "bf16": bf16, "progress": progress}
    img = encode_images(model, images, transform, batch_size=batch_size, num_workers=num_workers,
                        desc="MMVP images", **common)
    txt = encode_texts(model, [MMVP_PROMPT + by_id[q][1] for q in qids], tokenizer, batch_size=batch_size,
                       desc="MMVP statements", **common)
    img, txt = img.view(len(pairs), 2, -1), txt.view(len(pairs), 2, -1)
    # probs[p, s, i]: statement s of pair p, softmax over the pair's two images.
    probs = (LOGIT_SCALE * torch.einsum("psd,pid->psi", txt, img)).softmax(dim=-1)
    first_right = probs[:, 0, 0] > 0.5  # statement 2k-1 must pick image 2k-1
    second_right = ~(probs[:, 1, 0] > 0.5)  # statement 2k must pick image 2k
    correct = (first_right & second_right).tolist()
    per_type: dict[str, list[bool]] = defaultdict(list)
    for (q, _), ok in zip(pairs, correct):
        per_type[by_id[q][0]].append(ok)
    out: dict[str, Any] = {t: sum(v) / len(v) for t, v in per_type.items()}
    out["average"] = sum(out.values()) / len(out)
    out.update(num_pairs=len(pairs), pairs_per_type={t: len(v) for t, v in per_type.items()})
    return out


# --------------------------------------------------------------------------------------------------------------
# Several tasks at once


def evaluate_encoder(model, transform: Transform, tokenizer: Tokenizer, *, coco: PathLike | None = None,
                     coco_images: PathLike | None = None, flickr: PathLike | None = None,
                     flickr_images: PathLike | None = None, flickr_full_token: PathLike | None = None,
                     zeroshot: PathLike | Mapping[str, PathLike] | None = None, mmvp: PathLike | None = None,
                     batch_size: int = 64, device: str | torch.device | None = None, bf16: bool = False,
                     num_workers: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Runs the tasks that are given and returns ``{task: result}``.

    - ``coco`` (+ ``coco_images``): `load_coco_captions` -> task ``"coco"``;
    - ``flickr`` (Karpathy JSON) + ``flickr_images`` -> ``"flickr"`` (1K test split); ``flickr_full_token``
      (``results_20130124.token``) + ``flickr_images`` -> ``"flickr_full"`` (every image);
    - ``zeroshot``: one class-folder root (task ``"zeroshot/<folder name>"``) or ``{name: root}``
      (tasks ``"zeroshot/<name>"``);
    - ``mmvp``: an MMVP-VLM folder -> ``"mmvp"``.

    ``flatten_metrics`` turns the result into one flat ``{"task/metric": fraction}`` dict.
    """
    common = {"batch_size": batch_size, "device": device, "bf16": bf16, "num_workers": num_workers,
              "progress": progress}
    if (flickr is not None or flickr_full_token is not None) and flickr_images is None:
        raise ValueError("flickr_images (the Flickr30k image folder) is needed with flickr / flickr_full_token")
    results: dict[str, dict[str, Any]] = {}
    if coco is not None:
        results["coco"] = evaluate_retrieval(model, load_coco_captions(coco, coco_images), transform, tokenizer,
                                             **common)
    if flickr is not None:
        results["flickr"] = evaluate_retrieval(model, load_flickr_karpathy(flickr, flickr_images), transform,
                                               tokenizer, **common)
    if flickr_full_token is not None:
        results["flickr_full"] = evaluate_retrieval(model, load_flickr_token(flickr_full_token, flickr_images),
                                                    transform, tokenizer, **common)
    if zeroshot is not None:
        roots = dict(zeroshot) if isinstance(zeroshot, Mapping) else {Path(zeroshot).name: zeroshot}
        for name, root in roots.items():
            results[f"zeroshot/{name}"] = zeroshot_classification(model, root, transform, tokenizer, **common)
    if mmvp is not None:
        results["mmvp"] = mmvp_vlm(model, mmvp, transform, tokenizer, **common)
    return results


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{task: {metric: value}}`` -> ``{"task/metric": value}`` for the float metrics (fractions in [0, 1]);
    counts (ints) and nested details (per-class accuracies) are left out."""
    return {f"{task}/{name}": float(value) for task, metrics in results.items() for name, value in metrics.items()
            if isinstance(value, float) and not math.isnan(value)}
