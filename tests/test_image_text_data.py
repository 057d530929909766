"""Image–text data sources for contrastive training (clipmoe_vlm.data.image_text): every format yields the same pairs, the
tokenizer and transform match CLIP's, bad images are skipped and counted, bad sources fail at construction."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import datasets
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipmoe_vlm.data.image_text import ImageTextDataset, collate_image_text
from clipmoe_vlm.data.image_text_sources import DataSourceError, parse_source
from clipmoe_vlm.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_image_transform, open_clip_tokenizer

IMAGE_SIZE = 16
CAPTIONS = ["a red square", "a green field at dusk", "two blue circles", "an empty grey room", "a yellow kite"]
COLOURS = [(220, 30, 30), (30, 200, 60), (20, 40, 230), (128, 128, 128), (240, 220, 20)]
SIZES = [(20, 12), (12, 20), (16, 16), (33, 17), (24, 24)]  # non-square ones exercise resize + center crop


def _png_bytes(k: int) -> bytes:
    image = Image.new("RGB", SIZES[k], COLOURS[k])
    image.putpixel((0, 0), (k, 255 - k, 7))  # pixels that differ between pairs beyond the fill colour
    image.putpixel((SIZES[k][0] // 2, SIZES[k][1] // 2), (255, 255 - 40 * k, 40 * k))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def strict_pil(monkeypatch):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES on import (another test may have imported it); these
    tests need PIL's default, under which a truncated file is an error."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


@pytest.fixture(scope="module")
def transform():
    return clip_image_transform(IMAGE_SIZE)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip_tokenizer(context_length=20)


@pytest.fixture(scope="module")
def reference(transform):
    """The pixel tensors every format must produce, decoded straight from the PNG bytes."""
    return torch.stack([transform(Image.open(io.BytesIO(_png_bytes(k)))) for k in range(5)])


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(5):
        (folder / f"img{k}.png").write_bytes(_png_bytes(k))
        names.append(f"images/img{k}.png")
    return names


def make_source(fmt: str, root: Path) -> str:
    """Writes the same five pairs in format ``fmt`` under ``root``; returns the ``--data`` spec."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        names = _write_images(root / "images")
        lines = [json.dumps({"image": name, "caption": caption}) for name, caption in zip(names, CAPTIONS)]
        (root / "pairs.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
        return str(root / "pairs.jsonl")
    if fmt == "csv":
        names = _write_images(root / "images")
        with open(root / "pairs.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "caption", "image"])
            writer.writerows([k, caption, name] for k, (name, caption) in enumerate(zip(names, CAPTIONS)))
        return str(root / "pairs.csv")
    if fmt == "llava":
        names = _write_images(root / "data" / "images")
        records = [{"id": f"s{k}", "image": name,
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                      {"from": "gpt", "value": caption}]}
                   for k, (name, caption) in enumerate(zip(names, CAPTIONS))]
        records.insert(2, {"id": "text-only", "conversations": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": "hello"}]})
        (root / "share.json").write_text(json.dumps(records))
        return f"{root / 'share.json'}::{root / 'data'}"
    if fmt == "files":
        for k in range(5):
            shard = root / f"{k // 3:05d}"
            shard.mkdir(exist_ok=True)
            (shard / f"{k:09d}.png").write_bytes(_png_bytes(k))
            (shard / f"{k:09d}.txt").write_text(CAPTIONS[k] + "\n")
            (shard / f"{k:09d}.json").write_text(json.dumps({"key": k}))
        (root / "00001" / "000000099.jpg").write_bytes(_png_bytes(0))  # no caption: ignored and counted
        return str(root)
    if fmt == "wds":
        for shard_id, keys in enumerate([(0, 1, 2), (3, 4)]):
            with tarfile.open(root / f"shard-{shard_id:03d}.tar", "w") as archive:
                for k in keys:
                    _add_member(archive, f"{k:09d}.png", _png_bytes(k))
                    if k == 3:
                        _add_member(archive, f"{k:09d}.json", json.dumps({"caption": CAPTIONS[k]}).encode())
                    else:
                        _add_member(archive, f"{k:09d}.txt", CAPTIONS[k].encode())
                    if k == 1:
                        _add_member(archive, "000000099.txt", b"caption without an image")
        return str(root / "shard-{000..001}.tar")
    if fmt == "hf":
        features = datasets.Features(image=datasets.Image(), caption=datasets.Value("string"))
        images = [Image.open(io.BytesIO(_png_bytes(k))) for k in range(5)]
        dataset = datasets.Dataset.from_dict({"image": images, "caption": CAPTIONS}, features=features)
        dataset.save_to_disk(str(root / "saved"))
        return str(root / "saved")
    raise AssertionError(fmt)


FORMATS = ["jsonl", "csv", "llava", "files", "wds", "hf"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_yields_the_same_pairs(fmt, tmp_path, transform, tokenizer, reference):
    spec = make_source(fmt, tmp_path / fmt)
    assert parse_source(spec).format == fmt
    dataset = ImageTextDataset([spec], transform, tokenizer)
    assert len(dataset) == 5
    assert dataset.captions == CAPTIONS
    samples = [dataset[i] for i in range(5)]
    assert [s["index"] for s in samples] == list(range(5))
    assert all(s["error"] is None for s in samples)
    torch.testing.assert_close(torch.stack([s["pixel_values"] for s in samples]), reference, rtol=0, atol=0)
    assert torch.equal(torch.stack([s["input_ids"] for s in samples]), tokenizer(CAPTIONS))
    described = dataset.describe()
    assert described.startswith(fmt) and "5 pairs" in described and len(described.splitlines()) == 1


def test_construction_counts_what_it_ignores(tmp_path, transform, tokenizer):
    llava = ImageTextDataset([make_source("llava", tmp_path / "l")], transform, tokenizer)
    files = ImageTextDataset([make_source("files", tmp_path / "f")], transform, tokenizer)
    wds = ImageTextDataset([make_source("wds", tmp_path / "w")], transform, tokenizer)
    assert "1 record without image skipped" in llava.describe()
    assert "1 image without a .txt caption ignored" in files.describe()
    assert "1 sample without an image or a caption ignored" in wds.describe() and "(2 shards)" in wds.describe()


def test_llava_caption_is_first_gpt_turn_without_newlines(tmp_path, transform, tokenizer):
    (tmp_path / "a.png").write_bytes(_png_bytes(0))
    record = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red\nsquare.\n\nOn grey."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}
    (tmp_path / "s.json").write_text(json.dumps([record]))
    dataset = ImageTextDataset([tmp_path / "s.json"], transform, tokenizer)
    assert dataset.captions == ["A red square.  On grey."]
    assert dataset[0]["error"] is None


def test_detection_prefixes_and_tar_layouts(tmp_path, transform, tokenizer, reference):
    spec = make_source("wds", tmp_path / "w")
    folder = tmp_path / "w"
    assert parse_source(folder).format == "wds"  # a folder holding .tar shards
    single = parse_source(folder / "shard-000.tar")
    assert single.format == "wds" and single.shards == ()
    assert len(parse_source(spec).shards) == 2
    # A prefix forces the format: the same .tar-holding folder read as img2dataset files finds no pairs.
    assert parse_source(f"files:{folder}").format == "files"
    with pytest.raises(DataSourceError, match="no image–caption pairs"):
        ImageTextDataset([f"files:{folder}"], transform, tokenizer)
    # A JSONL file with a non-standard suffix, forced.
    make_source("jsonl", tmp_path / "j")
    renamed = tmp_path / "j" / "pairs.txt"
    (tmp_path / "j" / "pairs.jsonl").rename(renamed)
    with pytest.raises(DataSourceError, match="cannot tell the format"):
        parse_source(renamed)
    assert ImageTextDataset([f"jsonl:{renamed}"], transform, tokenizer).captions == CAPTIONS
    # Shards read back through the per-process handles after pickling (as spawn-started workers do).
    import pickle

    dataset = pickle.loads(pickle.dumps(ImageTextDataset([spec], transform, tokenizer)))
    assert torch.equal(dataset[4]["pixel_values"], reference[4])


def test_sources_concatenate_in_order_and_max_samples_stops_reading(tmp_path, transform, tokenizer, reference):
    specs = [make_source("csv", tmp_path / "c"), make_source("wds", tmp_path / "w"), make_source("hf", tmp_path / "h")]
    dataset = ImageTextDataset(specs, transform, tokenizer)
    assert len(dataset) == 15 and dataset.captions == CAPTIONS * 3
    assert dataset.locate(7) == (1, 2)
    assert dataset.image_location(7).endswith("shard-000.tar:000000002.png")
    assert torch.equal(dataset[12]["pixel_values"], reference[2])
    assert len(dataset.describe().splitlines()) == 3

    limited = ImageTextDataset(specs, transform, tokenizer, max_samples=7)
    assert limited.captions == CAPTIONS + CAPTIONS[:2]
    lines = limited.describe().splitlines()
    assert "5 pairs" in lines[0] and "2 pairs" in lines[1] and "max_samples=7" in lines[1]
    assert lines[2].startswith("hf") and "not read" in lines[2]
    with pytest.raises(IndexError):
        limited[7]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and transform


def test_tokenizer_matches_open_clip_and_keeps_end_token_when_truncating():
    tokenize = open_clip_tokenizer(context_length=12)
    ids = tokenize(["a photo of a cat", "one " * 40])
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    assert ids[:, 0].tolist() == [49406, 49406]
    # short caption: start, 5 words, end, then padding zeros
    assert ids[0, 6].item() == 49407 and ids[0, 7:].eq(0).all()
    assert ids[1, -1].item() == 49407 and (ids[1] == 49407).sum() == 1  # truncated, end token kept last
    assert torch.equal(open_clip_tokenizer()(["a photo of a cat"]), open_clip.tokenize(["a photo of a cat"]))
    long_clip = open_clip_tokenizer(context_length=248)(["word " * 300])
    assert long_clip.shape == (1, 248) and long_clip[0, -1].item() == 49407
    with pytest.raises(ValueError, match="context_length"):
        open_clip_tokenizer(1)


def test_transform_shape_and_normalisation():
    transform = clip_image_transform(IMAGE_SIZE)
    grey = transform(Image.new("L", (37, 23), 128))  # greyscale input is converted to RGB
    assert grey.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and grey.dtype == torch.float32
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    expected = ((128 / 255 - mean) / std)[:, None, None].expand_as(grey)
    torch.testing.assert_close(grey, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grey[:, 0, 0], (0.5 - mean) / std, rtol=0, atol=0.02)
    # shortest side resized, then center-cropped: a left/right split image keeps both halves
    halves = Image.new("RGB", (64, 32), (0, 0, 0))
    halves.paste((255, 255, 255), (32, 0, 64, 32))
    out = clip_image_transform(8)(halves)
    assert out.shape == (3, 8, 8)
    assert (out[:, :, 0] < 0).all() and (out[:, :, -1] > 0).all()


# --------------------------------------------------------------------------------------------------------------
# Bad images never stop a run


@pytest.fixture
def dataset_with_bad_images(tmp_path, transform, tokenizer):
    """10 pairs: JSONL (indices 0-4: 1 corrupt, 2 truncated, 3 missing) + WebDataset (5-9: 6 corrupt)."""
    spec = make_source("jsonl", tmp_path / "j")
    images = tmp_path / "j" / "images"
    (images / "img1.png").write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8,
                                                    generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    (images / "img2.png").write_bytes(_png_bytes(2)[:60])
    (images / "img3.png").unlink()
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as archive:
        for k in range(5):
            _add_member(archive, f"{k:05d}.jpg", b"not an image at all" if k == 1 else _png_bytes(k))
            _add_member(archive, f"{k:05d}.txt", CAPTIONS[k].encode())
    return ImageTextDataset([spec, shard], transform, tokenizer)


def test_bad_images_are_reported_not_raised(dataset_with_bad_images):
    dataset = dataset_with_bad_images
    samples = [dataset[i] for i in range(len(dataset))]
    bad = {s["index"]: s["error"] for s in samples if s["pixel_values"] is not None and s["error"]}
    assert not bad  # an error always comes with pixel_values None
    errors = {s["index"]: s["error"] for s in samples if s["pixel_values"] is None}
    assert sorted(errors) == [1, 2, 3, 6]
    assert errors[1].startswith("unreadable image: ") and "img1.png" in errors[1]
    assert errors[2].startswith("unreadable image: ") and "img2.png" in errors[2]
    assert errors[3].startswith("missing file: ") and "img3.png" in errors[3]
    assert errors[6].startswith("unreadable image: ") and "bad.tar:00001.jpg" in errors[6]
    assert all(s["input_ids"].shape == (20,) for s in samples)

    batch = collate_image_text(samples[:5])
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["input_ids"].shape == (2, 20) and batch["index"].tolist() == [0, 4]
    assert batch["num_skipped"] == 3 and [i for i, _ in batch["skipped"]] == [1, 2, 3]

    empty = collate_image_text([samples[1], samples[3]])
    assert empty["pixel_values"] is None and empty["input_ids"].shape == (0, 20) and empty["index"].numel() == 0
    assert empty["num_skipped"] == 2


def test_dataloader_with_workers_counts_every_bad_sample(dataset_with_bad_images):
    loader = DataLoader(dataset_with_bad_images, batch_size=3, num_workers=2, collate_fn=collate_image_text)
    kept, skipped = [], 0
    for batch in loader:
        skipped += batch["num_skipped"]
        kept += batch["index"].tolist()
        if batch["pixel_values"] is not None:
            assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == len(batch["index"])
    assert skipped == 4
    assert kept == [0, 4, 5, 7, 8, 9]


# --------------------------------------------------------------------------------------------------------------
# Bad sources fail at construction, naming the file


def test_broken_jsonl_line_names_file_and_line(tmp_path, transform, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2: not valid JSON"):
        ImageTextDataset([path], transform, tokenizer)
    path.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: missing 'caption'"):
        ImageTextDataset([path], transform, tokenizer)


def test_csv_without_caption_column(tmp_path, transform, tokenizer):
    path = tmp_path / "pairs.csv"
    path.write_text("image,text\na.png,hello\n")
    with pytest.raises(ValueError, match=r"pairs\.csv: no 'caption' column \(columns: image, text\)"):
        ImageTextDataset([path], transform, tokenizer)


def test_missing_and_empty_sources(tmp_path, transform, tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        ImageTextDataset([tmp_path / "nowhere.jsonl"], transform, tokenizer)
    good = make_source("jsonl", tmp_path / "good")
    for n in (1, 3):
        with tarfile.open(tmp_path / f"shards-{n:04d}.tar", "w") as archive:
            _add_member(archive, "0.png", _png_bytes(0))
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards not found \(first: \S*shards-0002\.tar\)"):  # checked before anything is read
        ImageTextDataset([good, str(tmp_path / "shards-{0001..0003}.tar")], transform, tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataSourceError, match=r"empty\.jsonl: no image–caption pairs"):
        ImageTextDataset([empty], transform, tokenizer)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataSourceError, match="empty_dir: no image–caption pairs"):
        ImageTextDataset([tmp_path / "empty_dir"], transform, tokenizer)
    with pytest.raises(ValueError, match="no data sources"):
        ImageTextDataset([], transform, tokenizer)


def test_malformed_sources_of_other_formats(tmp_path, transform, tokenizer):
    bad_llava = tmp_path / "bad.json"
    bad_llava.write_text(json.dumps([{"id": "q", "image": "a.png", "conversations": [{"from": "human",
                                                                                     "value": "hi"}]}]))
    with pytest.raises(DataSourceError, match=r"bad\.json, record 0 \(id q\): no 'gpt' turn"):
        ImageTextDataset([bad_llava], transform, tokenizer)
    gz = tmp_path / "shard.tar"
    with tarfile.open(gz, "w:gz") as archive:
        _add_member(archive, "0.txt", b"x")
    with pytest.raises(DataSourceError, match=r"shard\.tar: not an uncompressed tar"):
        ImageTextDataset([gz], transform, tokenizer)
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["x"]}))
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataSourceError, match=r"DatasetDict with splits \['train'\]"):
        ImageTextDataset([tmp_path / "dd"], transform, tokenizer)
    datasets.Dataset.from_dict({"image": ["a.png"], "label": [1]}).save_to_disk(str(tmp_path / "nocap"))
    with pytest.raises(DataSourceError, match=r"nocap: no 'caption \(or text\)' column"):
        ImageTextDataset([tmp_path / "nocap"], transform, tokenizer)


def test_hf_path_column_resolves_beside_the_dataset(tmp_path, transform, tokenizer, reference):
    names = _write_images(tmp_path / "images")
    names[4] = str((tmp_path / names[4]).resolve())  # absolute paths work too
    datasets.Dataset.from_dict({"image": names, "text": CAPTIONS}).save_to_disk(str(tmp_path / "saved"))
    dataset = ImageTextDataset([tmp_path / "saved"], transform, tokenizer)
    assert dataset.captions == CAPTIONS
    torch.testing.assert_close(torch.stack([dataset[i]["pixel_values"] for i in range(5)]), reference, rtol=0,
                               atol=0)


# --------------------------------------------------------------------------------------------------------------
# Decoded once: the in-memory pairs serve exactly the streaming dataset's items and batches


def test_decoded_pairs_reproduce_the_streaming_batches_exactly(dataset_with_bad_images, tmp_path, tokenizer):
    from clipmoe_vlm.data.decoded_pairs import DecodedPairs, fingerprint

    streaming = dataset_with_bad_images
    cache = tmp_path / "decoded"
    built = DecodedPairs.from_dataset(streaming, cache, progress=False)
    (cached_file,) = cache.glob("pairs-*.safetensors")
    loaded = DecodedPairs.from_dataset(streaming, cache, progress=False)  # from the cache file
    batches = [[7, 0, 3, 9], [2, 5, 1], [8, 4, 6]]
    for decoded in (built, loaded):
        for ids in batches:
            want = collate_image_text([streaming[i] for i in ids])
            got = collate_image_text([decoded[i] for i in ids])
            assert torch.equal(got["pixel_values"], want["pixel_values"])
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["index"], want["index"])
            # the same images named for the same reason (PIL's message may carry an object address)
            assert [(i, e.split(" (")[0]) for i, e in got["skipped"]] == [(i, e.split(" (")[0]) for i, e in
                                                                           want["skipped"]]
        loader = DataLoader(decoded, batch_sampler=batches, collate_fn=collate_image_text)
        assert [b["index"].tolist() for b in loader] == [[7, 0, 9], [5], [8, 4]]
    # the cache key follows the transform and the tokenizer: another image size or context is another file
    other = ImageTextDataset(streaming.sources[0].spec.spec, clip_image_transform(IMAGE_SIZE + 2), tokenizer)
    same_source = ImageTextDataset(streaming.sources[0].spec.spec, clip_image_transform(IMAGE_SIZE), tokenizer)
    assert fingerprint(other) != fingerprint(same_source)
    assert fingerprint(same_source) != fingerprint(
        ImageTextDataset(streaming.sources[0].spec.spec, clip_image_transform(IMAGE_SIZE), open_clip_tokenizer(24)))
    # a truncated cache file is rebuilt, not trusted
    cached_file.write_bytes(cached_file.read_bytes()[:100])
    rebuilt = DecodedPairs.from_dataset(streaming, cache, progress=False)
    assert torch.equal(rebuilt.pixel_values, built.pixel_values)
