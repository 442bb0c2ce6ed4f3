"""Tests for hdb_jax.sd.vocab: our own offline CLIP-style BPE vocabulary."""

import json

import pytest
from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from hdb_jax.sd.vocab import (
    BOS_TOKEN,
    EOS_TOKEN,
    PROMPT_WORDS,
    build_bpe,
    tiny_tokenizer,
    vocab_size,
    write_vocab,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def built():
    return build_bpe(PROMPT_WORDS)


def test_prompt_words_are_plain_lowercase_words():
    assert len(PROMPT_WORDS) == len(set(PROMPT_WORDS))
    assert len(PROMPT_WORDS) <= 250
    for word in PROMPT_WORDS:
        assert word.isascii() and word.isalpha() and word.islower(), word
    for word in ("sks", "v", "photo", "face", "van", "gogh", "closeup", "oil"):
        assert word in PROMPT_WORDS


def test_every_prompt_word_is_one_token(tokenizer, built):
    vocab, _ = built
    for word in PROMPT_WORDS:
        ids = tokenizer(word).input_ids
        assert ids == [tokenizer.bos_token_id, vocab[word + "</w>"], tokenizer.eos_token_id], word


def test_sentence_ids_and_padding(tokenizer, built):
    vocab, _ = built
    words = "a photo of sks face".split()
    ids = tokenizer("a photo of sks face").input_ids
    assert ids[0] == vocab[BOS_TOKEN] == tokenizer.bos_token_id
    assert ids[-1] == vocab[EOS_TOKEN] == tokenizer.eos_token_id
    assert ids[1:-1] == [vocab[w + "</w>"] for w in words]

    padded = tokenizer("a photo of sks face", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77
    assert padded[: len(ids)] == ids
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert set(padded[len(ids) :]) == {tokenizer.eos_token_id}
    # Uppercase and punctuation are normalised/split like CLIP does.
    assert tokenizer("A Photo, of SKS face.").input_ids[1:3] == ids[1:3]


def test_truncation_to_model_max_length(tokenizer):
    assert tokenizer.model_max_length == 77
    ids = tokenizer(" ".join(["face"] * 200), truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("text", ["zyxwv", "qqq jjj", "café"])
def test_unknown_words_fall_back_to_pieces(tokenizer, text):
    ids = tokenizer(text).input_ids
    inner = ids[1:-1]
    assert len(inner) > len(text.split())  # split into smaller pieces
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.unk_token_id not in inner
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_vocab_layout(built, tokenizer):
    vocab, merges = built
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n))
    byte_symbols = list(bytes_to_unicode().values())
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[:256] == byte_symbols
    assert by_id[256:512] == [s + "</w>" for s in byte_symbols]
    assert by_id[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert by_id[512:-2] == ["".join(p) for p in merges]  # no duplicates here
    assert n == 512 + len(merges) + 2 == vocab_size() == len(tokenizer)


def test_written_files(tmp_path, built):
    vocab_path, merges_path = write_vocab(tmp_path)
    assert json.loads(vocab_path.read_text(encoding="utf-8")) == built[0]
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split(" ")) for line in lines[1:]] == built[1]


def test_build_is_deterministic(built):
    assert build_bpe(PROMPT_WORDS) == built
    assert build_bpe(list(reversed(PROMPT_WORDS))) == built


def test_save_pretrained_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.model_max_length == 77
    assert loaded.pad_token == loaded.eos_token == loaded.unk_token == EOS_TOKEN
    assert loaded.bos_token == BOS_TOKEN
    texts = ["a photo of sks face", "an oil painting of sks person by van gogh", "zyxwv"]
    for text in texts:
        assert loaded(text, padding="max_length").input_ids == tokenizer(text, padding="max_length").input_ids
    # A second, explicitly-directed build gives the same ids too.
    again = tiny_tokenizer(tmp_path / "again")
    assert again(texts).input_ids == tokenizer(texts).input_ids


def test_hand_derived_tiny_case():
    # Words (frequency): "ab" x2, "abc" x1  ->  symbols (a, b</w>) x2, (a, b, c</w>) x1.
    # Step 1 pair counts: (a, b</w>)=2, (a, b)=1, (b, c</w>)=1  -> merge (a, b</w>).
    #   Words: (ab</w>) x2 [done], (a, b, c</w>).
    # Step 2 counts: (a, b)=1, (b, c</w>)=1, a tie; lexicographically ("a", "b") first.
    #   Words: (ab, c</w>).
    # Step 3 counts: (ab, c</w>)=1 -> merge; every word is now one token.
    vocab, merges = build_bpe(["ab", "ab", "abc"])
    assert merges == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]
    assert [t for t, i in vocab.items() if 512 <= i] == [
        "ab</w>",
        "ab",
        "abc</w>",
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    # num_merges caps training.
    assert build_bpe(["ab", "ab", "abc"], num_merges=1)[1] == merges[:1]
    # Already single tokens need no merges.
    assert build_bpe(["a", "v"])[1] == []


def test_frequency_changes_merge_order():
    # "ba" twice outweighs "ab" once, although ("a", "b</w>") sorts first.
    assert build_bpe(["ab", "ba", "ba"])[1] == [("b", "a</w>"), ("a", "b</w>")]


def test_non_ascii_words_use_byte_symbols():
    enc = bytes_to_unicode()
    vocab, merges = build_bpe(["é"])  # two UTF-8 bytes: 0xC3 0xA9
    assert merges == [(enc[0xC3], enc[0xA9] + "</w>")]
    assert enc[0xC3] + enc[0xA9] + "</w>" in vocab


@pytest.mark.parametrize("bad", ["", "two words"])
def test_rejects_bad_words(bad):
    with pytest.raises(ValueError):
        build_bpe([bad])
