"""The one place where the model chooses GPU kernels or pure-JAX references.

* :func:`linear` has the semantics of ``quant.linear``: NVFP4 and FP8-block weights in a bf16 compute dtype go
  through the kernels of ``pallas_kernels`` on GPU (Pallas-Triton; on Hopper the Mosaic GPU decode kernels
  where those measured faster, chosen inside ``pallas_kernels``); everything else (CPU, fp32 compute,
  bf16/MXFP4 weights) through ``quant.linear``.
* :func:`routed_experts` has the semantics of ``moe.routed_experts``: stacked NVFP4 experts in bf16 compute
  go through the grouped kernels on GPU (idem), otherwise through the reference.
* :func:`prepare_weights` repacks every NVFP4 leaf of a parameter tree into the kernel layout once at load
  time (``load_model`` and ``random_model`` do this on GPUs; exact and reversible: :func:`checkpoint_layout`);
  a checkpoint-layout NVFP4 weight that reaches a kernel is repacked on the fly instead (correct, but one extra
  pass over the weight per call). The references accept packed weights too.

* :func:`index_select` has the semantics of ``indexer.select(indexer.index_scores(...))``, returning the
  selected rows as ascending indices (``[B, T, top_k]``, -1 padding) rather than a ``[B, T, R]`` mask, and
  :func:`window_attention` those of ``attention.attend`` over the window and compressed rows that
  ``attention.attention`` builds, gathering each token's selected rows (Pallas-Triton on GPU in bf16:
  ``pallas_kernels.indexer_topk`` and ``pallas_kernels.compressed_attention``; on Hopper, the window and HCA
  layers of 64 heads through the Mosaic GPU kernel ``pallas_kernels.compressed_attention_mgpu``, and the
  indexer's prefill scoring of 64 heads through ``pallas_kernels.indexer_mgpu``, where they measured faster,
  chosen inside ``pallas_kernels``).

* :func:`sinkhorn` has the semantics of ``hc.sinkhorn`` (the mHC mixing matrices' normalisation, fp32): one
  Pallas-Triton launch on GPU (``pallas_kernels.sinkhorn``), in bf16 and float32 models alike.

``interpret=True`` runs the kernels on any backend with Pallas' interpreter (tests); ``w4a4=True`` selects the
Blackwell-numerics option (activations quantised to NVFP4 with the checkpoint's ``input_scale``).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

from pallas_kernels import compressed_attention as cattn
from pallas_kernels import indexer_topk
from pallas_kernels import sinkhorn as sinkhorn_kernel
from pallas_kernels.fp8_matmul import fp8_matmul
from pallas_kernels.nvfp4_act import w4a4_matmul, w4a4_matmul_reference
from pallas_kernels.nvfp4_layout import Nvfp4Packed, pack_nvfp4, unpack_nvfp4
from pallas_kernels.nvfp4_matmul import nvfp4_matmul
from pallas_kernels.nvfp4_moe import nvfp4_moe

from . import hc, moe, quant
from .config import Config
from .params import Experts
from .quant import Weight

ENABLED = True
"""Set to False (then ``jax.clear_caches()``) to run the pure-JAX references on a GPU too, e.g. to compare."""


INTERPRET = False
"""Set to True (then ``jax.clear_caches()``) to run the kernels on any backend, the whole model included, in
Pallas' interpreter (slow; for tests of the model with its kernels on a CPU)."""


def on_gpu() -> bool:
    """Whether the default backend runs the Pallas-Triton kernels natively."""
    return jax.default_backend() == "gpu"


def _use_kernel(dtype, interpret: bool) -> bool:
    return (interpret or INTERPRET or (ENABLED and on_gpu())) and jnp.dtype(dtype) == jnp.bfloat16


def attention_kernels(dtype) -> bool:
    """Whether ``attention.attention`` uses ``index_select`` / ``window_attention``'s kernels (GPU, bf16)."""
    return _use_kernel(dtype, False)


def _as_checkpoint(w: Weight | Nvfp4Packed) -> Weight:
    return unpack_nvfp4(w) if isinstance(w, Nvfp4Packed) else w


def _as_packed(w: quant.Nvfp4 | Nvfp4Packed) -> Nvfp4Packed:
    return w if isinstance(w, Nvfp4Packed) else pack_nvfp4(w)


def use_kernel_layout(dtype, devices=None) -> bool:
    """Whether a model with compute ``dtype`` on ``devices`` (default: the default backend's) runs the NVFP4
    kernels, so that :func:`prepare_weights` pays: bf16 compute on GPUs with the kernels enabled."""
    platform = devices[0].platform if devices else jax.default_backend()
    return ENABLED and platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) == jnp.bfloat16


def is_nvfp4(a) -> bool:
    """Whether ``a`` is an NVFP4 weight (checkpoint or kernel layout)."""
    return isinstance(a, (quant.Nvfp4, Nvfp4Packed))


def prepare_weights(tree, *, donate: bool = False):
    """Every ``quant.Nvfp4`` leaf of ``tree`` (any pytree of parameters) -> ``Nvfp4Packed``, the kernels'
    layout (exact; :func:`checkpoint_layout` restores the checkpoint bytes); other leaves unchanged. Leaf by
    leaf on the leaf's own devices, keeping its sharding (expert-sharded stacks stay sharded); ``donate``
    frees each checkpoint-layout leaf as soon as its packed form exists (``load_model`` does this: the peak
    is then one leaf's worth of extra memory). ``load_model`` and ``random_model`` call this on GPUs."""

    def pack(a):
        if not isinstance(a, quant.Nvfp4):
            return a
        sh = getattr(a.weight, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            n, k = a.shape[-2:]
            out = Nvfp4Packed(sh, sh, a.weight_scale_2.sharding, a.input_scale.sharding, int(n), int(k))
            p = jax.jit(pack_nvfp4, out_shardings=out)(a)
        else:
            p = jax.jit(pack_nvfp4)(a)
        if donate:
            jax.block_until_ready(p)
            for x in (a.weight, a.weight_scale):  # the bulk; scalars may be shared (w1 / w3 global scales)
                if isinstance(x, jax.Array) and counts[id(x)] == 1:
                    x.delete()
        return p

    counts = collections.Counter(id(x) for x in jax.tree.leaves(tree))
    return jax.tree.map(pack, tree, is_leaf=is_nvfp4)


def checkpoint_layout(tree):
    """Inverse of :func:`prepare_weights`: every ``Nvfp4Packed`` leaf back to the checkpoint's ``quant.Nvfp4``
    (bit for bit). Saving and anything that reads weights in the stored formats go through this."""
    return jax.tree.map(lambda a: unpack_nvfp4(a) if isinstance(a, Nvfp4Packed) else a, tree, is_leaf=is_nvfp4)


def linear(x: jax.Array, w: Weight | Nvfp4Packed, dtype, out_dtype=None, *, interpret: bool = False,
           w4a4: bool = False) -> jax.Array:
    """``x [..., in] @ W^T`` -> ``[..., out]`` in ``out_dtype`` (default ``dtype``), fp32 accumulation; the
    NVFP4 global scale (and with ``w4a4`` the activation scale) is applied to the fp32 accumulator."""
    interpret = interpret or INTERPRET
    out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
    nvfp4 = isinstance(w, (quant.Nvfp4, Nvfp4Packed))
    if w4a4 and not nvfp4:
        raise ValueError("w4a4 needs an NVFP4 weight")
    if _use_kernel(dtype, interpret):
        if nvfp4:
            p = _as_packed(w)
            if w4a4:
                return w4a4_matmul(x, p, out_dtype, interpret=interpret)
            return nvfp4_matmul(x, p, out_dtype, interpret=interpret)
        if isinstance(w, quant.Fp8Block) and w.weight.ndim == 2:
            return fp8_matmul(x, w, out_dtype, interpret=interpret)
    w = _as_checkpoint(w)
    if w4a4:
        return w4a4_matmul_reference(x, w, out_dtype)
    return quant.linear(x, w, dtype, out_dtype)


def routed_experts(e: Experts, x: jax.Array, ids: jax.Array, w: jax.Array, config: Config, dtype, *,
                   interpret: bool = False, w4a4: bool = False) -> jax.Array:
    """``moe.routed_experts``: sum over the selected experts of ``w * expert(x)``, fp32 ``[N, D]``.
    ``x [N, D]``, ``ids, w [N, k]``. ``w4a4``: NVFP4 experts get their activations quantised to NVFP4 with
    each weight's ``input_scale`` (:func:`linear`'s option), one expert at a time (``moe.routed_experts``'
    evaluation, with the W4A4 products on the GPU: slower than the grouped kernel)."""
    interpret = interpret or INTERPRET
    nvfp4 = all(isinstance(a, (quant.Nvfp4, Nvfp4Packed)) for a in (e.w1, e.w2, e.w3))
    if w4a4 and nvfp4:
        e = Experts(_as_checkpoint(e.w1), _as_checkpoint(e.w2), _as_checkpoint(e.w3))
        return moe.routed_experts(e, x, ids, w, config, dtype, w4a4=True)
    if nvfp4 and _use_kernel(dtype, interpret):
        return nvfp4_moe(x, ids, w, _as_packed(e.w1), _as_packed(e.w2), _as_packed(e.w3),
                              config.swiglu_limit, interpret=interpret)
    e = Experts(_as_checkpoint(e.w1), _as_checkpoint(e.w2), _as_checkpoint(e.w3))
    return moe.routed_experts(e, x, ids, w, config, dtype)


def sinkhorn(m0: jax.Array, iters: int, eps: float, *, interpret: bool = False) -> jax.Array:
    """``hc.sinkhorn(m0, iters, eps)`` of the mHC mixing matrices ``m0 [..., n, n]`` (fp32 in every model, so
    whatever the compute dtype): one Pallas-Triton launch on GPU (``n`` a power of two;
    ``pallas_kernels.sinkhorn``), where the formula is either a device-side loop of tiny kernels or, unrolled,
    minutes of XLA compile time at Flash's depth; the formula elsewhere."""
    interpret = interpret or INTERPRET
    if (interpret or (ENABLED and on_gpu())) and sinkhorn_kernel.supported(m0.shape[-1]):
        return sinkhorn_kernel.sinkhorn(m0, iters, eps, interpret=interpret)
    return hc.sinkhorn(m0, iters, eps)


def index_select(q: jax.Array, w: jax.Array, keys: jax.Array, pos0: jax.Array, ratio: int, top_k: int, dtype, *,
                 query_block: int = 2048, interpret: bool = False) -> jax.Array:
    """The rows of ``indexer.select(indexer.index_scores(q, w, keys, dtype), pos0[:, None] + arange(T), ratio,
    top_k)`` as ascending indices padded with -1: int32 ``[B, T, top_k]``. ``q [B, T, H_I, d_I]``,
    ``w [B, T, H_I]`` fp32, ``keys [B, R, d_I]``; prefill is scored and selected ``query_block`` tokens at a
    time."""
    interpret = interpret or INTERPRET
    if _use_kernel(dtype, interpret):
        return indexer_topk.index_select(q, w, keys, pos0, ratio=ratio, top_k=top_k, query_block=query_block,
                                         interpret=interpret)
    positions = pos0[:, None] + jnp.arange(q.shape[1])
    return indexer_topk.mask_to_indices(
        indexer_topk.index_select_reference(q, w, keys, positions, ratio, top_k, dtype), top_k)


def window_attention(q: jax.Array, kv: jax.Array, ring: jax.Array, pos0: jax.Array, rows: jax.Array | None,
                     sel_idx: jax.Array | None, sink: jax.Array, ratio: int, dtype, *,
                     interpret: bool = False) -> jax.Array:
    """``attention.attend`` over each query's window (the chunk's ``kv [B, T, d]`` and, older, the ring
    ``[B, W, d]`` before the chunk) and the compressed rows ``rows [B, R, d]`` visible at its position
    (``c < (i + 1) // ratio``, and one of the CSA selection ``sel_idx [B, T, k]`` where given, as
    :func:`index_select` returns it): ``q [B, T, H, d]`` -> ``[B, T, H, d]``. The kernel gathers each token's
    selected rows (prefill and decode alike)."""
    interpret = interpret or INTERPRET
    if not _use_kernel(dtype, interpret):
        sel = None if sel_idx is None else indexer_topk.indices_to_mask(sel_idx, rows.shape[1])
        return cattn.compressed_attention_reference(q, kv, ring, pos0, sink, rows, ratio=max(ratio, 1), sel=sel,
                                                    dtype=dtype)
    return cattn.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=max(ratio, 1), idx=sel_idx,
                                      interpret=interpret)
