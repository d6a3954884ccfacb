"""Mixture-of-experts FFN (ARCHITECTURE.md §8): sqrt-softplus router with a selection-only bias or hash
routing, renormalised top-k weights times the routed scale, clipped SwiGLU experts and one shared expert.

Expert parallelism: when the routed experts are sharded over a mesh's ``"expert"`` axis (``load_model(...,
mesh=...)``), :func:`moe` runs them under ``jax.shard_map``: every device sees all tokens, computes the pairs
routed to its own experts (the others enter as id ``-1`` and cost nothing), and one ``psum`` over the axis adds
the partial results. No expert weight moves between devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from . import quant, sharding
from .config import Config, swiglu_bound
from .params import Experts, MoE


def route(p: MoE, x: jax.Array, tokens: jax.Array, config: Config) -> tuple[jax.Array, jax.Array]:
    """§8.1 (fp32): expert ids ``[..., k]`` and weights ``[..., k]``.

    Score-routed layers pick the top-k of ``scores + bias`` (ties to the lower expert id); hash layers take
    ``tid2eid[token]``. Weights are the selected unbiased scores, renormalised, times the routed scale."""
    z = quant.dense(x.astype(jnp.float32), p.gate.astype(jnp.float32))
    scores = jnp.sqrt(jax.nn.softplus(z))
    if p.tid2eid is not None:
        ids = p.tid2eid[tokens]
    else:
        _, ids = jax.lax.top_k(scores + p.bias, config.num_experts_per_tok)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    w = w / quant.stable_sum(w, axis=-1, keepdims=True) * config.routed_scaling_factor
    return ids, w


def _linear(x: jax.Array, w, dtype, w4a4: bool) -> jax.Array:
    """fp32 ``x @ w^T``; with ``w4a4`` an NVFP4 weight gets its input quantised to NVFP4 first."""
    from . import kernels  # kernels dispatches back to this module's reference

    return kernels.linear(x, w, dtype, jnp.float32, w4a4=w4a4 and kernels.is_nvfp4(w))


def swiglu(e: Experts, x: jax.Array, config: Config, dtype, w4a4: bool = False) -> jax.Array:
    """§8.2: ``SiLU(min(x w1^T, L)) * clamp(x w3^T, -L, L)``, fp32 ``[..., I]``; no clip where ``L <= 0``."""
    lim = swiglu_bound(config.swiglu_limit)
    a = jnp.minimum(_linear(x, e.w1, dtype, w4a4), lim)
    u = jnp.clip(_linear(x, e.w3, dtype, w4a4), -lim, lim)
    return jax.nn.silu(a) * u


def expert_ffn(e: Experts, x: jax.Array, weight: jax.Array | None, config: Config, dtype,
               w4a4: bool = False) -> jax.Array:
    """One expert, fp32 ``[..., D]``; a routed expert multiplies its hidden by its routing weight before w2.
    ``w4a4``: NVFP4 weights see their inputs (``x``, then the weighted hidden) quantised to NVFP4 with their
    ``input_scale`` (``kernels.linear``'s option: the numerics of an FP4 x FP4 deployment)."""
    h = swiglu(e, x, config, dtype, w4a4)
    if weight is not None:
        h = h * weight[..., None]
    if jax.default_backend() == "cpu":
        # Keeps XLA:CPU from fusing the SwiGLU (its exp) into w2's product, where the fused loop's
        # vectorisation, and so the last bit of a row, changed with the number of rows (see quant.matmul).
        h = jax.lax.optimization_barrier(h)
    return _linear(h.astype(dtype), e.w2, dtype, w4a4)


def _slice(e: Experts, i) -> Experts:
    return jax.tree.map(lambda a: a[i], e)


def n_experts(e: Experts) -> int:
    """Number of experts in a stacked ``Experts`` (any stored format; the local ones inside ``shard_map``)."""
    return jax.tree.leaves(e.w1)[0].shape[0]


def routed_experts(e: Experts, x: jax.Array, ids: jax.Array, w: jax.Array, config: Config, dtype,
                   w4a4: bool = False) -> jax.Array:
    """Sum over the selected experts of ``w * expert(x)``, fp32. ``x [N, D]``, ``ids, w [N, k]``; an id of -1
    selects nothing (a pair of another device's expert).

    Reference evaluation: the experts are visited one at a time in id order and only those that received
    tokens are computed, so at most one expert is ever dequantised and a token's result does not depend on
    which other tokens share its batch."""
    n = x.shape[0]

    def body(acc, i):
        wi = jnp.sum(jnp.where(ids == i, w, 0.0), axis=-1)  # [N]
        y = jax.lax.cond(jnp.any(ids == i), lambda: expert_ffn(_slice(e, i), x, wi, config, dtype, w4a4),
                         lambda: jnp.zeros_like(acc))
        return acc + y, None

    acc, _ = jax.lax.scan(body, jnp.zeros((n, config.hidden_size), jnp.float32), jnp.arange(n_experts(e)))
    return acc


def _expert_parallel(e: Experts, x: jax.Array, ids: jax.Array, w: jax.Array, config: Config, dtype,
                     mesh: Mesh, w4a4: bool = False) -> jax.Array:
    """:func:`routed_experts` with the experts sharded over ``mesh``'s ``"expert"`` axis (module docstring)."""
    from . import kernels

    axis = sharding.EXPERT_AXIS

    def local(e_local, x, ids, w):
        lo = jax.lax.axis_index(axis) * n_experts(e_local)
        mine = (ids >= lo) & (ids < lo + n_experts(e_local))
        y = kernels.routed_experts(e_local, x, jnp.where(mine, ids - lo, -1), jnp.where(mine, w, 0.0), config,
                                   dtype, w4a4=w4a4)
        return jax.lax.psum(y, axis)

    rep = PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axis), rep, rep, rep), out_specs=rep,
                         check_vma=False)(e, x, ids, w)


def moe(p: MoE, x: jax.Array, tokens: jax.Array, config: Config, dtype, mesh: Mesh | None = None,
        w4a4: bool = False) -> jax.Array:
    """§8.3: routed experts plus the (clipped, unweighted) shared expert, accumulated in fp32.
    ``x [B, T, D]``, ``tokens [B, T]`` (hash routing) -> ``[B, T, D]`` in the compute dtype. With a ``mesh``
    whose ``"expert"`` axis has several devices the routed experts run expert-parallel (module docstring).
    ``w4a4``: NVFP4 routed experts with NVFP4-quantised activations (``Numerics.w4a4``)."""
    b, t, d = x.shape
    ids, w = route(p, x, tokens, config)
    from . import kernels

    args = (p.experts, x.reshape(b * t, d), ids.reshape(b * t, -1), w.reshape(b * t, -1), config, dtype)
    if sharding.expert_shards(mesh) > 1:
        routed = _expert_parallel(*args, mesh, w4a4)
    else:
        routed = kernels.routed_experts(*args, w4a4=w4a4)
    shared = expert_ffn(p.shared, x, None, config, dtype)
    return (routed.reshape(b, t, d) + shared).astype(dtype)
