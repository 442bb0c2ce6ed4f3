"""A tiny CLIP-style BPE vocabulary, built offline from our own prompt words.

Stable Diffusion's text encoder is driven by ``transformers.CLIPTokenizer``,
which needs a ``vocab.json`` and a ``merges.txt`` in CLIP's byte-level BPE
format.  The real files (49408 tokens) live on the Hugging Face hub; for the
tiny test/demo models we instead train a small BPE over the words our
prompts use, so that every word in :data:`PROMPT_WORDS` is a single token and
anything else still tokenizes (it falls back to smaller pieces, down to single
byte symbols).

CLIP's format, reproduced here:

* every word is mapped byte-by-byte through ``bytes_to_unicode`` and its last
  symbol carries the end-of-word suffix ``"</w>"``;
* the vocabulary is the 256 byte symbols, the same 256 with ``"</w>"``, then
  one entry per merge (the concatenated pair), then ``"<|startoftext|>"`` and
  ``"<|endoftext|>"``;
* ``merges.txt`` starts with a ``#version: 0.2`` header, then one
  space-separated pair per line, in rank order.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from hdb_jax.sd.hf import CLIPTokenizer, bytes_to_unicode
from hdb_jax.sd.prompt_words import PROMPT_WORDS

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"


def _word_symbols(word: str, byte_encoder: dict[int, str]) -> tuple[str, ...]:
    """Maps a word to its initial CLIP BPE symbols (bytes, last one with ``</w>``)."""
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + END_OF_WORD,)


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merges every non-overlapping occurrence of ``pair``, left to right."""
    first, second = pair
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_bpe(
    words: Iterable[str], num_merges: int | None = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains a CLIP-format byte-level BPE over a list of words.

    Each step merges the most frequent adjacent symbol pair over all words
    (a word repeated in ``words`` counts that many times); ties are broken by
    the lexicographically smallest pair, so the result is deterministic.
    Training stops when every word is a single token or after ``num_merges``.

    Args:
        words: Words to learn merges from (lowercase, no whitespace). Repeats
            act as frequency.
        num_merges: Optional cap on the number of merges learned.

    Returns:
        ``(vocab, merges)``: ``vocab`` maps token -> id with contiguous ids
        0..N-1 (512 byte symbols, then merges, then the BOS and EOS tokens);
        ``merges`` is the ordered list of merged pairs (rank = list index).

    Raises:
        ValueError: If a word is empty or contains whitespace.
    """
    byte_encoder = bytes_to_unicode()
    corpus: Counter[tuple[str, ...]] = Counter()
    for word in words:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"BPE words must be non-empty without whitespace: {word!r}")
        corpus[_word_symbols(word, byte_encoder)] += 1

    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += freq
        if not pair_counts:
            break  # every word is a single token
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in corpus.items():
            merged[_apply_merge(symbols, best) if best[0] in symbols else symbols] += freq
        corpus = merged

    base = list(byte_encoder.values())
    tokens = base + [s + END_OF_WORD for s in base] + ["".join(p) for p in merges]
    # Two merges may spell the same token: keep its first position only.
    ordered = [t for t in dict.fromkeys(tokens) if t not in (BOS_TOKEN, EOS_TOKEN)]
    vocab = {token: i for i, token in enumerate(ordered + [BOS_TOKEN, EOS_TOKEN])}
    return vocab, merges


def write_vocab(directory: str | Path, words: Iterable[str] = PROMPT_WORDS) -> tuple[Path, Path]:
    """Builds the BPE and writes ``vocab.json`` and ``merges.txt``.

    Args:
        directory: Output directory (created if missing).
        words: Words to train the BPE on.

    Returns:
        ``(vocab_path, merges_path)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe(words)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def tiny_tokenizer(directory: str | Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """Returns a ``CLIPTokenizer`` over our own :data:`PROMPT_WORDS` BPE.

    Special tokens follow SD 1.5: BOS ``<|startoftext|>``; EOS, pad and unk
    ``<|endoftext|>``. Store it in a model directory with
    ``tokenizer.save_pretrained(model_dir / "tokenizer")``.

    Args:
        directory: Where to write ``vocab.json``/``merges.txt``; a temporary
            directory (removed afterwards) if None. The tokenizer keeps its
            vocabulary in memory, so the files are not needed after loading.
        model_max_length: Maximum sequence length (CLIP uses 77).

    Returns:
        The tokenizer.
    """

    def load(target: Path) -> CLIPTokenizer:
        vocab_path, merges_path = write_vocab(target)
        return CLIPTokenizer(
            vocab_file=str(vocab_path),
            merges_file=str(merges_path),
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            model_max_length=model_max_length,
        )

    if directory is not None:
        return load(Path(directory))
    with tempfile.TemporaryDirectory(prefix="hdb_vocab_") as tmp:
        return load(Path(tmp))


def vocab_size(words: Iterable[str] = PROMPT_WORDS) -> int:
    """Returns the size of the vocabulary :func:`build_bpe` makes for ``words``.

    Args:
        words: Words to train the BPE on.

    Returns:
        Number of tokens, special tokens included.
    """
    return len(build_bpe(words)[0])
