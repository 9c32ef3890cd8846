"""A CLIP tokenizer that needs no model hub: byte-level BPE with no merges.

Every UTF-8 byte is a token (plus its end-of-word form), so any prompt tokenizes, and the
files are the ones `CLIPTokenizer.from_pretrained(folder)` reads for a real model. Padded with
reserved tokens to CLIP's 49408 ids, it has the real vocabulary size and BOS/EOS ids, so a
text encoder of the published size fits it.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable unicode map, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_vocab(vocab_size: int | None = None) -> dict[str, int]:
    """256 byte tokens, their `</w>` forms, then BOS and EOS: 514 ids. With `vocab_size`,
    reserved tokens (never produced) fill the ids between, leaving BOS and EOS last as CLIP has them."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    if vocab_size is not None:
        if vocab_size < len(tokens) + 2:
            raise ValueError(f"vocab_size must be at least {len(tokens) + 2}, got {vocab_size}")
        tokens += [f"<|reserved_{i}|>" for i in range(vocab_size - len(tokens) - 2)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_byte_level_tokenizer(out_dir: str | Path, vocab_size: int | None = None) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and tokenizer_config.json, and load them back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(byte_level_vocab(vocab_size)))
    (out / "merges.txt").write_text("#version: 0.2\n")
    # Without model_max_length, padding="max_length" overflows (transformers 5).
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return CLIPTokenizer.from_pretrained(out)
