"""Timings shared by the benchmark scripts. Kernel times through CUPTI (jaxlib's Mosaic-GPU extension): the
kernels a call launches, with their times, without the launch gaps between them; ``None`` where CUPTI is
unavailable (CPU, or a jaxlib without the extension), and the scripts then fall back to wall-clock times."""

from __future__ import annotations

import statistics
import time

import jax


def extension():
    """jaxlib's Mosaic-GPU extension (it carries the CUPTI hooks), or None."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax._src.lib import mosaic_gpu as mgl

        return mgl._mosaic_gpu_ext
    except Exception:  # noqa: BLE001
        return None


def _collected(ext) -> list[tuple[str, float]]:
    try:
        return ext._cupti_get_timings(True)
    except TypeError:  # older jaxlib: no "finalize" argument
        return ext._cupti_get_timings()


def kernels_of_call(fn, *args) -> list[tuple[str, float]] | None:
    """``[(kernel name, ms)]`` of one blocking call of ``fn(*args)`` (after a warm-up call)."""
    ext = extension()
    if ext is None:
        return None
    jax.block_until_ready(fn(*args))
    return _traced_call(ext, fn, args)


def _traced_call(ext, fn, args) -> list[tuple[str, float]]:
    ext._cupti_init()
    jax.block_until_ready(fn(*args))
    return _collected(ext)


def median_kernel_ms(fn, argsets, iters: int) -> float | None:
    """Median over ``iters`` calls (rotating over ``argsets``) of the summed kernel time of one call, ms; the
    mean per call where the number of launches varies between calls (XLA's sort, say)."""
    ext = extension()
    if ext is None:
        return None
    for a in argsets:
        jax.block_until_ready(fn(*a))
    ext._cupti_init()
    jax.block_until_ready(fn(*argsets[0]))
    per_call = len(_collected(ext))
    ext._cupti_init()
    jax.block_until_ready([fn(*argsets[(i + 1) % len(argsets)]) for i in range(iters)])
    t = _collected(ext)
    if per_call == 0 or len(t) != per_call * iters:
        return sum(ms for _, ms in t) / iters
    return statistics.median(sum(ms for _, ms in t[i * per_call:(i + 1) * per_call]) for i in range(iters))


def median_kernels_ms(fn, argsets, iters: int) -> list[tuple[str, float]] | None:
    """``[(kernel name, median ms)]`` of one call, in launch order: medians over ``iters`` calls (rotating over
    ``argsets``) of each launch; None without CUPTI or where the calls launch different kernels."""
    ext = extension()
    if ext is None:
        return None
    for a in argsets:
        jax.block_until_ready(fn(*a))
    calls = [_traced_call(ext, fn, argsets[i % len(argsets)]) for i in range(iters)]
    if any([n for n, _ in c] != [n for n, _ in calls[0]] for c in calls):
        return None
    return [(name, statistics.median(c[j][1] for c in calls)) for j, (name, _) in enumerate(calls[0])]


def median_wall_ms(fn, argsets, iters: int) -> float:
    """Median wall-clock time of ``iters`` blocking calls (rotating over ``argsets``, after a warm-up), ms."""
    for a in argsets:
        jax.block_until_ready(fn(*a))
    walls = []
    for i in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*argsets[i % len(argsets)]))
        walls.append((time.perf_counter() - t) * 1e3)
    return statistics.median(walls)
