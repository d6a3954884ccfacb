"""Incremental decoding (ARCHITECTURE.md §10) against the whole-sequence forward pass, sampling, and the
refusal of impossible requests."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.cache import init_cache
from dsv4_jax.generation import _decode_chunk, decode_step, generate, generate_stream, prefill
from dsv4_jax.sampling import filter_logits, sample, sampling_args

# CSA ratio 4, HCA ratio 16, window 8: 40+ tokens cross many CSA blocks, two HCA blocks and the window wrap.
C = d.tiny(hca_ratio=16, sliding_window=8, index_topk=5)
MODEL = d.random_model(C, seed=0, dtype="float32")
T = 44


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tokens_and_full():
    tokens = np.random.default_rng(1).integers(0, C.vocab_size, (2, T))
    return tokens, np.asarray(d.forward(MODEL, tokens))


@pytest.mark.parametrize("n0", [2, 15, 31])
def test_prefill_then_decode_equals_forward(tokens_and_full, n0):
    """prefill(n0) + decode to T equals forward(T) at every step, relative error < 1e-4: prompts shorter than
    one CSA block (2), crossing CSA/HCA boundaries (15 -> 16, 31 -> 32) and the window wrap-around."""
    tokens, full = tokens_and_full
    logits, cache = prefill(MODEL, tokens[:, :n0], max_len=T)
    assert logits.shape == (2, n0, C.vocab_size)
    assert _rel(logits, full[:, :n0]) < 1e-4
    for i in range(n0, T):
        step, cache = decode_step(MODEL, tokens[:, i], cache)
        assert step.shape == (2, C.vocab_size)
        assert _rel(step, full[:, i]) < 1e-4, i
    np.testing.assert_array_equal(np.asarray(cache.pos), [T, T])


def test_chunked_prefill_equals_forward(tokens_and_full):
    tokens, full = tokens_and_full
    logits, _ = prefill(MODEL, tokens, max_len=T, chunk=7)  # chunks end mid-block everywhere
    assert _rel(logits, full) < 1e-4


def test_batch_of_different_lengths(tokens_and_full):
    """Each row of a mixed-length batch decodes as if it were alone."""
    tokens, full = tokens_and_full
    lengths = np.array([5, 17])
    logits, cache = prefill(MODEL, tokens, max_len=T, lengths=lengths, last_only=True)
    assert _rel(logits[0], full[0, 4]) < 1e-4 and _rel(logits[1], full[1, 16]) < 1e-4
    for k in range(10):
        step, cache = decode_step(MODEL, tokens[np.arange(2), lengths + k], cache)
        for b in range(2):
            assert _rel(step[b], full[b, lengths[b] + k]) < 1e-4, (b, k)


def test_padding_after_a_prompt_may_hold_any_id(tokens_and_full):
    """Positions past a row's length are ignored whatever they hold (-1 or ids outside the vocabulary); ids
    inside a prompt are still checked."""
    tokens, _ = tokens_and_full
    lengths = np.array([5, 17])
    want, _ = prefill(MODEL, tokens, max_len=T, lengths=lengths, last_only=True)
    padded = np.array(tokens)
    padded[0, 5:] = -1
    padded[1, 17:] = C.vocab_size + 7
    got, _ = prefill(MODEL, padded, max_len=T, lengths=lengths, last_only=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    padded[1, 3] = -1
    with pytest.raises(ValueError, match="token ids must be in"):
        prefill(MODEL, padded, max_len=T, lengths=lengths)


def test_bf16_decode_tracks_prefill(tokens_and_full):
    """In bf16 the cached path follows the same computation: decode and a bf16 forward agree closely at
    most steps (routing/top-k flips allowed at a few)."""
    tokens, _ = tokens_and_full
    model = MODEL.with_dtype("bfloat16")
    full = np.asarray(d.forward(model, tokens[:1]))
    _, cache = prefill(model, tokens[:1, :20], max_len=T)
    errs = []
    for i in range(20, T):
        step, cache = decode_step(model, tokens[:1, i], cache)
        errs.append(_rel(step[0], full[0, i]))
    assert np.median(errs) < 0.05  # bf16 rounding of different kernel shapes, as in test_model


def test_second_request_is_independent():
    """A request after another one in the same process gives the same result as a fresh one: every request
    starts from a fresh cache (no stale compressor state, ARCHITECTURE.md §10.2)."""
    rng = np.random.default_rng(2)
    a, b = (list(rng.integers(0, C.vocab_size, n)) for n in (23, 3))
    first = generate(MODEL, [b], max_new_tokens=6)
    generate(MODEL, [a], max_new_tokens=6)
    assert generate(MODEL, [b], max_new_tokens=6) == first


def test_greedy_generation_follows_forward():
    """Each greedy token is the argmax of the forward pass over the prompt and the tokens before it: one forward
    over the whole sequence, teacher-forced (its logits at a position depend on no later token: test_model.py's
    causality test)."""
    prompt = list(np.random.default_rng(3).integers(0, C.vocab_size, 9))
    out = generate(MODEL, [prompt], max_new_tokens=8, ignore_eos=True)[0]
    assert len(out) == 8
    logits = np.asarray(d.forward(MODEL, np.array([prompt + out])))[0, len(prompt) - 1:-1]
    assert out == [int(i) for i in np.argmax(logits, axis=-1)]


def test_stops_on_eos_and_stop_tokens():
    prompt = list(np.random.default_rng(4).integers(0, C.vocab_size, 6))
    free = generate(MODEL, [prompt], max_new_tokens=10, ignore_eos=True)[0]
    stop = free[3]
    compiled = _decode_chunk._cache_size()
    cut = generate(MODEL, [prompt], max_new_tokens=10, ignore_eos=True, stop_token_ids=(stop,))[0]
    assert _decode_chunk._cache_size() == compiled  # other stop tokens reuse the compiled decoding loop
    assert cut == free[: free.index(stop) + 1]
    # A configuration with several end-of-sequence ids stops on any of them (and not with ignore_eos).
    eos_model = dataclasses.replace(MODEL, config=dataclasses.replace(C, eos_token_id=(C.vocab_size - 1, stop)))
    if C.vocab_size - 1 not in free:
        assert generate(eos_model, [prompt], max_new_tokens=10)[0] == cut
    assert generate(eos_model, [prompt], max_new_tokens=10, ignore_eos=True)[0] == free
    steps = list(generate_stream(MODEL, [prompt, prompt[:4]], max_new_tokens=5, ignore_eos=True))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)


def _one_step_at_a_time(model, prompts, n, stop_ids=(), **opts):
    """Independent of generate's device loop: prefill, then decode_step + sample once per token on the host,
    with the same key schedule (one split per sampled token)."""
    params = d.SamplingParams(max_new_tokens=n, **opts)
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    logits, cache = prefill(model, tokens, max_len=tokens.shape[1] + n, lengths=[len(p) for p in prompts],
                            last_only=True)
    key = jax.random.key(params.seed)
    done = np.zeros(len(prompts), bool)
    out = [[] for _ in prompts]
    for step in range(n):
        key, sub = jax.random.split(key)
        nxt = np.asarray(sample(logits, sub, params))
        for i in np.nonzero(~done)[0]:
            out[i].append(int(nxt[i]))
            done[i] = nxt[i] in stop_ids
        if done.all() or step == n - 1:
            return out
        logits, cache = decode_step(model, np.where(done, 0, nxt), cache, active=~done)


@pytest.mark.parametrize("opts", [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 11}])
def test_device_decode_loop_equals_one_step_at_a_time(opts):
    """generate decodes several rounds per device call: the same tokens as one host step at a time, whatever
    the rounds per call, with rows of different lengths and a stop token that ends one row mid-call."""
    rng = np.random.default_rng(12)
    prompts = [list(rng.integers(0, C.vocab_size, n)) for n in (7, 3)]
    free = _one_step_at_a_time(MODEL, prompts, 11, **opts)
    stop = free[1][4]
    want = _one_step_at_a_time(MODEL, prompts, 11, stop_ids=(stop,), **opts)
    assert len(want[1]) < 11
    for spc in ((1, np.int64(8)) if not opts else (3,)):  # a NumPy integer is an integer
        # An id beyond the vocabulary (and int32) never matches.
        got = generate(MODEL, prompts, max_new_tokens=11, ignore_eos=True, stop_token_ids=(stop, 2**40),
                       steps_per_call=spc, **opts)
        assert got == want, spc
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="steps_per_call"):
            generate(MODEL, prompts, max_new_tokens=2, steps_per_call=bad)


def test_sampling_filters():
    logits = jnp.asarray(np.random.default_rng(5).standard_normal((3, 50)), jnp.float32)
    k = np.asarray(filter_logits(logits, 1.0, 5, 1.0))
    assert (np.isfinite(k).sum(-1) == 5).all()
    p = np.asarray(filter_logits(logits, 1.0, 0, 0.5))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for r in range(3):
        kept = np.isfinite(p[r])
        assert probs[r][kept].sum() >= 0.5 and probs[r][kept].min() >= probs[r][~kept].max()
        assert probs[r][kept].sum() - probs[r][kept].min() < 0.5  # minimal set
    # top_k and top_p combined: top-p acts on what top-k leaves; top_k >= V and top_p just below 1 (1 in fp32)
    # behave as the options say, not as their int32 / fp32 images would.
    both = np.asarray(filter_logits(logits, 1.0, 5, 0.5))
    assert (np.isfinite(both) <= np.isfinite(k)).all() and (np.isfinite(both).sum(-1) >= 1).all()
    peaked = jnp.asarray([[0.0, -30.0, -30.0]], jnp.float32)
    assert np.isfinite(np.asarray(filter_logits(peaked, 1.0, 0, 1 - 1e-10))).tolist() == [[True, False, False]]
    assert np.isfinite(np.asarray(filter_logits(peaked, 1.0, 0, 1.0))).all()
    params = d.SamplingParams(temperature=1.0, top_k=2**40)
    assert np.isfinite(np.asarray(filter_logits(logits, 1.0, *sampling_args(params)[1:4]))).all()
    # A tiny temperature is the greedy limit (dividing the unshifted logits overflowed to +inf: token 0), and
    # shifting by the row maximum leaves ordinary temperatures' distributions as they were.
    row = jnp.asarray([[1.0, 5.0, 3.0, 4.9, -2.0]], jnp.float32)
    for t in (1e-3, 1e-30, 1e-39, 1e-44):
        draws = {int(sample(row, jax.random.key(i), d.SamplingParams(temperature=t))[0]) for i in range(20)}
        assert draws == {1}, t
    np.testing.assert_allclose(jax.nn.softmax(filter_logits(logits, 0.7, 0, 1.0)), jax.nn.softmax(logits / 0.7),
                               rtol=1e-5, atol=1e-7)
    # Sampling with a seed is reproducible and only draws allowed tokens.
    a = generate(MODEL, [[5, 6, 7]], max_new_tokens=6, temperature=1.0, top_k=3, seed=7, ignore_eos=True)
    b = generate(MODEL, [[5, 6, 7]], max_new_tokens=6, temperature=1.0, top_k=3, seed=7, ignore_eos=True)
    assert a == b
    # NumPy integers are integers.
    assert generate(MODEL, [[5, 6, 7]], max_new_tokens=np.int64(6), temperature=1.0, top_k=np.int32(3),
                    seed=np.int64(7), ignore_eos=True) == a


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10, "max_len": 12}, "exceeds max_len"),
    ({"max_new_tokens": 2000}, "context"),
    ({"stop_token_ids": 7}, "stop_token_ids"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"seed": 2**63, "temperature": 1.0}, "seed must fit in 64 bits"),
])
def test_bad_requests_are_refused_before_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(MODEL, [[1, 2, 3, 4, 5]], **kwargs)


def test_malformed_token_ids_are_refused():
    """Token ids and lengths that are not integers are refused, not truncated; an empty batch and an ``active``
    mask of the wrong shape are refused; an inactive row's token in ``decode_step`` may be any id (ignored, as
    prefill's padding)."""
    for prompt in ([5.7, 6], [True, 6], np.array([5.0, 6.0])):
        with pytest.raises(TypeError, match="prompt 0: token ids must be integers"):
            generate(MODEL, [prompt], max_new_tokens=2)
    with pytest.raises(TypeError, match="lengths must be integers"):
        prefill(MODEL, [[1, 2], [3, 4]], max_len=6, lengths=[1.7, 2])
    with pytest.raises(ValueError, match="at least one sequence"):
        d.forward(MODEL, np.zeros((0, 3), np.int32))
    _, cache = prefill(MODEL, [[1, 2], [3, 4]], max_len=6)
    with pytest.raises(ValueError, match="active must be 2 booleans"):
        decode_step(MODEL, [5, 6], cache, active=[True])
    with pytest.raises(ValueError, match="active must be 2 booleans"):
        decode_step(MODEL, [5, 6], cache, active=[1, 0])
    with pytest.raises(ValueError, match="token ids must be in"):
        decode_step(MODEL, [-1, 6], cache, active=[True, False])
    _, cache = decode_step(MODEL, [5, -1], cache, active=[True, False])
    assert np.asarray(cache.pos).tolist() == [3, 2]


def test_prompt_longer_than_cache_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        prefill(MODEL, np.ones((1, 10), np.int32), max_len=8)
    _, cache = prefill(MODEL, np.ones((1, 4), np.int32), max_len=5)
    _, cache = decode_step(MODEL, [3], cache)
    with pytest.raises(ValueError, match="cache is full"):
        decode_step(MODEL, [3], cache)


def test_cache_memory_for_flash_at_1m():
    """ARCHITECTURE.md §10.4: bytes per token of the bf16 reference layout at 1M context (6880 B/token)."""
    from dsv4_jax.cache import bytes_per_token

    assert bytes_per_token(d.FLASH) == 21 * (1024 + 256) / 4 + 20 * 1024 / 128
    shapes = jax.eval_shape(lambda: init_cache(d.FLASH, 1, 2**20, jnp.bfloat16))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    assert abs(total / 2**20 - 6880) / 6880 < 0.01  # rows dominate; window and state are constant


def test_cli_samples_and_refuses_bad_requests(tmp_path, capsys, monkeypatch):
    """`dsv4-jax sample` streams text from a checkpoint and prints the summary line; bad requests exit 2."""
    from dsv4_jax.__main__ import main

    ckpt = tmp_path / "ckpt"
    d.save_checkpoint(d.random_model(d.tiny(vocab_size=129280), seed=1), ckpt)
    assert main(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "--quiet", "--ignore-eos",
                 "--no-compile-cache"]) == 0
    err = capsys.readouterr().err
    assert "generated 3 tokens" in err and "time to first token" in err
    assert "no decode rate below" in err and "nan" not in err  # 3 tokens: too few for a rate without compilation
    assert main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--steps-per-call", "0"]) == 2
    assert "--steps-per-call" in capsys.readouterr().err
    # A request longer than the context is refused from config.json, before any weight is read.
    import dsv4_jax.checkpoint

    def no_loading(*a, **k):
        raise AssertionError("load_model was called")

    monkeypatch.setattr(dsv4_jax, "load_model", no_loading)
    monkeypatch.setattr(dsv4_jax.checkpoint, "load_model", no_loading)
    context = d.tiny(vocab_size=129280).max_position_embeddings
    assert main(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", str(context)]) == 2
    assert f"exceeds the model's context of {context} tokens" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_:  # argparse: chat options beside a raw prompt are refused
        main(["sample", "--prompt", "hi", "--thinking", "high"])
    assert exit_.value.code == 2 and "--prompt is sent as is" in capsys.readouterr().err
    # Past the first decoding call the summary has a decode rate (tokens after that call, whose time includes
    # its compilation).
    assert main(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "6", "--quiet", "--ignore-eos",
                 "--steps-per-call", "2", "--no-compile-cache"]) == 0
    summary = capsys.readouterr().err
    assert "generated 6 tokens" in summary and "decode nan" not in summary


def test_cli_keeps_compiled_programs_in_its_cache(tmp_path):
    """By default the command keeps its compiled programs in JAX's persistent cache under $DSV4_JAX_CACHE, so a
    second run does not compile them again (a separate process: the cache is process-wide configuration)."""
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    d.save_checkpoint(d.random_model(d.tiny(vocab_size=129280), seed=1), ckpt)
    env = dict(os.environ, DSV4_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-m", "dsv4_jax", "sample", "--checkpoint", str(ckpt), "--quiet",
                          "--max-new-tokens", "2", "--ignore-eos"], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    cached = list((tmp_path / "cache" / "jax-compilation").iterdir())
    assert len(cached) >= 2, cached  # at least the prefill and the decoding loop
