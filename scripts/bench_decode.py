"""Prefill and decode throughput of random models (tiny and mid-size) on the default backend.

Prints a table: prefill tokens/s (prompt of --prompt tokens, batch --batch), decode tokens/s (median
``decode_step`` time over --steps steps, after a compiling warm-up, host round trip per token) and the decode
rate of ``generate`` (``steps_per_call`` rounds per device call, sampling included: the time of --steps new
tokens minus the time of one, both medians). Usage: python scripts/bench_decode.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import dsv4_jax as d
from dsv4_jax.generation import decode_step, prefill

MODELS = {
    "tiny": d.tiny(vocab_size=1024),
    "mid": d.tiny(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, head_dim=128, q_lora_rank=512,
                  o_groups=4, o_lora_rank=512, n_routed_experts=64, num_experts_per_tok=6,
                  moe_intermediate_size=512, sliding_window=128, hca_ratio=128, index_topk=128,
                  index_head_dim=128, index_n_heads=16, vocab_size=32768, num_hash_layers=3,
                  max_position_embeddings=65536),
}


def _block(x):
    return jax.block_until_ready(x)


def bench(name: str, config: d.Config, args) -> dict:
    model = d.random_model(config, seed=0, dtype=args.dtype)
    n_params = d.count_params(model.params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.prompt))
    max_len = args.prompt + args.steps + 1
    _block(prefill(model, tokens, max_len=max_len, chunk=args.chunk, last_only=True))  # compile
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        logits, cache = prefill(model, tokens, max_len=max_len, chunk=args.chunk, last_only=True)
        _block(logits)
        times.append(time.perf_counter() - t0)
    t_prefill = statistics.median(times)
    nxt = np.asarray(logits.argmax(-1))
    logits, cache = decode_step(model, nxt, cache)  # compile
    _block(logits)
    steps = []
    for _ in range(args.steps - 1):
        nxt = np.asarray(logits.argmax(-1))
        t0 = time.perf_counter()
        logits, cache = decode_step(model, nxt, cache)
        _block(logits)
        steps.append(time.perf_counter() - t0)
    t_step = statistics.median(steps)
    del cache
    prompts = [list(map(int, row)) for row in tokens]

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        d.generate(model, prompts, max_new_tokens=n, ignore_eos=True, max_len=max_len,
                   steps_per_call=args.steps_per_call)
        return time.perf_counter() - t0

    gen(args.steps), gen(1)  # compile
    t_full = statistics.median(gen(args.steps) for _ in range(args.repeats))
    t_one = statistics.median(gen(1) for _ in range(args.repeats))
    return {"model": name, "params": n_params, "prefill": args.batch * args.prompt / t_prefill,
            "decode": args.batch / t_step, "step_ms": 1e3 * t_step,
            "generate": args.batch * (args.steps - 1) / max(t_full - t_one, 1e-9)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps-per-call", type=int, default=8)
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"# {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, dtype {args.dtype}, batch {args.batch}, "
          f"prompt {args.prompt}")
    print(f"| model | parameters | prefill tokens/s | decode_step tokens/s | decode step (ms) | generate decode "
          f"tokens/s ({args.steps_per_call} per call) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, MODELS[name], args)
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['prefill']:.1f} | {r['decode']:.2f} | {r['step_ms']:.1f} "
              f"| {r['generate']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
