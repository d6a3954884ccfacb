"""Checkpoint load throughput: generate a multi-GB synthetic Format Q checkpoint (random weights in the stored
formats) in a temporary directory, then time ``load_model`` from the safetensors shards and from the orbax
cache, each with the files evicted from the page cache ("cold", ``posix_fadvise(DONTNEED)``) and again with
them cached ("warm"). Prints a table (GB = 1e9 bytes).

    python scripts/bench_load.py --layers 12        # about 3.3 GB
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

import dsv4_jax as d
from dsv4_jax.checkpoint import load_model, save_cache, save_checkpoint
from dsv4_jax.quant import Fp8Block, Mxfp4, Nvfp4
from dsv4_jax.weights import is_weight


def synthetic_model(config: d.Config, seed: int = 0) -> d.Model:
    """Random parameters in the stored formats, drawn with numpy (bytes with valid scales; JAX's counter-based
    generator is too slow on a CPU for gigabytes). The values are not a useful model, only valid data."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda k: d.init_params(config, k), jax.random.key(0))

    def u8(shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    def pow2(shape, dtype, lo, hi):  # exact powers of two 2^lo .. 2^hi
        return np.ldexp(np.float32(1), rng.integers(lo, hi + 1, shape)).astype(dtype)

    def leaf(x):
        if isinstance(x, Fp8Block):
            w = u8(x.weight.shape)
            w[(w & 0x7F) == 0x7F] = 0  # no NaN bytes
            return Fp8Block(
                w.view(ml_dtypes.float8_e4m3fn), pow2(x.scale.shape, ml_dtypes.float8_e8m0fnu, -12, -6)
            )
        if isinstance(x, Nvfp4):
            g = x.weight_scale_2.shape
            return Nvfp4(
                u8(x.weight.shape),
                pow2(x.weight_scale.shape, ml_dtypes.float8_e4m3fn, -2, 2),
                np.full(g, 1e-3, np.float32),
                np.ones(g, np.float32),
            )
        if isinstance(x, Mxfp4):
            return Mxfp4(u8(x.weight.shape), pow2(x.scale.shape, ml_dtypes.float8_e8m0fnu, -9, -7))
        if np.dtype(x.dtype) == np.int32:
            return rng.integers(0, config.n_routed_experts, x.shape, dtype=np.int32)
        return (0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)

    return d.Model(config, jax.tree.map(leaf, abstract, is_leaf=is_weight))


def _evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (clean pages only; fsync first)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _time_load(path: Path, cold: bool) -> float:
    if cold:
        _evict(path)
    gc.collect()
    t = time.perf_counter()
    model = load_model(path, progress=False)
    jax.block_until_ready(model.params)
    dt = time.perf_counter() - t
    del model
    gc.collect()
    return dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to create the temporary directory")
    args = ap.parse_args(argv)
    config = d.tiny(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        n_routed_experts=args.experts,
        num_experts_per_tok=6,
        moe_intermediate_size=args.inter,
        vocab_size=16384,
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model = synthetic_model(config)
        jax.block_until_ready(model.params)
        t_init = time.perf_counter() - t
        t = time.perf_counter()
        ckpt = save_checkpoint(model, tmp / "q", max_shard_bytes=1 << 30)
        t_save = time.perf_counter() - t
        t = time.perf_counter()
        cache = save_cache(model, tmp / "cache")
        t_cache = time.perf_counter() - t
        del model
        gc.collect()
        size_q, size_c = _size(ckpt), _size(cache)
        print(
            f"generated {size_q / 1e9:.2f} GB Format Q ({len(list(ckpt.glob('*.safetensors')))} shards) in "
            f"{t_init:.1f} s + written in {t_save:.1f} s ({size_q / 1e9 / t_save:.2f} GB/s); orbax cache "
            f"{size_c / 1e9:.2f} GB written in {t_cache:.1f} s"
        )
        rows = []
        for name, path, size in (("safetensors (Format Q)", ckpt, size_q), ("orbax cache", cache, size_c)):
            for state in ("cold", "warm"):
                times = [_time_load(path, state == "cold") for _ in range(args.repeats)]
                best = min(times)
                rows.append((name, state, size / 1e9, best, size / 1e9 / best))
    print()
    print(
        f"{platform.node()}: {os.cpu_count()} CPU cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), {config.num_hidden_layers} layers x "
        f"{config.n_routed_experts} experts"
    )
    print(f"| {'source':24} | page cache | GB    | best of {args.repeats} (s) | GB/s  |")
    print(f"|{'-' * 26}|------------|-------|---------------|-------|")
    for name, state, gb, sec, rate in rows:
        print(f"| {name:24} | {state:10} | {gb:5.2f} | {sec:13.2f} | {rate:5.2f} |")


if __name__ == "__main__":
    main()
