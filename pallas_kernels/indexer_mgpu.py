"""Lightning Indexer scoring for Hopper in Mosaic GPU (``plgpu``), for prefill: the second backend beside the
Pallas-Triton scoring of :mod:`pallas_kernels.indexer_topk`, with the same contract and reference
(:func:`~.indexer_topk.index_scores_reference`). Decode keeps the Triton kernel: one token's scoring reads each
index row once and is bound by memory (89 % of the read ceiling at batch 32, BENCHMARKS.md).

Why a second kernel: the Triton scoring reaches about half the bf16 matmul rate in prefill (464 TFLOP/s at 32K,
BENCHMARKS.md, session 6). Here a program takes ``GROUP = 4`` tokens, whose ``4 x 64`` heads are wgmma's N of
256, and walks the index rows in ``bk = 64``-row steps (wgmma's M): ``S = K Q^T`` is ``[64 rows, 256]``, so a
row's weighted head sum is a sum over columns inside each thread and its quad, as in the Triton kernel.

* two warpgroups each take every other step with their own accumulator (``64 x 256`` fp32, 128 registers a
  thread), so one's head sums run on the CUDA cores while the other's product runs on the tensor cores;
* the key tiles stream through ``stages`` shared-memory slots with TMA; a warpgroup owns the slots of its
  parity and refills a slot with the step ``stages`` later as soon as its product has read it;
* the scores leave as ``[4 tokens, 64 rows]`` bf16 tiles through two shared-memory buffers a warpgroup.

``index_select`` takes it for prefill chunks on Hopper (:func:`use`, :data:`ON_BY_DEFAULT`; ``mgpu=False`` asks
for the Triton scoring). On the H200 it runs at 71 % of the bf16 matmul rate at 32K tokens (Triton: 51 %) and
made the CSA layer's 128K prefill 130.9 ms against 153.0 (BENCHMARKS.md, session 15);
``scripts/bench_attention.py`` times the Triton scoring beside it.

A program scores only the rows its last token may see: past them nothing is written. :func:`index_scores_mgpu`
(the contract) sets those columns to -inf afterwards; :func:`index_select` hands the raw scores to the top-k,
which never reads a row's columns past its eligible count.

The GPU interpreter (``interpret=True``, CPU tests) runs no wgmma in a kernel of several warpgroups: there the
product is ``jnp.dot`` of the same shared-memory tiles (the copies, barriers, head sums and stores are the
kernel's). XLA's CPU thread pool must hold both warpgroups at once (at least 2 threads).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from .fp8_matmul_mgpu import available, smem_transforms

HEADS = 64
"""Indexer heads the kernel takes (Flash's ``H_I``)."""
GROUP = 4
"""Tokens a program: ``GROUP x HEADS = 256`` columns, wgmma's largest N."""
WARPGROUPS = 2
SMEM_BYTES = 227 << 10
MOSAIC_RESERVED = 5 << 10


@dataclasses.dataclass(frozen=True)
class MgpuIndexConfig:
    """``bk`` index rows a step (wgmma's M: 64), ``stages`` key slots (even: each warpgroup owns those of its
    parity), ``nk`` steps a program (0: all the rows its tokens may see; else the rows split over programs)."""

    bk: int = 64
    stages: int = 4
    nk: int = 0


def smem_bytes(d: int, cfg: MgpuIndexConfig) -> int:
    """The queries (``256 x d``), the key slots, the head weights, the output buffers, the meta row, Mosaic's."""
    return (GROUP * HEADS * d * 2 + cfg.stages * cfg.bk * d * 2 + GROUP * HEADS * 4
            + WARPGROUPS * 2 * GROUP * cfg.bk * 2 + 16 + MOSAIC_RESERVED)


def supported(h: int, d: int, cfg: MgpuIndexConfig | None = None) -> bool:
    """64 heads, ``d`` a multiple of 64 (whole 128-byte swizzled tiles) up to 256, an even number of slots."""
    cfg = cfg or MgpuIndexConfig()
    return (h == HEADS and d % 64 == 0 and 64 <= d <= 256 and cfg.bk == 64 and cfg.stages >= 2
            and cfg.stages % 2 == 0 and cfg.nk >= 0 and smem_bytes(d, cfg) <= SMEM_BYTES)


def default_config(d: int) -> MgpuIndexConfig:
    """The most key slots (of 2, 4) that fit beside the queries; all the visible rows a program."""
    return MgpuIndexConfig(stages=4 if smem_bytes(d, MgpuIndexConfig(stages=4)) <= SMEM_BYTES else 2)


ON_BY_DEFAULT = True
"""Whether :func:`use` lets ``index_select`` take this kernel without being asked (``mgpu=True``). On since it
measured faster than the Triton scoring on the H200 at every prefill length timed (BENCHMARKS.md, session 15:
the CSA layer's 128K prefill 130.9 against 153.0 ms); set False to score with the Triton kernel everywhere."""


def use(t: int, h: int, d: int, interpret: bool = False) -> bool:
    """Whether :func:`pallas_kernels.indexer_topk.index_select` scores with this kernel by default: where
    :data:`ON_BY_DEFAULT`, for prefill chunks (16 tokens or more) of the shapes it takes, on a Hopper GPU."""
    return ON_BY_DEFAULT and not interpret and t >= 16 and supported(h, d) and available()


def _kernel(meta_g, q_g, w_g, k_g, o_g, scoped, *, t: int, r: int, ratio: int, cfg: MgpuIndexConfig, d: int,
            interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bk, stages = cfg.bk, cfg.stages
    (meta_s, q_s, w_s, k_s, o_s), (bars, k_bar) = scoped
    s, b, g = lax.axis_index("s"), lax.axis_index("b"), lax.axis_index("g")
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _first_copies():
        plgpu.copy_gmem_to_smem(meta_g.at[pl.ds(b, 1)], meta_s, bars.at[0])
        plgpu.copy_gmem_to_smem(q_g.at[b, pl.ds(pl.multiple_of(g * GROUP * HEADS, 256), GROUP * HEADS)], q_s,
                                bars.at[1])
        plgpu.copy_gmem_to_smem(w_g.at[b, pl.ds(pl.multiple_of(g * GROUP, GROUP), GROUP)], w_s, bars.at[2])

    plgpu.barrier_wait(bars.at[0])
    pos0 = meta_s[0, 0]
    last = jnp.minimum(g * GROUP + GROUP - 1, t - 1)  # the group's last real token sees the most rows
    lim = jnp.minimum(lax.div(pos0 + last + 1, jnp.int32(ratio)), r)
    blocks = lax.div(lim + bk - 1, jnp.int32(bk))
    j0 = s * cfg.nk if cfg.nk else 0
    n = jnp.maximum(jnp.minimum(blocks - j0, cfg.nk) if cfg.nk else blocks, 0)

    def issue(i):
        slot = lax.rem(i, jnp.int32(stages))
        start = pl.multiple_of((j0 + i) * bk, bk)
        plgpu.copy_gmem_to_smem(k_g.at[b, pl.ds(start, bk)], k_s.at[slot], k_bar.at[slot])

    for i0 in range(0, stages, WARPGROUPS):  # this warpgroup's first slots
        i = i0 + wg
        pl.when(i < n)(functools.partial(issue, i))
    plgpu.barrier_wait(bars.at[1])
    plgpu.barrier_wait(bars.at[2])
    col = plgpu.Layout.WGMMA.reduce(0)
    ws = [lax.broadcast_in_dim(plgpu.load(w_s.at[j], layout=col), (bk, HEADS), [1]) for j in range(GROUP)]

    def step(u, carry):
        i = 2 * u + wg
        slot, buf = lax.rem(i, jnp.int32(stages)), lax.rem(u, jnp.int32(2))
        plgpu.barrier_wait(k_bar.at[slot])
        if interpret:
            acc = jnp.dot(k_s.at[slot][...], q_s[...].T, preferred_element_type=jnp.float32)
        else:
            def qk(acc_ref):
                plgpu.wgmma(acc_ref, k_s.at[slot], q_s.T)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            acc = pl.run_scoped(qk, plgpu.ACC((bk, GROUP * HEADS), jnp.float32))
        pl.when(i + stages < n)(functools.partial(issue, i + stages))  # the product has read the slot
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this buffer's store of two steps ago has read it
        out = o_s.at[wg, buf]
        for j in range(GROUP):
            a = acc[:, j * HEADS:(j + 1) * HEADS]
            out.at[j][...] = jnp.sum(jnp.maximum(a, 0.0) * ws[j], axis=1).astype(jnp.bfloat16)
        plgpu.commit_smem()
        start = pl.multiple_of((j0 + i) * bk, bk)
        plgpu.copy_smem_to_gmem(out, o_g.at[b, pl.ds(pl.multiple_of(g * GROUP, GROUP), GROUP), pl.ds(start, bk)])
        return carry

    lax.fori_loop(0, lax.div(n - wg + 1, jnp.int32(2)), step, 0)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("ratio", "cfg", "interpret"))
def index_scores_raw(q: jax.Array, w: jax.Array, keys: jax.Array, pos0: jax.Array, *, ratio: int,
                     cfg: MgpuIndexConfig, interpret: bool = False) -> jax.Array:
    """The kernel's output: ``[B, Tp, Rp]`` bf16 (``T`` and ``R`` padded to multiples of 4 and 64), token ``t``'s
    scores valid in the columns before ``min((pos0 + t + 1) // ratio, R)``; nothing is written past them."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, t, h, d = q.shape
    r = keys.shape[1]
    tp, rp = -(-t // GROUP) * GROUP, max(1, -(-r // cfg.bk)) * cfg.bk
    q = jnp.pad(q.astype(jnp.bfloat16), ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp * h, d)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, tp - t), (0, 0)))
    keys = jnp.pad(keys.astype(jnp.bfloat16), ((0, 0), (0, rp - r), (0, 0)))
    meta = jnp.zeros((b, 4), jnp.int32).at[:, 0].set(pos0.astype(jnp.int32))
    splits = -(-(rp // cfg.bk) // cfg.nk) if cfg.nk else 1
    kernel = functools.partial(_kernel, t=t, r=r, ratio=ratio, cfg=cfg, d=d, interpret=interpret)
    tiles = smem_transforms(d, 16)

    def entry(meta_g, q_g, w_g, k_g, o_g):
        scratch = [plgpu.SMEM((1, 4), jnp.int32),
                   plgpu.SMEM((GROUP * HEADS, d), jnp.bfloat16, transforms=tiles),
                   plgpu.SMEM((GROUP, HEADS), jnp.float32),
                   plgpu.SMEM((cfg.stages, cfg.bk, d), jnp.bfloat16, transforms=tiles),
                   plgpu.SMEM((WARPGROUPS, 2, GROUP, cfg.bk), jnp.bfloat16)]
        barriers = (plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=cfg.stages))
        pl.run_scoped(lambda *a: kernel(meta_g, q_g, w_g, k_g, o_g, a), scratch, barriers, collective_axes="wg")

    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((b, tp, rp), jnp.bfloat16),
        grid=(splits, b, tp // GROUP), grid_names=("s", "b", "g"), num_threads=WARPGROUPS, thread_name="wg",
        **kw,
    )(meta, q, w.reshape(b, tp, h), keys)


def _check(q: jax.Array, cfg: MgpuIndexConfig, interpret: bool) -> None:
    _, _, h, d = q.shape
    if not supported(h, d, cfg):
        raise ValueError(f"index_scores_mgpu takes {HEADS} heads and d a multiple of 64 up to 256 within "
                         f"{SMEM_BYTES} bytes of shared memory; got H={h}, d={d}, {cfg}")
    if interpret:
        from .compressed_attention_mgpu import interpreter_threads

        if (threads := interpreter_threads()) < WARPGROUPS:
            raise RuntimeError(f"Mosaic GPU's interpreter runs this kernel's {WARPGROUPS} warpgroups as concurrent "
                               f"XLA:CPU programs, but XLA's CPU thread pool has {threads}; set NPROC=4 (or more) "
                               "in the environment before jax starts")


def index_scores_mgpu(q: jax.Array, w: jax.Array, keys: jax.Array, pos0: jax.Array, *, ratio: int,
                      config: MgpuIndexConfig | None = None, interpret: bool = False) -> jax.Array:
    """:func:`~.indexer_topk.index_scores_kernel` in Mosaic GPU: scores of the tokens at ``pos0[b] + t``,
    ``q [B, T, 64, d]``, ``w [B, T, 64]`` fp32, ``keys [B, R, d]`` -> ``[B, T, R]`` bf16, ineligible rows -inf."""
    cfg = config or default_config(q.shape[-1])
    _check(q, cfg, interpret)
    t = q.shape[1]
    r = keys.shape[1]
    s = index_scores_raw(q, w, keys, pos0, ratio=ratio, cfg=cfg, interpret=interpret)[:, :t, :r]
    lim = (pos0[:, None] + jnp.arange(t) + 1) // ratio
    return jnp.where(jnp.arange(r) < lim[..., None], s, -jnp.inf).astype(jnp.bfloat16)
