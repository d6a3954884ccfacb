"""Window + compressed-row attention (ARCHITECTURE.md §5.3-5.4) in Pallas-Triton, with its pure-JAX reference.

One kernel serves prefill chunks and decode steps. A chunk of ``T`` tokens at positions ``pos0[b] + t``
attends to

* its raw window (positions ``i - W + 1 .. i``): the chunk's own KV rows ``kv [B, T, d]`` and, older, the
  ring ``ring [B, W, d]`` as it was before the chunk (slot = position mod W, §10.5);
* compressed rows ``rows [B, R, d]``: row ``c`` is visible to the token at position ``i`` iff
  ``c < min((i + 1) // ratio, count[b])`` and, where a selection ``idx [B, T, k]`` is given (CSA: the
  indexer's top-k as ascending row indices, -1 = none), it is one of the token's ``idx``. With a selection the
  kernel gathers each token's ``k`` rows (sparse mode: at H = 64 one program = one token's heads against its
  own rows; with fewer heads a block's tokens gather together and each query sees its own token's rows);
  without, it walks the rows in order up to the last one its tokens may see (dense mode).

K = V is the one shared latent; all ``H`` heads of a token share its keys, so the kernel flattens the query
rows ``(t, h)`` into the matmul's M axis (``q [B, T*H, d]``): a block of ``bm`` rows is ``bm // H`` tokens
(or a slice of one token's heads when ``bm < H``). Each program walks its key blocks with an online softmax
(fp32 scores and statistics, bf16 probabilities into P @ V, fp32 accumulator); the sink enters as the
initial running maximum ``z_h`` with weight 1 (a virtual key of zero value). For long contexts the compressed
rows (or selected indices) are split over ``splits`` programs whose partial ``(acc, max, sum)`` are merged
afterwards. Nothing of size ``T x T`` or ``T x R`` is built.

On a Hopper GPU, :func:`compressed_attention` hands the cases without a selection (the window layers and HCA)
at 64 heads to the Mosaic GPU kernel of :mod:`pallas_kernels.compressed_attention_mgpu` where that measured
faster (:func:`use_mgpu`: prefill chunks, and HCA decode of 8 tokens or more a step); CSA's gathered rows and
every other shape stay here.

Numerics: the reference rounds the *normalised* probabilities to bf16; the kernel rounds the unnormalised
``exp(s - m_running)`` and divides in fp32 at the end, so the two agree to bf16 rounding (about 2^-8).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_NEG = -1e30  # finite "no key yet" maximum: keeps exp(m_old - m_new) free of inf - inf


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Tiles of one launch: ``bm`` query rows (powers of two; ``bm % H == 0`` or ``H % bm == 0``), ``bk`` keys
    per step (with a selection and ``bm / H = bt`` tokens per block: ``max(16, bk / bt)`` indices of each),
    ``splits`` programs over the compressed rows (or the selected indices)."""

    bm: int = 64
    bk: int = 64
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def sm_count() -> int:
    """Streaming multiprocessors of the first device (132 where it does not say: an H100 / H200 SXM)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except RuntimeError:
        return 132


def default_config(t: int, h: int, r: int, batch: int, k: int = 0, sms: int = 132) -> AttnConfig:
    """Decode (``t == 1``): whole tokens' heads per block (64 rows, 8 warps; 32 rows x 4 warps where the rows
    are not split) once the batch alone gives ~128 programs, else 16 query rows x 4 warps (more programs, a
    quarter of the fp32 accumulator); the rows (or the ``k`` selected indices) are split until about one wave
    of ``sms`` programs (the GPU's multiprocessors), at least 2 row blocks (1 selected block) per split (the partial accumulators are
    ``splits x H x d`` fp32). Prefill: 64 query rows (one token's heads at H = 64), 8 warps (the fp32
    accumulator is ``64 x 512``); with a selection 32 rows x 4 warps (16 rows with fewer heads, bounding the
    gathered block). Chosen with
    ``scripts/bench_attention.py --sweep`` / ``--sweep-decode B`` on an H200 (BENCHMARKS.md)."""
    if t == 1:
        hp = pl.next_power_of_2(h)
        bk = 64
        blocks = pl.cdiv(k, bk) if k else pl.cdiv(r, bk)

        def split(bm):
            progs, splits = batch * max(1, hp // bm), 1
            while progs * splits * 2 <= sms and blocks // (splits * 2) >= (1 if k else 2):
                splits *= 2
            return splits

        bm = max(16, min(64, hp)) if batch * max(1, hp // 64) * 4 >= 128 else 16
        if bm == 64 and (r == 0 or split(bm) == 1):
            # 64 rows unsplit at t = 1 asks Triton for 256 KB of shared memory (H200: 227 KB; measured)
            bm = 32
        return AttnConfig(bm=bm, bk=bk, splits=split(bm), num_warps=8 if bm == 64 else 4, num_stages=2)
    if k:  # gathered rows: 32 query rows x 4 warps (CSA at 32K: 226 against 215 TFLOP/s for 64 x 8)
        bm = max(16, min(32, pl.next_power_of_2(h)))
        return AttnConfig(bm=bm, bk=64, splits=1, num_warps=4, num_stages=2)
    return AttnConfig(bm=64, bk=64, splits=1, num_warps=8, num_stages=2)


def window_keys(kv: jax.Array, ring: jax.Array, pos0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The dense window of each query, as ``dsv4_jax.attention.window_keys``: ``win [B, T, W, d]`` oldest first
    and ``win_mask [B, T, W]``."""
    from dsv4_jax.attention import window_keys as keys  # the model imports this package

    positions = pos0[:, None] + jnp.arange(kv.shape[1])
    return keys(kv, ring, positions, pos0, ring.shape[1])


def row_visibility(pos0: jax.Array, t: int, r: int, ratio: int, count: jax.Array | None,
                   sel: jax.Array | None) -> jax.Array:
    """``[B, T, R]`` bool: row ``c`` visible to token ``t`` (the kernel's rule, spelled out densely; ``sel`` is
    the selection as a mask, ``indexer_topk.indices_to_mask`` of the kernel's ``idx``)."""
    lim = (pos0[:, None] + jnp.arange(t) + 1) // ratio
    if count is not None:
        lim = jnp.minimum(lim, count[:, None])
    vis = jnp.arange(r) < lim[..., None]
    return vis if sel is None else vis & sel


def compressed_attention_reference(q: jax.Array, kv: jax.Array, ring: jax.Array, pos0: jax.Array, sink: jax.Array,
                                   rows: jax.Array | None = None, *, ratio: int = 1,
                                   count: jax.Array | None = None, sel: jax.Array | None = None,
                                   dtype=jnp.bfloat16) -> jax.Array:
    """Dense-mask reference (§5.8): ``q [B, T, H, d]``, ``kv [B, T, d]``, ``ring [B, W, d]``, ``pos0 [B]``,
    ``sink [H]``, ``rows [B, R, d]`` -> ``o [B, T, H, d]`` in ``dtype``; ``dsv4_jax.attention.attend``."""
    from dsv4_jax.attention import attend  # here, not at the top: dsv4_jax.attention imports dsv4_jax.kernels

    win, win_mask = window_keys(kv, ring, pos0)
    row_mask = None
    if rows is not None:
        row_mask = row_visibility(pos0, q.shape[1], rows.shape[1], ratio, count, sel)
    return attend(q, win, win_mask, rows, row_mask, sink, dtype)


def split_blocks(s: jax.Array, splits: int, blocks: int, extra: int) -> tuple[jax.Array, jax.Array]:
    """Key blocks ``[lo, hi)`` of split ``s`` of ``splits`` over ``blocks``, where split 0 also walks ``extra``
    window blocks (decode: the ring's and the token's own): every split gets about as many steps."""
    per = -(-(blocks + extra) // splits)
    return jnp.maximum(0, s * per - extra), (s + 1) * per - extra


def window_blocks(t: int, w: int, bk: int, splits: int) -> int:
    """The window blocks a decode step's split 0 walks besides its rows (0: no split, or not a decode step)."""
    return -(-w // bk) + 1 if t == 1 and splits > 1 else 0


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(pos0_ref, cnt_ref, sink_ref, q_ref, kv_ref, ring_ref, rows_ref, idx_ref, *out_refs, h: int, t: int,
            w: int, r: int, k: int, ratio: int, cfg: AttnConfig, mode: str, has_count: bool, partial: bool,
            scale: float):
    bm, bk = cfg.bm, cfg.bk
    b, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hb = min(bm, h)  # heads of one token inside the block
    bt = max(1, bm // h)  # tokens inside the block
    rid = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    tok = rid // h
    row_ok = tok < t
    t_min = (i * bm) // h
    t_max = jnp.minimum(t_min + bt - 1, t - 1)
    pos0 = pos0_ref[b]
    pos = pos0 + tok  # [bm]
    cnt = cnt_ref[b] if has_count else r

    q = plt.load(q_ref.at[b, pl.ds(i * bm, bm), :], mask=row_ok[:, None], other=0.0)
    z = sink_ref[pl.ds(pl.multiple_of((i * bm) % sink_ref.shape[0], hb), bm)]
    # Scalar-predicate selects are avoided on purpose: Pallas-Triton (jax 0.11.2) lowered a scalar
    # jnp.where(bool, i32, i32) to an i1 value on the H200; arithmetic with 0/1 flags is used instead.
    first = (s == 0).astype(jnp.int32)
    ff = first.astype(jnp.float32)
    m0 = z * ff + _NEG * (1.0 - ff)
    l0 = jnp.zeros_like(z) + ff
    acc0 = jnp.zeros((bm, q_ref.shape[-1]), jnp.float32)

    def update(carry, k, vis):
        m, l_, acc = carry
        sc = jnp.where(vis, _dot_nt(q, k) * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[:, None])
        l_ = alpha * l_ + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return m_new, l_, acc

    # Window keys inside the chunk: j in (t - W, t].
    j_lo = jnp.maximum(0, t_min - w + 1)
    n_chunk = first * pl.cdiv(t_max + 1 - j_lo, bk)

    def chunk_step(kb, carry):
        j = j_lo + kb * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
        k = plt.load(kv_ref.at[b, pl.ds(j_lo + kb * bk, bk), :], mask=(j < t)[:, None], other=0.0)
        vis = (j[None, :] <= tok[:, None]) & (j[None, :] > tok[:, None] - w) & (j < t)[None, :] & row_ok[:, None]
        return update(carry, k, vis)

    carry = jax.lax.fori_loop(0, n_chunk, chunk_step, (m0, l0, acc0))

    # Window keys from the ring (positions before the chunk): slot s holds p - ((p - s) mod W), p = pos0 - 1.
    n_ring = first * (pos0 > 0).astype(jnp.int32) * (t_min < w - 1).astype(jnp.int32) * pl.cdiv(w, bk)

    def ring_step(kb, carry):
        slot = kb * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
        ps = pos0 - 1 - jax.lax.rem(pos0 - 1 - slot + w, w)
        k = plt.load(ring_ref.at[b, pl.ds(kb * bk, bk), :], mask=(slot < w)[:, None], other=0.0)
        vis = ((ps >= 0) & (slot < w))[None, :] & (ps[None, :] > pos[:, None] - w) & row_ok[:, None]
        return update(carry, k, vis)

    carry = jax.lax.fori_loop(0, n_ring, ring_step, carry)

    if mode == "dense":  # rows in order, up to the last one a token of the block may see
        lim = jnp.minimum((pos + 1) // ratio, cnt)  # [bm]
        lim_max = jnp.minimum(jnp.minimum((pos0 + t_max + 1) // ratio, cnt), r)
        lo, hi = split_blocks(s, cfg.splits, pl.cdiv(r, bk), window_blocks(t, w, bk, cfg.splits))
        hi = jnp.minimum(hi, pl.cdiv(lim_max, bk))

        def row_step(kb, carry):
            c = kb * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
            k = plt.load(rows_ref.at[b, pl.ds(kb * bk, bk), :], mask=(c < r)[:, None], other=0.0)
            vis = (c[None, :] < lim[:, None]) & (c < r)[None, :] & row_ok[:, None]
            return update(carry, k, vis)

        carry = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), row_step, carry)

    if mode == "sparse":  # each token's selected rows, gathered: bks indices of each of the bt tokens per step
        bks = max(16, bk // bt)
        lim_max = jnp.minimum(jnp.minimum((pos0 + t_max + 1) // ratio, cnt), r)
        lo, hi = split_blocks(s, cfg.splits, pl.cdiv(k, bks), window_blocks(t, w, bk, cfg.splits))
        hi = jnp.minimum(hi, pl.cdiv(jnp.minimum(lim_max, k), bks))  # at most lim rows are selected
        e = jax.lax.broadcasted_iota(jnp.int32, (bt * bks,), 0)
        tk = t_min + e // bks  # token of each gathered row
        lim_k = jnp.minimum(jnp.minimum((pos0 + tk + 1) // ratio, cnt), r)

        def sel_step(kb, carry):
            ek = kb * bks + e % bks
            c = plt.load(idx_ref.at[b, jnp.minimum(tk, t - 1), jnp.minimum(ek, k - 1)], mask=(ek < k) & (tk < t),
                         other=-1)
            ok = (c >= 0) & (c < lim_k)
            cc = jnp.minimum(jnp.maximum(c, 0), r - 1)  # -1 padding: any row, its scores masked
            cols = jax.lax.broadcasted_iota(jnp.int32, (1, rows_ref.shape[-1]), 1)
            rows = plt.load(rows_ref.at[b, cc[:, None], cols])
            vis = ok[None, :] & row_ok[:, None]
            if bt > 1:  # several tokens per block: a query sees only its own token's rows
                vis = vis & (tok[:, None] == tk[None, :])
            return update(carry, rows, vis)

        carry = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), sel_step, carry)

    m, l_, acc = carry
    if partial:
        o_ref, m_ref, l_ref = out_refs
        plt.store(o_ref.at[b, s, pl.ds(i * bm, bm), :], acc, mask=row_ok[:, None])
        plt.store(m_ref.at[b, s, pl.ds(i * bm, bm)], m, mask=row_ok)
        plt.store(l_ref.at[b, s, pl.ds(i * bm, bm)], l_, mask=row_ok)
    else:
        (o_ref,) = out_refs
        plt.store(o_ref.at[b, pl.ds(i * bm, bm), :], (acc / l_[:, None]).astype(o_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("ratio", "cfg", "interpret", "scale"))
def _call(q, kv, ring, pos0, sink, rows, count, idx, *, ratio: int, cfg: AttnConfig, interpret: bool,
          scale: float):
    b, t, h, d = q.shape
    w = ring.shape[1]
    if cfg.bm % h and h % cfg.bm:
        raise ValueError(f"bm={cfg.bm} and H={h}: one must divide the other")
    mode = "none" if rows is None else "dense" if idx is None else "sparse"
    if rows is None:  # absent inputs: stand-ins that are never read (no extra launch to build them)
        rows = kv
        cfg = dataclasses.replace(cfg, splits=1)
    r = rows.shape[1]
    has_count = count is not None
    count = count.astype(jnp.int32) if has_count else pos0.astype(jnp.int32)
    idx = pos0.astype(jnp.int32).reshape(b, 1, 1) if idx is None else idx.astype(jnp.int32)
    sink_rows = sink.astype(jnp.float32)
    if cfg.bm > h:
        sink_rows = jnp.tile(sink_rows, cfg.bm // h)
    n_m = pl.cdiv(t * h, cfg.bm)
    partial = cfg.splits > 1
    if partial:
        out_shape = (jax.ShapeDtypeStruct((b, cfg.splits, t * h, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, cfg.splits, t * h), jnp.float32),
                     jax.ShapeDtypeStruct((b, cfg.splits, t * h), jnp.float32))
    else:
        out_shape = (jax.ShapeDtypeStruct((b, t * h, d), jnp.bfloat16),)
    kernel = functools.partial(_kernel, h=h, t=t, w=w, r=r, k=idx.shape[2], ratio=ratio, cfg=cfg, mode=mode,
                               has_count=has_count, partial=partial, scale=scale)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, n_m, cfg.splits), interpret=interpret, name="compressed_attention",
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(pos0.astype(jnp.int32), count, sink_rows, q.reshape(b, t * h, d).astype(jnp.bfloat16),
      kv.astype(jnp.bfloat16), ring.astype(jnp.bfloat16), rows.astype(jnp.bfloat16), idx)
    if partial:
        acc, m, l_ = outs
        mx = jnp.max(m, axis=1, keepdims=True)
        wgt = jnp.exp(m - mx)
        o = jnp.sum(acc * wgt[..., None], axis=1) / jnp.sum(l_ * wgt, axis=1)[..., None]
    else:
        (o,) = outs
    return o.reshape(b, t, h, d).astype(jnp.bfloat16)


def use_mgpu(b: int, t: int, h: int, d: int, dense: bool, idx: jax.Array | None = None,
             interpret: bool = False) -> bool:
    """Whether :func:`compressed_attention` takes the Mosaic GPU kernel
    (:mod:`pallas_kernels.compressed_attention_mgpu`): on a Hopper GPU, without a selection, at the shapes it
    takes (64 heads, ``d`` a multiple of 128 up to 512), where it was measured faster (H200, BENCHMARKS.md,
    session 10): prefill chunks of 64 tokens or more, and steps of at least 8 tokens over compressed rows
    (HCA). Triton keeps the window alone at small T (one token's program there is a short chain of latencies,
    7.6-8.5 against 14-15 us at batch 1-16) and HCA below 8 tokens a step. A selection (CSA) stays with Triton:
    gathering each token's rows by TMA on Hopper (one copy a row) was measured slower (BENCHMARKS.md, session 16)."""
    from . import compressed_attention_mgpu as mg

    if idx is not None or interpret or not mg.supported(h, d):
        return False
    return (t >= 64 or (dense and b * t >= 8)) and mg.available()


def compressed_attention(q: jax.Array, kv: jax.Array, ring: jax.Array, pos0: jax.Array, sink: jax.Array,
                         rows: jax.Array | None = None, *, ratio: int = 1, count: jax.Array | None = None,
                         idx: jax.Array | None = None, config: AttnConfig | None = None,
                         interpret: bool = False, mgpu: bool | None = None) -> jax.Array:
    """Kernel with the semantics of :func:`compressed_attention_reference` (bf16 compute):
    ``q [B, T, H, d]``, ``kv [B, T, d]``, ``ring [B, W, d]``, ``pos0 [B]`` int, ``sink [H]`` fp32, optional
    ``rows [B, R, d]`` (visible: ``c < min((pos + 1) // ratio, count[b])``), optional selection
    ``idx [B, T, k]`` int (ascending row indices padded with -1, ``indexer_topk.index_select``; the
    reference's ``sel`` is ``indexer_topk.indices_to_mask(idx, R)``) -> ``o [B, T, H, d]`` bf16. Any ``H``
    and ``d``: a head size that is not a power of two is padded with zero columns, and (default tiles) a head
    count with heads of zeros, to the next power of two (the softmax scale stays ``d ** -0.5``).

    ``mgpu``: take the Mosaic GPU kernel (True; with ``interpret``, its interpreter), the Triton one (False), or
    choose (None: :func:`use_mgpu`, which a ``config`` turns off)."""
    b, t, h, d = q.shape
    if mgpu is None:
        mgpu = config is None and use_mgpu(b, t, h, d, rows is not None, idx, interpret)
    if mgpu:
        from . import compressed_attention_mgpu as mg

        if idx is not None:
            raise ValueError("the Mosaic GPU attention takes no selection (idx): CSA's gathered rows run in the "
                             "Triton kernel (mgpu=False or None)")
        return mg.compressed_attention_mgpu(q, kv, ring, pos0, sink, rows, ratio=ratio, count=count,
                                            interpret=interpret)
    hp, dp = pl.next_power_of_2(h), pl.next_power_of_2(d)
    if dp != d:  # Triton tiles are powers of two: zero columns change no score and give zero outputs
        def pad(a):
            return None if a is None else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, dp - d)])

        q, kv, ring, rows = pad(q), pad(kv), pad(ring), pad(rows)
    if hp != h and config is None:  # tiles pack whole heads: extra heads of zeros, dropped after
        q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
        sink = jnp.pad(sink, (0, hp - h))
    r = 0 if rows is None else rows.shape[1]
    cfg = config or default_config(t, q.shape[2], r, b, 0 if idx is None else idx.shape[2], sm_count())
    o = _call(q, kv, ring, pos0, sink, rows, count, idx, ratio=ratio, cfg=cfg, interpret=interpret, scale=d**-0.5)
    return o[:, :, :h, :d]
