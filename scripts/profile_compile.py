"""Where the compile time of the model's programs goes, on the default backend.

Lowers and compiles one program of a random model (``forward`` over ``--tokens`` tokens, one ``prefill`` chunk
of ``--chunk`` tokens into a cache of ``--tokens``, or one ``decode_step``), with the GPU kernels or the pure-JAX
references, under JAX's profiler; then runs it a few times. Prints the lowering and compile times, the median
run time, and the host-side compiler events that took longest in total (XLA's passes, the modules it compiles
for autotuning, PTX to cubin, ...). Pass XLA flags through ``XLA_FLAGS`` (they apply to every program of the
process) or per program with ``--option name=value`` (XLA debug options, e.g. ``xla_gpu_autotune_level=0``).

Usage: python scripts/profile_compile.py [--program forward|prefill|decode] [--references] [--option k=v]...
                                         [--flash-layers N]
The default model is the GPU model tests' tiny configuration (``tests/test_model_gpu.py``) at 2304 tokens.
``--flash-layers N`` takes Flash's dimensions and the first ``N`` of its layers instead (43: the whole model)
with abstract parameters: the program is lowered and compiled, not run, so no weights are allocated.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

import dsv4_jax as d
from dsv4_jax import generation, kernels
from dsv4_jax import model as model_lib


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def program(model, which: str, tokens: int, chunk: int, batch: int, abstract: bool = False):
    """The jitted function, its arguments, and the arguments it takes once compiled (static ones dropped);
    ``abstract``: shapes only (``ShapeDtypeStruct``), nothing allocated."""
    c = model.config
    make = jax.eval_shape if abstract else lambda f: f()
    if which == "forward":
        args = (model, make(lambda: jnp.zeros((batch, tokens), jnp.int32)))
        return model_lib._forward, args, args
    cache = make(lambda: generation.init_cache(c, batch, tokens, model.dtype))
    t = chunk if which == "prefill" else 1
    args = (model, cache) + make(lambda: (jnp.zeros((batch, t), jnp.int32), jnp.full((batch,), t, jnp.int32)))
    return generation._step, args + (which == "decode",), args


def host_events(trace_dir: str, top: int) -> list[tuple[str, float, int]]:
    """``(name, total seconds, count)`` of the profile's host events, longest first."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return []
    agg: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith("$"):  # Python frames
                    continue
                a = agg[ev.name]
                a[0] += ev.duration_ns / 1e9
                a[1] += 1
    return sorted(((n, s, k) for n, (s, k) in agg.items()), key=lambda e: -e[1])[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--program", choices=("forward", "prefill", "decode"), default="forward")
    ap.add_argument("--references", action="store_true",
                    help="the pure-JAX references instead of the kernels")
    ap.add_argument("--tokens", type=int, default=2304,
                    help="forward: tokens; prefill and decode: cache length")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA compile option")
    ap.add_argument("--top", type=int, default=25, help="compiler events listed")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--flash-layers", type=int, default=0, metavar="N",
                    help="Flash's dimensions and its first N layers, abstract parameters (compile only)")
    args = ap.parse_args()
    options = {}
    for o in args.option:
        name, sep, value = o.partition("=")
        if not sep:
            ap.error(f"--option takes NAME=VALUE, got {o!r}")
        options[name] = _value(value)

    kernels.ENABLED = not args.references
    if args.flash_layers:
        n = args.flash_layers
        if not 1 <= n <= d.FLASH.num_hidden_layers:
            ap.error(f"--flash-layers takes 1 to {d.FLASH.num_hidden_layers}, got {n}")
        ratios = d.FLASH.compress_ratios
        config = dataclasses.replace(d.FLASH, num_hidden_layers=n,
                                     num_hash_layers=min(n, d.FLASH.num_hash_layers),
                                     compress_ratios=ratios[:n] + ratios[d.FLASH.num_hidden_layers:])
        model = jax.eval_shape(lambda: d.random_model(config, seed=0, kernel_layout=False))
        if kernels.use_kernel_layout(model.dtype):
            model = jax.eval_shape(kernels.prepare_weights, model)
        args.runs = 0
    else:
        config = d.tiny(hca_ratio=128, sliding_window=128, index_topk=64, vocab_size=1024,
                        max_position_embeddings=max(4096, args.tokens))
        model = d.random_model(config, seed=0)
    fn, call_args, run_args = program(model, args.program, args.tokens, args.chunk, args.batch,
                                      abstract=bool(args.flash_layers))

    t0 = time.perf_counter()
    lowered = fn.trace(*call_args).lower()
    t1 = time.perf_counter()
    trace_dir = tempfile.mkdtemp(prefix="dsv4_compile_")
    jax.profiler.start_trace(trace_dir)
    try:
        exe = lowered.compile(compiler_options=options or None)
    finally:
        jax.profiler.stop_trace()
    t2 = time.perf_counter()
    times = []
    for _ in range(args.runs):
        # a step's cache is donated: a fresh copy each run
        fresh = jax.block_until_ready(
            jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, run_args))
        s = time.perf_counter()
        jax.block_until_ready(exe(*fresh))
        times.append(time.perf_counter() - s)
    run = statistics.median(times[1:] if len(times) > 1 else times) if times else None

    chunk = f", chunk {args.chunk}" if args.program == "prefill" else ""
    path = "kernels" if kernels.attention_kernels(model.dtype) else "references"
    what = "Flash's dimensions" if args.flash_layers else "the tiny GPU-test model"
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.program} of {what} "
          f"({config.num_hidden_layers} layers), batch {args.batch}, {args.tokens} tokens{chunk}; {path}; "
          f"options {options or 'none'}\n")
    ran = f"run {1e3 * run:.2f} ms (median of {args.runs})" if times else "not run"
    print(f"lowering {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, {ran}\n")
    print("| compiler event (host) | total s | count |\n|---|---|---|")
    for name, secs, count in host_events(trace_dir, args.top):
        print(f"| {name[:100]} | {secs:.2f} | {count} |")
    print("\n(Totals add up over threads and nested events: an event's time includes the events inside "
          "it.)")


if __name__ == "__main__":
    main()
