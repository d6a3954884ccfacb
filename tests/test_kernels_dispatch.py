"""dsv4_jax.kernels: one dispatch point with the semantics of quant.linear and moe.routed_experts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import BF16_TOL, bf16, fp8, nvfp4, rel, rng

from dsv4_jax import kernels, moe, quant
from dsv4_jax.params import Experts
from pallas_kernels import nvfp4_layout as L


@dataclasses.dataclass(frozen=True)
class _Cfg:
    n_routed_experts: int = 4
    hidden_size: int = 48
    swiglu_limit: float = 10.0


def test_cpu_path_is_the_reference_for_every_weight_format():
    r = rng()
    x = bf16(r, 3, 64)
    for w in (nvfp4(r, 24, 64), fp8(r, 24, 64), bf16(r, 24, 64)):
        np.testing.assert_array_equal(np.asarray(kernels.linear(x, w, jnp.bfloat16, jnp.float32)),
                                      np.asarray(quant.linear(x, w, jnp.bfloat16, jnp.float32)))
    w = nvfp4(r, 24, 64)
    np.testing.assert_array_equal(np.asarray(kernels.linear(x, L.pack_nvfp4(w), jnp.float32)),
                                  np.asarray(quant.linear(x, w, jnp.float32)))


def test_interpret_path_equals_reference():
    r = rng()
    x = bf16(r, 2, 5, 64)
    for w in (nvfp4(r, 40, 64), fp8(r, 40, 64)):
        y = kernels.linear(x, w, jnp.bfloat16, interpret=True)
        assert y.shape == (2, 5, 40) and y.dtype == jnp.bfloat16
        assert rel(y, quant.linear(x, w, jnp.bfloat16, jnp.float32)) < BF16_TOL


def test_w4a4_option_dispatch_and_errors():
    r = rng()
    x = bf16(r, 3, 64)
    w = nvfp4(r, 32, 64, input_scale=0.01)
    y_cpu = kernels.linear(x, w, jnp.bfloat16, jnp.float32, w4a4=True)
    y_int = kernels.linear(x, w, jnp.bfloat16, jnp.float32, w4a4=True, interpret=True)
    assert rel(y_int, y_cpu) < 1e-5
    assert rel(y_cpu, quant.linear(x, w, jnp.bfloat16, jnp.float32)) > 1e-3  # activations were quantised
    with pytest.raises(ValueError, match="NVFP4"):
        kernels.linear(x, fp8(r, 32, 64), jnp.bfloat16, w4a4=True)


def test_prepare_weights_packs_only_nvfp4_leaves():
    r = rng()
    tree = {"a": nvfp4(r, 2, 16, 32), "b": fp8(r, 16, 32), "c": jnp.ones(3)}
    out = kernels.prepare_weights(tree)
    assert isinstance(out["a"], L.Nvfp4Packed) and isinstance(out["b"], quant.Fp8Block)
    assert out["c"] is tree["c"]
    for a, b in zip(jax.tree.leaves(L.unpack_nvfp4(out["a"])), jax.tree.leaves(tree["a"])):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a),
                                      np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1 else np.asarray(b))


def test_routed_experts_cpu_is_moe_reference_and_interpret_matches():
    r = rng()
    c = _Cfg()
    e = Experts(nvfp4(r, 4, 32, 48), nvfp4(r, 4, 48, 32), nvfp4(r, 4, 32, 48))
    x = bf16(r, 5, 48)
    ids = jnp.asarray(np.stack([r.choice(3, 2, replace=False) for _ in range(5)]), jnp.int32)
    w = jnp.asarray(r.random((5, 2)), jnp.float32)
    ref = moe.routed_experts(e, x, ids, w, c, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernels.routed_experts(e, x, ids, w, c, jnp.bfloat16)),
                                  np.asarray(ref))
    y = kernels.routed_experts(kernels.prepare_weights(e), x, ids, w, c, jnp.bfloat16, interpret=True)
    assert rel(y, ref) < 2.0**-8
