"""Tokenizers built in code for the tiny pipelines: a CLIP byte-pair encoder and a T5 Unigram model.

Every lowercase letter and digit is a token, and each word of ``words`` is one token (one piece for
T5), so prompts made of those words tokenize as a real tokenizer would, with nothing downloaded.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_WORDS = ("a", "photo", "of", "digit", "in", "style", "the", "an", "image")


def write_clip_vocabulary(directory: str | Path, words: Sequence[str] = DEFAULT_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a small CLIP byte-pair tokenizer into ``directory``.

    Every lowercase ASCII letter and digit is a token (alone and as a word end, ``x</w>``), so any
    lowercase alphanumeric prompt tokenizes; each of ``words`` becomes a single token through a chain
    of merges.

    Args:
        directory: Where to write the two files (created if needed).
        words: Whole-word tokens (lowercase letters and digits).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in string.ascii_lowercase + string.digits:
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    for word in words:
        word = word.lower()
        if not word or not all(ch in string.ascii_lowercase + string.digits for ch in word):
            raise ValueError(f"Tiny-tokenizer words must be lowercase letters and digits; got {word!r}.")
        if len(word) == 1:
            continue
        # merge left to right: w0 w1 -> w0w1, w0w1 w2 -> w0w1w2, ..., last symbol carries </w>
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            rule = f"{current} {nxt}"
            if rule not in merges:
                merges.append(rule)
            current += nxt
            add(current)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_clip_tokenizer(words: Sequence[str] = DEFAULT_WORDS, max_length: int = 16):
    """A ``CLIPTokenizer`` over :func:`write_clip_vocabulary`'s vocabulary (written to a temporary folder)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="guda-tiny-tokenizer-") as tmp:
        write_clip_vocabulary(tmp, words)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def tiny_t5_tokenizer(words: Sequence[str] = DEFAULT_WORDS, max_length: int = 512):
    """A ``T5TokenizerFast`` whose Unigram vocabulary is built here, in code.

    As T5's own: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), word pieces that start with ``▁``, and
    ``</s>`` appended to every prompt. Each of ``words`` is one piece; every other lowercase word
    falls back to single letters and digits. No extra ids.

    Args:
        words: Whole-word pieces (lowercase letters and digits).
        max_length: The tokenizer's ``model_max_length``.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in words:
        if not word or not all(ch in string.ascii_lowercase + string.digits for ch in word):
            raise ValueError(f"Tiny-tokenizer words must be lowercase letters and digits; got {word!r}.")
        pieces.setdefault("▁" + word, -1.0)  # one whole word beats any spelling of it
    for ch in string.ascii_lowercase + string.digits:
        pieces.setdefault("▁" + ch, -4.0)
        pieces.setdefault(ch, -5.0)
    backend = Tokenizer(Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)])
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=max_length)
