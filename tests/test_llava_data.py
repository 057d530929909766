"""LLaVA-1.5 data layer: templates, local tokenizer, dataset, collator and sampler (CPU, no downloads)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers
from torch.utils.data import BatchSampler, DataLoader
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from clipmoe_vlm.data.conversation import TEMPLATES, Turn, get_template
from clipmoe_vlm.data.llava_batching import LlavaCollator, ModalityLengthGroupedSampler
from clipmoe_vlm.data.llava_dataset import LlavaDataset
from clipmoe_vlm.data.llava_images import expand_to_square
from clipmoe_vlm.data.llava_tokenize import IGNORE_INDEX
from clipmoe_vlm.data.tokenizer import build_local_tokenizer

NUM_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches, CLS dropped by vision_feature_select_strategy="default"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CLIP_MEAN_RGB = (122, 116, 104)  # int(255 * CLIP's image_mean), LLaVA's pad colour


def _corpus() -> list[str]:
    sentences = [
        SYSTEM,
        "USER: ASSISTANT: What shape is it? What colour is it? Describe the image. Name the shapes.",
        "a red circle. a blue square. a green triangle. red blue green circle square triangle",
        "one two three four five six seven eight nine ten words are many in this long answer",
    ]
    return sentences * 4


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def any_tokenizer(request) -> PreTrainedTokenizerFast:
    return build_local_tokenizer(_corpus(), vocab_size=400, pre_tokenizer=request.param, model_max_length=256)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_local_tokenizer(_corpus(), vocab_size=400, model_max_length=256)


@pytest.fixture(scope="module")
def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (40, 24), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(root / "blue.png")
    Image.new("L", (16, 16), 128).save(root / "grey.png")  # not RGB: must be converted
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def _sample(id_: str, turns: Sequence[str], image: str | None = "red.png") -> dict:
    conversations = [{"from": "human" if k % 2 == 0 else "gpt", "value": text} for k, text in enumerate(turns)]
    record = {"id": id_, "conversations": conversations}
    if image is not None:
        record["image"] = image
    return record


def _runs(ids: list[int], keep: list[bool]) -> list[list[int]]:
    """Maximal runs of consecutive ids where keep is True."""
    runs: list[list[int]] = []
    previous = False
    for token, flag in zip(ids, keep):
        if flag:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = flag
    return runs


def _dataset(records, tokenizer, template="vicuna_v1", image_root=None, processor=None, **kwargs) -> LlavaDataset:
    return LlavaDataset(
        records,
        tokenizer,
        template,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_root=image_root,
        image_processor=processor,
        **kwargs,
    )


# --------------------------------------------------------------------------- templates
def test_vicuna_v1_prompts_match_llava():
    template = get_template("vicuna_v1")
    turns = [Turn("human", "<image>\nWhat shape is it?"), Turn("gpt", "a red circle"), Turn("human", "What colour?")]
    assert template.generation_prompt(turns) == (
        SYSTEM + " USER: <image>\nWhat shape is it? ASSISTANT: a red circle</s>USER: What colour? ASSISTANT:"
    )
    assert template.render(turns[:2] + [Turn("human", "What colour?"), Turn("gpt", "red")]) == (
        SYSTEM + " USER: <image>\nWhat shape is it? ASSISTANT: a red circle</s>USER: What colour? ASSISTANT: red</s>"
    )
    assert get_template("plain").render([Turn("human", "<image>\nDescribe."), Turn("gpt", "a red circle")]) == (
        "<image>a red circle\n"
    )
    assert get_template("llava_v1").system == SYSTEM.replace("user", "human")


def test_template_registry_is_read_only_and_errors_list_names():
    with pytest.raises(ValueError, match=r"unknown conversation template 'vicuna'.*'plain'.*'vicuna_v1'"):
        get_template("vicuna")
    with pytest.raises(TypeError):
        TEMPLATES["mine"] = get_template("plain")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("vicuna_v1").system = "changed"  # type: ignore[misc]


def test_chat_template_matches_generation_prompt(tokenizer):
    template = get_template("vicuna_v1")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "What colour is it?"},
    ]
    turns = [
        Turn("human", "<image>\nWhat shape is it?"),
        Turn("gpt", "a red circle"),
        Turn("human", "What colour is it?"),
    ]
    prompt = template.generation_prompt(turns)
    rendered = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, chat_template=template.chat_template()
    )
    assert rendered == "<s>" + prompt
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, chat_template=template.chat_template()
    )["input_ids"]
    assert list(ids) == tokenizer(prompt).input_ids
    # A system message replaces the default system prompt.
    custom = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + messages[:1],
        add_generation_prompt=True,
        tokenize=False,
        chat_template=template.chat_template(),
    )
    assert custom == "<s>Be brief. USER: <image>\nWhat shape is it? ASSISTANT:"


# --------------------------------------------------------------------------- tokenizer
def test_local_tokenizer_is_llama_like_and_round_trips(any_tokenizer, tmp_path):
    tok = any_tokenizer
    ids = tok("a red circle</s>").input_ids
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[0]) == "<s>"
    assert ids[-1] == tok.eos_token_id and tok.eos_token == "</s>"
    assert tok("<image>", add_special_tokens=False).input_ids == [tok.image_token_id]
    assert tok.convert_ids_to_tokens(tok.image_token_id) == "<image>"
    assert len({tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id}) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "What shape is it? a blue square</s>"
    assert loaded(text).input_ids == tok(text).input_ids
    assert (loaded.pad_token_id, loaded.image_token_id, loaded.model_max_length) == (
        tok.pad_token_id,
        tok.image_token_id,
        256,
    )


# --------------------------------------------------------------------------- labels
def test_plain_labels_supervise_caption_and_newline_only(tokenizer, image_root, processor):
    records = [_sample("p", ["<image>\nDescribe the image.", "a red circle"])]
    sample = _dataset(records, tokenizer, "plain", image_root, processor)[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    image_id = tokenizer.image_token_id
    expected = (
        [tokenizer.bos_token_id]
        + [image_id] * NUM_IMAGE_TOKENS
        + tokenizer.encode("a red circle\n", add_special_tokens=False)
    )
    assert ids == expected
    assert labels[: 1 + NUM_IMAGE_TOKENS] == [IGNORE_INDEX] * (1 + NUM_IMAGE_TOKENS)
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == "a red circle\n"
    assert [label for label in labels if label != IGNORE_INDEX] == ids[1 + NUM_IMAGE_TOKENS :]


def test_vicuna_v1_labels_supervise_answers_and_eos(tokenizer, image_root, processor):
    # The placeholder sits at the end of the question; LLaVA moves it to the front of the turn.
    records = [_sample("v", ["What shape is it?\n<image>", "a red circle", "What colour is it?", "red"])]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    sample = dataset[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    image_id = tokenizer.image_token_id

    supervised = [tokenizer.decode(run) for run in _runs(ids, [label != IGNORE_INDEX for label in labels])]
    assert supervised == [" a red circle</s>", " red</s>"]
    masked_text = [
        tokenizer.decode(run)
        for run in _runs(ids, [label == IGNORE_INDEX and t != image_id for t, label in zip(ids, labels)])
    ]
    assert masked_text == [
        "<s>" + SYSTEM + " USER: ",
        "\nWhat shape is it? ASSISTANT:",
        "USER: What colour is it? ASSISTANT:",
    ]
    assert all(label == t for t, label in zip(ids, labels) if label != IGNORE_INDEX)
    assert labels[-1] == tokenizer.eos_token_id
    assert dataset.stats.as_dict()["tokenization_mismatch"] == 0


def test_vicuna_v1_labels_with_metaspace_tokenizer(image_root, processor):
    tok = build_local_tokenizer(_corpus(), vocab_size=400, pre_tokenizer="metaspace")
    records = [_sample("v", ["<image>\nWhat shape is it?", "a red circle", "What colour is it?", "red"])]
    dataset = _dataset(records, tok, "vicuna_v1", image_root, processor)
    sample = dataset[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    runs = _runs(ids, [label != IGNORE_INDEX for label in labels])
    # SentencePiece-style word markers: the space after "ASSISTANT:" belongs to the answer's first token.
    assert [tok.convert_ids_to_tokens(run) for run in runs] == [["▁a", "▁red", "▁circle", "</s>"], ["▁red", "</s>"]]
    assert [tok.decode(run).strip() for run in runs] == ["a red circle</s>", "red</s>"]
    assert dataset.stats.as_dict()["tokenization_mismatch"] == 0


def test_image_tokens_expanded_to_num_image_tokens(tokenizer, image_root, processor):
    records = [_sample("v", ["<image>\nWhat shape is it?", "a red circle"])]
    sample = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)[0]
    ids, labels = sample["input_ids"], sample["labels"]
    is_image = ids == tokenizer.image_token_id
    assert int(is_image.sum()) == NUM_IMAGE_TOKENS
    positions = is_image.nonzero().flatten()
    assert positions.tolist() == list(range(int(positions[0]), int(positions[0]) + NUM_IMAGE_TOKENS))
    assert bool((labels[is_image] == IGNORE_INDEX).all())
    assert sample["pixel_values"].shape == (3, 32, 32)


def test_missing_placeholder_is_added_and_counted_or_raises_in_strict_mode(tokenizer, image_root, processor):
    records = [_sample("n", ["What shape is it?", "a red circle"])]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    sample = dataset[0]
    assert int((sample["input_ids"] == tokenizer.image_token_id).sum()) == NUM_IMAGE_TOKENS
    assert tokenizer.decode(sample["input_ids"]).endswith(
        "USER: " + "<image>" * NUM_IMAGE_TOKENS + "\nWhat shape is it? ASSISTANT: a red circle</s>"
    )
    assert dataset.stats.as_dict()["image_placeholder_added"] == 1
    strict = _dataset(records, tokenizer, "vicuna_v1", image_root, processor, strict=True)
    with pytest.raises(ValueError, match=r"record 0 \(id='n'\).*without '<image>'"):
        strict[0]


def test_malformed_conversations_skipped_and_counted(tokenizer, image_root, processor):
    records = [
        _sample("two", ["<image>\nWhat shape is it? <image>", "a red circle"]),
        {"id": "order", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}] * 2},
        _sample("ok", ["<image>\nWhat shape is it?", "a blue square", "What colour is it?"], image="blue.png"),
    ]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    assert tokenizer.decode(dataset[0]["input_ids"]).endswith("ASSISTANT: a blue square</s>")
    counts = dataset.stats.as_dict()
    assert (counts["skipped.bad_image_placeholder"], counts["skipped.bad_conversation"]) == (1, 1)
    assert counts["trailing_turn_dropped"] == 1  # the unanswered "What colour is it?"
    strict = _dataset(records, tokenizer, "vicuna_v1", image_root, processor, strict=True)
    with pytest.raises(ValueError, match=r"record 1 \(id='order'\).*roles must alternate"):
        strict[1]


# --------------------------------------------------------------------------- truncation
def test_truncation_keeps_image_block_and_skip_policy_counts(tokenizer, image_root, processor):
    long_answer = " ".join(["one two three four five six seven eight nine ten"] * 6)
    records = [
        _sample("long", ["<image>\nDescribe the image.", long_answer]),
        _sample("short", ["<image>\nDescribe the image.", "a red circle"], image="blue.png"),
    ]
    full = _dataset(records, tokenizer, "plain", image_root, processor, model_max_length=256)[0]
    assert len(full["input_ids"]) > 40

    truncated_set = _dataset(records, tokenizer, "plain", image_root, processor, model_max_length=40)
    sample = truncated_set[0]
    assert len(sample["input_ids"]) == 40 == len(sample["labels"])
    assert sample["input_ids"].tolist() == full["input_ids"][:40].tolist()
    assert int((sample["input_ids"] == tokenizer.image_token_id).sum()) == NUM_IMAGE_TOKENS
    assert truncated_set.stats.as_dict()["truncated"] == 1

    skip_set = _dataset(records, tokenizer, "plain", image_root, processor, model_max_length=40, truncation="skip")
    replacement = skip_set[0]
    assert tokenizer.decode(replacement["input_ids"], skip_special_tokens=True) == "a red circle\n"
    assert skip_set.stats.as_dict()["skipped.too_long"] == 1

    # Under vicuna_v1 the system prompt precedes the image: a limit inside the image block cannot be truncated.
    prefix = len(tokenizer.encode(SYSTEM + " USER: ", add_special_tokens=False)) + 1
    cut_image = _dataset(records, tokenizer, "vicuna_v1", image_root, processor, model_max_length=prefix + 8)
    with pytest.raises(RuntimeError, match="consecutive unusable samples"):
        cut_image[0]
    assert cut_image.stats.as_dict()["skipped.too_long"] == 2
    assert cut_image.stats.as_dict()["truncated"] == 0


# --------------------------------------------------------------------------- images
def test_corrupt_and_missing_images_skipped_and_text_only_works(tokenizer, image_root, processor):
    records = [
        _sample("missing", ["<image>\nWhat shape is it?", "a red circle"], image="nowhere.png"),
        _sample("corrupt", ["<image>\nWhat shape is it?", "a red circle"], image="corrupt.png"),
        _sample("text", ["What colour is red?", "red"], image=None),
        _sample("grey", ["<image>\nWhat colour is it?", "a green triangle"], image="grey.png"),
    ]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    first = dataset[0]  # missing -> corrupt -> next image sample ("grey"), skipping the text-only one
    assert tokenizer.decode(first["input_ids"]).endswith("a green triangle</s>")
    assert first["pixel_values"].shape == (3, 32, 32)
    counts = dataset.stats.as_dict()
    assert (counts["skipped.missing_image"], counts["skipped.corrupt_image"], counts["samples"]) == (1, 1, 1)

    text_only = dataset[2]
    assert "pixel_values" not in text_only
    assert int((text_only["input_ids"] == tokenizer.image_token_id).sum()) == 0
    assert tokenizer.decode(text_only["input_ids"]) == "<s>" + SYSTEM + " USER: What colour is red? ASSISTANT: red</s>"

    batch = LlavaCollator(tokenizer.pad_token_id)([dataset[k] for k in range(4)])
    assert batch["input_ids"].shape[0] == 4  # batch size kept
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # three image items (two are replacements)


def test_stats_are_collected_from_dataloader_workers(tokenizer, image_root, processor):
    records = [
        _sample("missing", ["<image>\nWhat shape is it?", "a red circle"], image="nowhere.png"),
        _sample("ok", ["<image>\nWhat shape is it?", "a blue square"], image="blue.png"),
        _sample("text", ["What colour is red?", "red"], image=None),
        _sample("text2", ["What colour is blue?", "blue"], image=None),
    ]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=LlavaCollator(tokenizer.pad_token_id))
    assert len(list(loader)) == 4
    counts = dataset.stats.as_dict()
    assert (counts["samples"], counts["skipped.missing_image"]) == (4, 1)


def test_pad_to_square_uses_mean_colour(tokenizer, image_root, processor):
    padded = expand_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), CLIP_MEAN_RGB)
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == CLIP_MEAN_RGB and padded.getpixel((39, 39)) == CLIP_MEAN_RGB
    assert padded.getpixel((20, 20)) == (255, 0, 0)
    assert padded.getpixel((20, 9)) == CLIP_MEAN_RGB and padded.getpixel((20, 10)) == (255, 0, 0)

    raw = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_normalize=False
    )  # keeps pixel values in [0, 1] so colours can be read back
    Image.new("RGB", (32, 16), (255, 0, 0)).save(image_root / "wide.png")
    records = [_sample("w", ["<image>\nWhat shape is it?", "a red circle"], image="wide.png")]
    pixels = _dataset(records, tokenizer, "plain", image_root, raw, image_aspect_ratio="pad")[0]["pixel_values"]
    mean = torch.tensor(CLIP_MEAN_RGB, dtype=torch.float32) / 255
    torch.testing.assert_close(pixels[:, 2, 16], mean, atol=0.02, rtol=0)  # top band: background
    torch.testing.assert_close(pixels[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)
    cropped = _dataset(records, tokenizer, "plain", image_root, raw, image_aspect_ratio="square")[0]["pixel_values"]
    torch.testing.assert_close(cropped[:, 2, 16], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)


# --------------------------------------------------------------------------- tokenisation mismatch
def _trailing_space_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose words keep their trailing spaces: "ASSISTANT: a" != "ASSISTANT:" + " a"."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S+\s*"), behavior="isolated")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    template = get_template("vicuna_v1")
    corpus = [template.render([Turn("human", "<image>\nWhat shape is it?"), Turn("gpt", "a red circle")])] * 2
    backend.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def test_tokenization_mismatch_is_counted_and_handled_by_policy(image_root, processor):
    tok = _trailing_space_tokenizer()
    records = [_sample("m", ["<image>\nWhat shape is it?", "a red circle"])]

    masked = _dataset(records, tok, "vicuna_v1", image_root, processor, on_mismatch="mask")
    sample = masked[0]
    assert bool((sample["labels"] == IGNORE_INDEX).all())
    assert masked.stats.as_dict()["tokenization_mismatch"] == 1
    assert masked.stats.skipped == 0

    skipped = _dataset(records, tok, "vicuna_v1", image_root, processor, on_mismatch="skip")
    with pytest.raises(RuntimeError, match="tokenization_mismatch"):
        skipped[0]
    counts = skipped.stats.as_dict()
    assert (counts["tokenization_mismatch"], counts["skipped.tokenization_mismatch"]) == (1, 1)

    with pytest.raises(ValueError, match=r"record 0 \(id='m'\).*whole-sequence"):
        _dataset(records, tok, "vicuna_v1", image_root, processor, on_mismatch="raise")[0]

    # Control: under `plain` the only boundary follows the <image> special token, so the split is clean.
    plain = _dataset(records, tok, "plain", image_root, processor, on_mismatch="raise")
    plain_labels = plain[0]["labels"]
    assert plain.stats.as_dict()["tokenization_mismatch"] == 0
    assert int((plain_labels != IGNORE_INDEX).sum()) > 0


# --------------------------------------------------------------------------- sampler
def _mixed_lengths(n_image: int = 23, n_text: int = 17) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(1, 100, (n_image,), generator=generator).tolist()
    text = (-torch.randint(1, 100, (n_text,), generator=generator)).tolist()
    mixed = image + text
    order = torch.randperm(len(mixed), generator=generator).tolist()
    return [mixed[k] for k in order]


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def test_sampler_is_single_modality_length_grouped_and_deterministic():
    lengths = _mixed_lengths()
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
    batches = _batches(order, 4)
    mixed = [batch for batch in batches if len({lengths[k] > 0 for k in batch}) > 1]
    assert len(mixed) <= 1
    # Full megabatches (here one batch each) are sorted longest first.
    for batch in batches[: 23 // 4 + 17 // 4]:
        assert [abs(lengths[k]) for k in batch] == sorted((abs(lengths[k]) for k in batch), reverse=True)

    assert list(ModalityLengthGroupedSampler(lengths, batch_size=4, seed=3)) == order
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=4, seed=4)) != order
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order

    single = ModalityLengthGroupedSampler([5, 3, 9, 1, 7], batch_size=2, seed=0)
    assert sorted(single) == list(range(5))
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedSampler([1, 0, -2], batch_size=2)


def test_sampler_shards_over_ranks():
    lengths = _mixed_lengths(22, 18)  # 40 = 5 * (batch 4 * world 2)
    shards = [
        list(ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, rank=rank, seed=1)) for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(40))
    for shard in shards:
        assert sum(len({lengths[k] > 0 for k in batch}) > 1 for batch in _batches(shard, 4)) <= 1

    # Trainer mode (rank=None) + accelerate's batch sharding gives each rank the same shard.
    from accelerate.data_loader import BatchSamplerShard

    global_sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=1)
    for rank in (0, 1):
        sharded = BatchSamplerShard(
            BatchSampler(global_sampler, 4, drop_last=False), num_processes=2, process_index=rank
        )
        assert [k for batch in sharded for k in batch] == shards[rank]

    # Uneven size: padding keeps the ranks equal and covers everything; drop_last keeps them disjoint.
    uneven = _mixed_lengths(23, 20)
    padded = [list(ModalityLengthGroupedSampler(uneven, 4, world_size=2, rank=r)) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 24 and set(padded[0]) | set(padded[1]) == set(range(43))
    dropped = [list(ModalityLengthGroupedSampler(uneven, 4, world_size=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert len(dropped[0]) == len(dropped[1]) == 20 and not set(dropped[0]) & set(dropped[1])


def test_dataset_lengths_sign_encodes_modality(tokenizer, image_root, processor):
    records = [
        _sample("i", ["<image>\nWhat shape is it?", "a red circle"]),
        _sample("t", ["What colour is red?", "red"], image=None),
    ]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    assert dataset.modality_lengths == [8, -5]  # "<image>" counts as a word, as in LLaVA
    assert dataset.lengths == [8 + NUM_IMAGE_TOKENS, 5]


# --------------------------------------------------------------------------- collator + model
def test_collated_batch_runs_through_tiny_llava(tokenizer, image_root, processor):
    records = [
        _sample("a", ["<image>\nWhat shape is it?", "a red circle", "What colour is it?", "red"]),
        _sample("b", ["What colour is blue?", "blue"], image=None),
        _sample("c", ["<image>\nDescribe the image.", "a blue square"], image="blue.png"),
    ]
    dataset = _dataset(records, tokenizer, "vicuna_v1", image_root, processor)
    items = [dataset[k] for k in range(3)]
    batch = LlavaCollator(tokenizer.pad_token_id)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert bool((batch["input_ids"][short, min(lengths) :] == tokenizer.pad_token_id).all())
    assert bool((batch["labels"][short, min(lengths) :] == IGNORE_INDEX).all())
    assert int((batch["input_ids"] == tokenizer.image_token_id).sum()) == 2 * NUM_IMAGE_TOKENS

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()

    text_only = LlavaCollator(tokenizer.pad_token_id)([items[1]])
    assert "pixel_values" not in text_only
    assert torch.isfinite(model(**text_only).loss)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(tokenizer, image_root, processor, tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="absent.json"):
        LlavaDataset(missing, tokenizer, "plain", num_image_tokens=NUM_IMAGE_TOKENS)

    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    with pytest.raises(ValueError, match="broken.json"):
        LlavaDataset(broken, tokenizer, "plain", num_image_tokens=NUM_IMAGE_TOKENS)

    no_conversations = tmp_path / "keys.json"
    no_conversations.write_text(json.dumps([{"id": "x", "image": "red.png"}]))
    with pytest.raises(ValueError, match=r"keys.json: record 0: key 'conversations'"):
        LlavaDataset(no_conversations, tokenizer, "plain", num_image_tokens=NUM_IMAGE_TOKENS)

    good = tmp_path / "good.json"
    good.write_text(json.dumps([_sample("g", ["<image>\nDescribe the image.", "a red circle"])]))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        LlavaDataset(
            good,
            tokenizer,
            "plain",
            num_image_tokens=16,
            image_root=tmp_path / "no_such_folder",
            image_processor=processor,
        )
    with pytest.raises(ValueError, match="no image_root"):
        LlavaDataset(good, tokenizer, "plain", num_image_tokens=16, image_processor=processor)
    with pytest.raises(ValueError, match="unknown conversation template"):
        LlavaDataset(good, tokenizer, "chatml", num_image_tokens=16, image_root=image_root, image_processor=processor)

    jsonl = tmp_path / "good.jsonl"
    jsonl.write_text(json.dumps(_sample("j", ["What colour is red?", "red"], image=None)) + "\n")
    assert len(LlavaDataset(jsonl, tokenizer, "vicuna_v1", num_image_tokens=16)[0]["input_ids"]) > 0
    broken_line = tmp_path / "broken.jsonl"
    broken_line.write_text(jsonl.read_text() + "{oops\n")
    with pytest.raises(ValueError, match="broken.jsonl: line 2"):
        LlavaDataset(broken_line, tokenizer, "vicuna_v1", num_image_tokens=16)
