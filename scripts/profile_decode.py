"""Where a decode step's time goes at DeepSeek-V4-Flash dimensions, one layer of each type.

Builds a random model with Flash's dimensions and three main layers (SWA, CSA, HCA; the first with hash
routing), prefills ``--context`` tokens per sequence, then times on the default device:

* the whole decode step (``decode_step``: embedding, 3 blocks, head) — wall-clock median, and on GPUs the
  summed CUPTI kernel time and kernel count of one step;
* each block alone (the same jitted block the step runs, its cache not donated), and the embedding + head;
* the bytes a step must read (every non-expert weight of a layer, the experts the batch routes to, the cache
  rows it attends to) and the floor they set at ``--bandwidth`` TB/s.

From the per-layer figures it prints an estimate of the full 43-layer Flash step (2 SWA + 21 CSA + 20 HCA
blocks + embedding and head) — an estimate, labelled so: the full model does not fit on one GPU.

Usage: python scripts/profile_decode.py [--context 16384] [--batch 1] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from cupti_timing import kernels_of_call

import dsv4_jax as d
from dsv4_jax import kernels
from dsv4_jax.generation import _decode_chunk, decode_step, prefill
from dsv4_jax.model import _embed, _head, block
from dsv4_jax.sampling import SamplingParams, sampling_args

LOOP = 8  # decoding rounds per call of the generate-loop measurement
LAYER_KINDS = {0: "SWA", 4: "CSA", 128: "HCA"}
FLASH_COUNTS = {"SWA": 2, "CSA": 21, "HCA": 20}


def flash_layers(ratios=(0, 4, 128), vocab: int | None = None, smoke: bool = False) -> d.Config:
    """Flash's dimensions (``smoke``: the tiny test dimensions) with the given main layers and one MTP layer."""
    f = d.tiny() if smoke else d.FLASH
    return dataclasses.replace(f, num_hidden_layers=len(ratios), compress_ratios=(*ratios, 0), num_hash_layers=1,
                               vocab_size=vocab or f.vocab_size)


def measure(fn, iters: int) -> dict:
    """Wall-clock median of ``fn()`` (blocked), and with CUPTI the kernels of one call."""
    jax.block_until_ready(fn())
    wall = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
    out = {"wall_ms": 1e3 * statistics.median(wall), "kernel_ms": float("nan"), "n_kernels": 0, "kernels": []}
    ks = kernels_of_call(fn)
    if ks is not None:
        out.update(kernel_ms=sum(ms for _, ms in ks), n_kernels=len(ks), kernels=ks)
    return out


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def layer_bytes(p, config: d.Config, batch: int) -> tuple[int, int]:
    """(non-expert weight bytes, bytes of the routed experts one decode step of ``batch`` tokens touches)."""
    e = p.ffn.experts
    per_expert = nbytes(e) / config.n_routed_experts
    touched = min(config.n_routed_experts, config.num_experts_per_tok * batch)
    return nbytes(p) - nbytes(e), int(per_expert * touched)


def cache_bytes(config: d.Config, ratio: int, ctx: int, batch: int) -> int:
    """Cache rows a decode step attends to (bf16): window + compressed rows (CSA: top-k rows + index rows)."""
    d_kv = config.head_dim
    rows = config.sliding_window * d_kv
    if ratio == 4:
        rows += min(config.index_topk, ctx // 4) * d_kv + (ctx // 4) * config.index_head_dim
    elif ratio:
        rows += (ctx // ratio) * d_kv
    return 2 * rows * batch


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=16384, help="cached tokens per sequence before the step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--top", type=int, default=12, help="kernels to list for the whole step")
    ap.add_argument("--bandwidth", type=float, default=4.3, help="TB/s for the byte floor (measured copy rate)")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary (default Flash's)")
    ap.add_argument("--dump", default=None, help="folder for the step's optimised HLO and its kernel list")
    ap.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                    help="shard the routed experts over the first N devices (kernel times then sum all devices)")
    ap.add_argument("--smoke", action="store_true", help="tiny dimensions (a quick check of the script on CPU)")
    args = ap.parse_args()
    config = flash_layers(vocab=args.vocab, smoke=args.smoke)
    b, ctx = args.batch, args.context
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, Flash dimensions, "
          f"layers SWA/CSA/HCA, batch {b}, context {ctx}, expert-parallel {args.expert_parallel}, kernels {'on' if kernels.attention_kernels('bfloat16') else 'off'}",
          flush=True)
    t0 = time.perf_counter()
    model = d.random_model(config, seed=0)
    model = dataclasses.replace(model, params=kernels.prepare_weights(model.params))
    if args.expert_parallel > 1:
        from jax.sharding import Mesh

        model = model.on_mesh(Mesh(np.array(jax.devices()[:args.expert_parallel]), ("expert",)))
    jax.block_until_ready(model.params)
    print(f"built {d.count_params(model.params) / 1e9:.2f} B parameters in {time.perf_counter() - t0:.0f} s", flush=True)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (b, ctx))
    t0 = time.perf_counter()
    logits, cache = prefill(model, tokens, max_len=ctx + 128, chunk=2048, last_only=True)
    jax.block_until_ready(logits)
    print(f"prefill {b}x{ctx} tokens: {time.perf_counter() - t0:.1f} s (compile included)", flush=True)

    # Whole decode step. decode_step donates its cache: keep feeding the new one (the position moves by one per
    # call, which does not change the work).
    state = {"cache": cache, "tok": np.asarray(logits.argmax(-1))}

    def step():
        lg, state["cache"] = decode_step(model, state["tok"], state["cache"])
        return lg

    whole = measure(step, args.iters)

    # The same step inside generate's device loop (greedy, LOOP rounds per call): the parameter tree is
    # dispatched once per call, so the wall time per token here is what `generate` gets.
    *opts, greedy = sampling_args(SamplingParams(temperature=0.0))
    no_stop = jnp.full((1,), -1, jnp.int32)

    def loop():
        out, _, _, _, state["cache"] = _decode_chunk(
            model, state["cache"], jnp.asarray(state["tok"], jnp.int32), jax.random.key(0), jnp.zeros((b,), bool),
            no_stop, jnp.int32(LOOP), *opts, size=LOOP, greedy=greedy)
        return out

    looped = measure(loop, max(2, args.iters // LOOP))
    cache = state["cache"]
    if args.dump:
        import os

        from dsv4_jax.generation import _step

        os.makedirs(args.dump, exist_ok=True)
        tok1 = jnp.asarray(state["tok"], jnp.int32)[:, None]
        hlo = _step.lower(model, cache, tok1, jnp.ones((b,), jnp.int32), True).compile().as_text()
        with open(os.path.join(args.dump, "decode_step_hlo.txt"), "w") as f:
            f.write(hlo)
        with open(os.path.join(args.dump, "decode_step_kernels.txt"), "w") as f:
            f.writelines(f"{name}\t{1e3 * ms:.2f}\n" for name, ms in whole["kernels"])

    # Each block alone, and embedding + head.
    n = jnp.ones((b,), jnp.int32)
    tok = jnp.asarray(state["tok"], jnp.int32)[:, None]
    h = _embed(model, tok)
    rows = []
    for layer, (p, lc) in enumerate(zip(model.params.layers, cache.layers)):
        f = jax.jit(functools.partial(block, layer=layer))
        r = measure(functools.partial(f, p, h, tok, lc, cache.pos, n, model=model), args.iters)
        ratio = config.compress_ratio(layer)
        wb, eb = layer_bytes(p, config, b)
        r.update(kind=LAYER_KINDS[ratio], bytes=wb + eb + cache_bytes(config, ratio, ctx, b), wbytes=wb, ebytes=eb)
        rows.append(r)
    pr = model.params
    head = jax.jit(lambda m, t: _head(m, _embed(m, t), m.params.hc_head_fn, m.params.hc_head_scale,
                                      m.params.hc_head_base, m.params.norm))
    hr = measure(lambda: head(model, tok), args.iters)
    hr.update(kind="embed+head", bytes=nbytes(pr.head) + b * config.hidden_size * 2)

    def floor(nb):
        return nb / (args.bandwidth * 1e12) * 1e6

    print("\n| part | wall (us) | kernels (us) | launches | bytes read (MB) | floor (us) | kernels / floor |")
    print("|---|---|---|---|---|---|---|")
    for r in [*rows, hr]:
        print(f"| {r['kind']} | {1e3 * r['wall_ms']:.0f} | {1e3 * r['kernel_ms']:.0f} | {r['n_kernels']} | "
              f"{r['bytes'] / 1e6:.1f} | {floor(r['bytes']):.1f} | {1e3 * r['kernel_ms'] / floor(r['bytes']):.1f} |")
    print(f"| whole step (3 blocks) | {1e3 * whole['wall_ms']:.0f} | {1e3 * whole['kernel_ms']:.0f} | "
          f"{whole['n_kernels']} | | | |")
    print(f"| whole step in generate's loop, per token ({LOOP} per call) | {1e3 * looped['wall_ms'] / LOOP:.0f} | "
          f"{1e3 * looped['kernel_ms'] / LOOP:.0f} | {looped['n_kernels'] / LOOP:.0f} | | | |")
    by = {r["kind"]: r for r in rows}
    est = {k: hr[k] + sum(FLASH_COUNTS[t] * by[t][k] for t in FLASH_COUNTS) for k in ("wall_ms", "kernel_ms",
                                                                                        "bytes")}
    print(f"\nEstimate for the 43-layer Flash step (2 SWA + 21 CSA + 20 HCA + embed/head, sum of the parts above): "
          f"wall {est['wall_ms']:.1f} ms ({b / est['wall_ms'] * 1e3:.1f} tokens/s), kernels {est['kernel_ms']:.1f} ms, "
          f"bytes {est['bytes'] / 1e9:.2f} GB, floor {floor(est['bytes']) / 1e3:.2f} ms")
    # In the loop, a block costs its kernels plus the gaps between them; scale the 43-layer kernel estimate by
    # the loop's wall/kernel ratio of this 3-block step (an extrapolation, labelled so).
    ratio = looped["wall_ms"] / looped["kernel_ms"] if looped["kernel_ms"] > 0 else float("nan")
    print(f"In generate's loop this 3-block step runs at {ratio:.2f}x its kernel time; the 43-layer step at the same "
          f"ratio: {est['kernel_ms'] * ratio:.1f} ms ({b / (est['kernel_ms'] * ratio) * 1e3:.1f} tokens/s)")
    if whole["kernels"]:
        tot = collections.defaultdict(lambda: [0, 0.0])
        for name, ms in whole["kernels"]:
            tot[name][0] += 1
            tot[name][1] += ms
        print(f"\nTop kernels of one whole step ({whole['n_kernels']} launches, {1e3 * whole['kernel_ms']:.0f} us):")
        print("| kernel | launches | us |")
        print("|---|---|---|")
        for name, (cnt, ms) in sorted(tot.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"| {name[:70]} | {cnt} | {1e3 * ms:.1f} |")


if __name__ == "__main__":
    main()
