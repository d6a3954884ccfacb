"""Incremental decoding: ``prefill`` and ``decode_step`` over a ``Cache``, sampling, and ``generate``.

One jit-compiled step function serves prefill chunks and decode steps (``T = 1``); the cache is donated to it,
so a cache passed to ``prefill``'s result or to ``decode_step`` must not be reused afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import Cache, init_cache
from .config import Config
from .model import Model, _head, check_vocab, run_blocks, token_matrix
from .sampling import SamplingParams, _is_int, _sample, sample, sampling_args


def _step_fn(model: Model, cache: Cache, tokens: jax.Array, n: jax.Array, last_only: bool):
    """Run ``tokens [B, T]`` (``n[b]`` real ones per row) through the model, continuing ``cache``.
    Returns logits ``[B, T, V]`` (or ``[B, V]`` at each row's last real token) and the new cache."""
    p = model.params
    t = tokens.shape[1]
    streams, new = run_blocks(model, tokens, cache, n)
    h = streams[-1]
    if last_only:
        h = jnp.take_along_axis(h, jnp.clip(n - 1, 0, t - 1)[:, None, None, None], axis=1)
    logits = _head(model, h, p.hc_head_fn, p.hc_head_scale, p.hc_head_base, p.norm)
    if last_only:
        logits = logits[:, 0]
    return logits, new


_step = jax.jit(_step_fn, static_argnames=("last_only",), donate_argnames=("cache",))


def _as_tokens(model: Model, tokens, lengths: np.ndarray | None = None) -> np.ndarray:
    """Host int32 ``[batch, time]`` token ids, each in the model's vocabulary; with ``lengths [batch]`` only a
    row's first ``lengths[b]`` ids are checked and the padding after them becomes 0 (any id may pad)."""
    a = np.asarray(token_matrix(tokens))
    if lengths is not None:
        a = np.where(np.arange(a.shape[1])[None, :] < lengths[:, None], a, 0)
    check_vocab(model, a)
    return a.astype(np.int32)


def prefill(model: Model, tokens, *, max_len: int, lengths=None, chunk: int = 512,
            last_only: bool = False) -> tuple[jax.Array, Cache]:
    """Process prompts into a fresh cache of ``max_len`` tokens per sequence.

    ``tokens [B, T]`` holds the prompts left-aligned; ``lengths [B]`` (default ``T``) their lengths, so a batch
    may mix lengths (positions beyond a row's length are ignored, whatever ids they hold, and their logits are
    0). Long prompts are processed in chunks of ``chunk`` tokens (one compiled program per chunk shape).
    Returns float32 logits ``[B, T, V]`` (``[B, V]`` at each prompt's last token with ``last_only``) and the
    cache."""
    tokens = token_matrix(tokens)
    b, t = tokens.shape
    if lengths is not None and np.asarray(lengths).dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got {np.asarray(lengths).dtype}: {lengths!r}")
    lengths = np.full((b,), t, np.int64) if lengths is None else np.asarray(lengths, np.int64).reshape(-1)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have one entry per prompt ({b}), got shape {lengths.shape}")
    if t == 0 or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"every prompt needs between 1 and {t} tokens, got lengths {lengths.tolist()}")
    tokens = _as_tokens(model, tokens, lengths)
    if lengths.max() > max_len:
        raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit in a cache of max_len = {max_len}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cache = init_cache(model.config, b, max_len, model.dtype)
    c = min(chunk, t)
    padded = np.zeros((b, -(-t // c) * c), np.int32)
    padded[:, :t] = tokens
    outs, last = [], None
    for k in range(padded.shape[1] // c):
        n = np.clip(lengths - k * c, 0, c).astype(np.int32)
        logits, cache = _step(model, cache, jnp.asarray(padded[:, k * c:(k + 1) * c]), jnp.asarray(n), last_only)
        if last_only:
            last = logits if last is None else jnp.where(jnp.asarray(n > 0)[:, None], logits, last)
        else:
            outs.append(logits)
    if last_only:
        return last, cache
    logits = jnp.concatenate(outs, axis=1)[:, :t]
    return jnp.where(jnp.asarray(np.arange(t)[None] < lengths[:, None])[..., None], logits, 0.0), cache


DECODE_PAD = 16


def _decode_width(model: Model) -> int:
    """Tokens a decode step feeds the model per sequence (one real, the rest ignored). The exactness mode
    (float32) runs a decode step as a chunk of ``DECODE_PAD``: XLA:CPU compiles single-token programs with other
    vectorisation, hence other last bits, and the FP8/FP4 simulations would turn those into visible
    differences from the same token inside a prompt."""
    return DECODE_PAD if model.dtype == "float32" else 1


def decode_step(model: Model, tokens, cache: Cache, *, active=None) -> tuple[jax.Array, Cache]:
    """Append one token per sequence: ``tokens [B]`` (or ``[B, 1]``) -> logits ``[B, V]`` (or ``[B, 1, V]``)
    and the advanced cache. Rows where ``active`` (bool ``[B]``) is False do not advance. ``cache`` is
    consumed (donated)."""
    a = np.asarray(tokens)
    squeeze = a.ndim == 1
    a = token_matrix(a[:, None] if squeeze else a)
    if a.shape != (cache.batch, 1):
        raise ValueError(f"decode_step takes one token per sequence: shape ({cache.batch},) or ({cache.batch}, 1), "
                         f"got {np.asarray(tokens).shape}")
    if active is None:
        n = np.ones((cache.batch,), np.int32)
    else:
        act = np.asarray(active)
        if act.shape != (cache.batch,) or act.dtype != bool:
            raise ValueError(f"active must be {cache.batch} booleans (one per sequence), got "
                             f"{act.dtype} of shape {act.shape}")
        n = act.astype(np.int32)
    a = _as_tokens(model, a, n.astype(np.int64))  # an inactive row's token is ignored: any id may stand there
    pos = np.asarray(cache.pos)
    if (pos + n).max() > cache.max_len:
        raise ValueError(f"the cache is full: position {int(pos.max())} + 1 exceeds max_len = {cache.max_len}")
    a = np.repeat(a, _decode_width(model), axis=1)
    logits, cache = _step(model, cache, jnp.asarray(a), jnp.asarray(n), True)
    return (logits if squeeze else logits[:, None]), cache


@functools.partial(jax.jit, static_argnames=("size", "greedy"), donate_argnames=("cache",))
def _decode_chunk(model: Model, cache: Cache, tok: jax.Array, key: jax.Array, done: jax.Array, stop_ids: jax.Array,
                  count: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  use_top_p: jax.Array, size: int, greedy: bool):
    """Up to ``count <= size`` decoding rounds on the device, in one call: each round feeds ``tok [B]`` of the
    rows not ``done`` through the model (``decode_step``), splits ``key`` and samples the next tokens; a row
    that samples one of ``stop_ids`` is done from then on. Stops early once every row is done. Returns the
    tokens ``[size, B]`` (-1 where a row was done or the round did not run), the last tokens, the key, the
    done mask and the cache. The same rounds as ``decode_step`` + ``sample`` one at a time, so the same tokens;
    one dispatch of the parameter tree per ``size`` tokens instead of per token."""
    pad = _decode_width(model)

    def cond(c):
        i, _, _, _, done, _ = c
        return (i < count) & ~jnp.all(done)

    def body(c):
        i, cache, tok, key, done, out = c
        active = ~done
        tokens = jnp.repeat(jnp.where(active, tok, 0)[:, None], pad, axis=1)
        logits, cache = _step_fn(model, cache, tokens, active.astype(jnp.int32), True)
        key, sub = jax.random.split(key)
        nxt = _sample(logits, sub, temperature, top_k, top_p, use_top_p, greedy=greedy)
        out = out.at[i].set(jnp.where(active, nxt, -1))
        done = done | (active & jnp.isin(nxt, stop_ids))
        return i + 1, cache, jnp.where(active, nxt, tok), key, done, out

    out = jnp.full((size, tok.shape[0]), -1, jnp.int32)
    _, cache, tok, key, done, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, tok, key, done, out))
    return out, tok, key, done, cache


# ---------------------------------------------------------------------------------------------------------
# Generation


@dataclasses.dataclass
class _Stopper:
    """Per-sequence stop logic: stop token ids (EOS included unless disabled) and stop strings."""

    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    decode: object  # callable(list[int]) -> str, needed for stop strings

    def hit(self, generated: list[int]) -> bool:
        if generated and generated[-1] in self.stop_ids:
            return True
        if self.stop_strings:
            text = self.decode(generated)
            return any(s in text for s in self.stop_strings)
        return False


def check_context(prompt_tokens: int, max_new_tokens: int, config: Config) -> None:
    """Refuse a request whose prompt plus new tokens exceeds the model's context (``max_position_embeddings``)."""
    need = prompt_tokens + max_new_tokens
    if need > config.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
                         f"model's context of {config.max_position_embeddings} tokens")


def _prompt_ids(prompt, i: int) -> list[int]:
    """A prompt given as token ids: integers only (a float or a bool is refused, not truncated)."""
    bad = [x for x in prompt if not _is_int(x)]
    if bad:
        raise TypeError(f"prompt {i}: token ids must be integers, got {bad[0]!r}")
    return [int(x) for x in prompt]


def _prepare(model: Model, prompts, params: SamplingParams, tokenizer, max_len):
    params.validate()
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise TypeError("prompts must be a list of prompts (token-id lists or strings)")
    if not len(prompts):
        raise ValueError("no prompts given")
    if (any(isinstance(p, str) for p in prompts) or params.stop_strings) and tokenizer is None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    ids = [tokenizer.encode(p) if isinstance(p, str) else _prompt_ids(p, i) for i, p in enumerate(prompts)]
    if any(len(p) == 0 for p in ids):
        raise ValueError("empty prompt")
    longest = max(len(p) for p in ids)
    need = longest + params.max_new_tokens
    max_len = need if max_len is None else max_len
    if need > max_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) = {need} exceeds "
                         f"max_len = {max_len}")
    check_context(longest, params.max_new_tokens, model.config)
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        eos = model.config.eos_token_id
        stop_ids.update(eos if isinstance(eos, tuple) else (eos,))
    stopper = _Stopper(frozenset(stop_ids), tuple(params.stop_strings),
                       (lambda t: tokenizer.decode(t)) if tokenizer is not None else None)
    return ids, max_len, stopper


DECODE_CHUNK = 8
"""Decoding rounds per device call in ``generate`` (``steps_per_call``)."""


def generate_stream(model: Model, prompts, params: SamplingParams | None = None, *, tokenizer=None,
                    max_len: int | None = None, steps_per_call: int = DECODE_CHUNK,
                    **kwargs) -> Iterator[list[int | None]]:
    """Like ``generate`` but yields, for each decoding step, the new token of every prompt (``None`` for a
    prompt that has already stopped). Sampling options as in ``SamplingParams`` (or as keyword arguments).

    The first token comes right after the prompt's prefill; later ones are decoded ``steps_per_call`` at a
    time in one device call and yielded in a burst; the next call is queued before a burst is yielded. Stop
    tokens are checked on the device, stop strings here, so a sequence that hits a stop string may compute up
    to ``2 * steps_per_call - 1`` more tokens, which are dropped. ``steps_per_call=1`` yields after every
    step. The tokens do not depend on it."""
    if not _is_int(steps_per_call) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call!r}")
    steps_per_call = int(steps_per_call)
    params = dataclasses.replace(params or SamplingParams(), **kwargs)
    ids, max_len, stopper = _prepare(model, prompts, params, tokenizer, max_len)
    b = len(ids)
    tokens = np.zeros((b, max(len(p) for p in ids)), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    logits, cache = prefill(model, tokens, max_len=max_len, lengths=[len(p) for p in ids], last_only=True)
    key = jax.random.key(params.seed)
    done = np.zeros(b, bool)
    generated: list[list[int]] = [[] for _ in range(b)]

    def record(nxt: np.ndarray) -> list[int | None]:
        out: list[int | None] = []
        for i in range(b):
            if done[i]:
                out.append(None)
                continue
            generated[i].append(int(nxt[i]))
            out.append(int(nxt[i]))
            done[i] = stopper.hit(generated[i])
        return out

    key, sub = jax.random.split(key)
    nxt = np.asarray(sample(logits, sub, params))
    yield record(nxt)
    # Ids the model cannot sample never match; dropping them keeps the array int32. Padded with -1 (never
    # sampled) to a power of two of at least 8, so other stop tokens reuse the compiled decoding loop.
    ids = sorted(i for i in stopper.stop_ids if i < model.config.vocab_size)
    stop_ids = jnp.asarray(ids + [-1] * (max(8, 1 << max(len(ids) - 1, 0).bit_length()) - len(ids)), jnp.int32)
    *opts, greedy = sampling_args(params)
    state = (jnp.asarray(np.where(done, 0, nxt).astype(np.int32)), key, jnp.asarray(done))
    unlaunched = params.max_new_tokens - 1

    def launch():
        # The next call is queued before the tokens of the previous one are read, so that the host's dispatch
        # overlaps the device's work. It starts from the device's done mask and the host's as known now; a row
        # stopped by a stop string (seen here only) may run one more call, whose tokens are dropped.
        nonlocal cache, state, unlaunched
        tok, key, ddone = state
        count = min(steps_per_call, unlaunched)
        unlaunched -= count
        rounds, tok, key, ddone, cache = _decode_chunk(
            model, cache, tok, key, ddone | jnp.asarray(done), stop_ids, jnp.int32(count), *opts,
            size=steps_per_call, greedy=greedy)
        state = (tok, key, ddone)
        return rounds, count

    pending = launch() if unlaunched > 0 and not done.all() else None
    while pending is not None:
        rounds, count = pending
        pending = launch() if unlaunched > 0 and not done.all() else None
        for row in np.asarray(rounds)[:count]:
            if done.all():
                return
            yield record(row)


def generate(model: Model, prompts: Sequence, params: SamplingParams | None = None, *, tokenizer=None,
             max_len: int | None = None, steps_per_call: int = DECODE_CHUNK, **kwargs) -> list[list[int]]:
    """Sample continuations of ``prompts`` (token-id lists, or strings encoded with ``tokenizer``, by default the
    official V4 tokenizer). Returns the generated token ids of each prompt, stop token included.

    Options (``SamplingParams`` fields, also accepted as keyword arguments): ``max_new_tokens``,
    ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed``, ``stop_token_ids``, ``stop_strings``,
    ``ignore_eos``. The cache holds ``max_len`` tokens (default: longest prompt + max_new_tokens).
    ``steps_per_call``: decoding rounds per device call (see ``generate_stream``)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params, tokenizer=tokenizer, max_len=max_len,
                                steps_per_call=steps_per_call, **kwargs):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out
