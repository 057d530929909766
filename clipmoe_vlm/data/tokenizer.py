"""Build a small Llama-like tokenizer locally, so tests and CPU runs need no download.

The tokenizer is a BPE model trained with the `tokenizers` library on a given
corpus (for example the Shapes world's captions and questions). Where it
matters for LLaVA it behaves like the Llama/Vicuna tokenizer:

* ``<s>`` (BOS) is prepended when ``add_special_tokens=True``; no EOS is appended;
* ``</s>`` (EOS), ``<unk>``, ``<pad>`` and ``<image>`` are special tokens, so the
  text ``"</s>"`` tokenises to the EOS id and ``"<image>"`` to one image id;
* ``tokenizer.image_token`` / ``tokenizer.image_token_id`` are set (transformers'
  LLaVA processor reads them);
* decoding round-trips words: the default byte-level pre-tokenizer is lossless,
  and the ``"metaspace"`` option mimics SentencePiece's ``"▁"`` word marker.

Special-token ids follow Llama: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2; then
``<pad>`` = 3 and ``<image>`` = 4. Unlike LLaVA's training script, which reuses
``<unk>`` as padding, padding gets its own token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_local_tokenizer"]

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IMAGE)
"""Special tokens in id order (ids 0..4)."""


def build_local_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    model_max_length: int = 2048,
    pre_tokenizer: Literal["byte_level", "metaspace"] = "byte_level",
    min_frequency: int = 1,
    extra_special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer on ``texts`` and wrap it as a transformers tokenizer.

    Args:
        texts: the training corpus (any iterable of strings; read once).
        vocab_size: target vocabulary size, special tokens and (for byte-level)
            the 256 byte symbols included. The result may be smaller if the
            corpus runs out of merges.
        model_max_length: stored on the tokenizer (the dataset's default limit).
        pre_tokenizer: ``"byte_level"`` (GPT-2 style, lossless, never emits
            ``<unk>``) or ``"metaspace"`` (SentencePiece/Llama style ``"▁"``
            word marker with a prefix space on the first word only; characters
            unseen in the corpus become ``<unk>``).
        min_frequency: minimum pair frequency for a merge.
        extra_special_tokens: more special tokens, given ids after ``<image>``.
        chat_template: optional Jinja chat template to store on the tokenizer,
            e.g. ``get_template("vicuna_v1").chat_template()``.

    Returns:
        A fast tokenizer (``padding_side="right"``) that saves with
        ``save_pretrained(folder)`` and loads back with
        ``AutoTokenizer.from_pretrained(folder)``.

    Raises:
        ValueError: on an unknown ``pre_tokenizer`` or a vocabulary too small
            to hold the special tokens (and, for byte-level, the 256 bytes).
    """
    specials = list(SPECIAL_TOKENS) + [token for token in extra_special_tokens if token not in SPECIAL_TOKENS]
    if pre_tokenizer == "byte_level":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        minimum = len(specials) + len(alphabet)
        backend = Tokenizer(models.BPE(unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    elif pre_tokenizer == "metaspace":
        alphabet = []
        minimum = len(specials) + 1
        backend = Tokenizer(models.BPE(unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        raise ValueError(f"pre_tokenizer must be 'byte_level' or 'metaspace', got {pre_tokenizer!r}")
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for pre_tokenizer={pre_tokenizer!r}; need >= {minimum}")

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        image_token=IMAGE,
        extra_special_tokens=[token for token in specials if token not in SPECIAL_TOKENS] or None,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
