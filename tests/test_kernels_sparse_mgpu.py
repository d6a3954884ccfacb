"""CSA's gathering attention in Mosaic GPU (pallas_kernels.sparse_attention_mgpu) against the pure-JAX reference
(``compressed_attention_reference`` with the selection as a mask): Mosaic GPU's interpreter on the CPU (the
kernel's copies, barriers, masks, online softmax and epilogue; the interpreter runs its products as ``jnp.dot``
and the gathered rows land through the tiles' ``(8, 64)`` view, since it does not alias a ``RefUnion``'s
views), its lowering for Hopper on the CPU, and the kernel on the GPU (``JAX_PLATFORMS=cuda pytest -m gpu``).

Tolerance as tests/test_kernels_attention.py: bf16 rounding of the output and of the probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import bf16, mgpu_interpret_or_skip, mgpu_lowering_or_skip, rel, rng

from pallas_kernels import compressed_attention as CA
from pallas_kernels import indexer_topk as IX
from pallas_kernels import sparse_attention_mgpu as SP

ATTN_TOL = 8e-3


def _selection(r, pos0, t, ratio, n_rows, k, count=None, holes=False):
    """Random ascending selections among each token's visible rows, -1 padded (fewer visible rows than ``k``
    early on); ``holes``: some entries replaced by -1 inside the list, as a caller's own selection may have."""
    b = len(pos0)
    lim = np.minimum((np.asarray(pos0)[:, None] + np.arange(t) + 1) // ratio, n_rows)
    if count is not None:
        lim = np.minimum(lim, np.asarray(count)[:, None])
    idx = np.full((b, t, k), -1, np.int32)
    for bi in range(b):
        for ti in range(t):
            m = int(min(k, max(lim[bi, ti], 0)))
            idx[bi, ti, :m] = np.sort(r.choice(lim[bi, ti], m, replace=False)) if m else []
            if holes and m > 2:
                idx[bi, ti, r.integers(0, m, 2)] = -1
    return jnp.asarray(idx)


def _case(r, b, t, d, w, n_rows, k, pos0, ratio=4, count=None, holes=False):
    sink = jnp.asarray(r.standard_normal(64), jnp.float32)
    q, kv, ring, rows = bf16(r, b, t, 64, d), bf16(r, b, t, d), bf16(r, b, w, d), bf16(r, b, n_rows, d)
    pos0 = jnp.asarray(pos0)
    count = None if count is None else jnp.asarray(count)
    idx = _selection(r, pos0, t, ratio, n_rows, k, count, holes)
    return q, kv, ring, pos0, sink, rows, idx, count


def _check(o, q, kv, ring, pos0, sink, rows, idx, count, ratio=4):
    assert o.shape == q.shape and o.dtype == jnp.bfloat16
    ref = CA.compressed_attention_reference(q, kv, ring, pos0, sink, rows, ratio=ratio, count=count,
                                            sel=IX.indices_to_mask(idx, rows.shape[1]), dtype=jnp.float32)
    assert rel(o, ref) < ATTN_TOL


# (B, T, d, W, R, k, pos0, count, holes, programs): prefill from 0 (tokens with no visible row yet, then fewer
# than k) beside a continued chunk whose window reaches into the ring, programs walking 2-3 tokens; k not a
# multiple of the 64-key step and over one step, rows past the selection's blocks, a count below the visible
# rows, -1 holes inside the lists, a program a token; a chunk longer than a 64-key block whose window straddles
# blocks, 4 programs of 17-18 tokens (tokens of one key step and of several: the slots' cycle, the selections'
# buffers and the output through the last key slot across tokens); the head size 256 (two column tiles a half).
CASES = [
    (2, 9, 128, 8, 40, 16, [0, 130], None, False, 4),
    (2, 6, 128, 16, 300, 100, [1000, 37], [200, 9], True, 0),
    (1, 70, 128, 72, 90, 20, [300], None, False, 4),
    (1, 3, 256, 8, 150, 70, [500], None, True, 2),
]


@pytest.mark.parametrize("b,t,d,w,n_rows,k,pos0,count,holes,programs", CASES)
def test_kernel_equals_reference_interpret(b, t, d, w, n_rows, k, pos0, count, holes, programs):
    mgpu_interpret_or_skip()
    args = _case(rng(b * 100 + t + k), b, t, d, w, n_rows, k, pos0, count=count, holes=holes)
    q, kv, ring, pos0, sink, rows, idx, count = args
    o = SP.sparse_attention_mgpu(q, kv, ring, pos0, sink, rows, idx, ratio=4, count=count,
                                 config=SP.SparseAttnConfig(programs=programs), interpret=True)
    _check(o, *args)


def test_dispatch_takes_the_gathering_kernel_when_asked_interpret():
    """``compressed_attention(idx=..., mgpu=True)`` is this kernel; a selection without rows is refused."""
    mgpu_interpret_or_skip()
    args = _case(rng(11), 1, 4, 128, 8, 60, 24, [200])
    q, kv, ring, pos0, sink, rows, idx, count = args
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, idx=idx, mgpu=True, interpret=True)
    _check(o, *args)
    with pytest.raises(ValueError, match="needs the compressed rows"):
        CA.compressed_attention(q, kv, ring, pos0, sink, None, ratio=4, idx=idx, mgpu=True, interpret=True)


def test_shapes_and_dispatch_policy(monkeypatch):
    assert SP.supported(64, 512, 512) and SP.supported(64, 128, 16)
    assert not SP.supported(32, 512, 512) and not SP.supported(64, 576, 512) and not SP.supported(64, 512, 0)
    assert not SP.supported(64, 512, 512, SP.SparseAttnConfig(stages=3))  # 280 KB of shared memory
    assert not SP.supported(64, 512, 512, SP.SparseAttnConfig(bk=128))
    assert SP.default_config(2048, 1).programs == 132 and SP.default_config(100, 2).programs == 66
    assert SP.default_config(16, 4).programs == 0  # fewer tokens than programs: one a token
    with pytest.raises(ValueError, match="64 heads"):
        SP.sparse_attention_mgpu(jnp.zeros((1, 1, 8, 128), jnp.bfloat16), jnp.zeros((1, 1, 128), jnp.bfloat16),
                                 jnp.zeros((1, 4, 128), jnp.bfloat16), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((8,), jnp.float32), jnp.zeros((1, 4, 128), jnp.bfloat16),
                                 jnp.zeros((1, 1, 4), jnp.int32), ratio=4)
    monkeypatch.setattr(SP, "available", lambda: True)
    monkeypatch.setattr(SP, "ON_BY_DEFAULT", False)
    assert not CA.use_mgpu(1, 2048, 64, 512, True, jnp.zeros((1, 2048, 512), jnp.int32))  # opt-in for now
    monkeypatch.setattr(SP, "ON_BY_DEFAULT", True)
    assert CA.use_mgpu(1, 2048, 64, 512, True, jnp.zeros((1, 2048, 512), jnp.int32))
    assert not CA.use_mgpu(1, 1, 64, 512, True, jnp.zeros((1, 1, 512), jnp.int32))  # decode stays with Triton
    assert not CA.use_mgpu(1, 2048, 64, 512, True, jnp.zeros((1, 2048, 512), jnp.int32), interpret=True)


@pytest.mark.parametrize("b,t,d,n_rows,k", [(1, 2048, 512, 32768, 512), (2, 9, 128, 40, 16)])
def test_kernel_lowers_for_hopper_on_cpu(b, t, d, n_rows, k):
    """Mosaic GPU lowers the kernel for a CUDA device (the gathers' copies into the ``(1, 64)`` view, the scores'
    and values' wgmma over column tiles, the selection's layouts), at Flash's dimensions (a 2048-token query
    block of a 128K prefill)."""
    mgpu_lowering_or_skip()
    sd = jax.ShapeDtypeStruct

    def f(q, kv, ring, pos0, sink, rows, idx):
        return SP.sparse_attention_mgpu(q, kv, ring, pos0, sink, rows, idx, ratio=4)

    low = jax.jit(f).trace(sd((b, t, 64, d), jnp.bfloat16), sd((b, t, d), jnp.bfloat16), sd((b, 128, d), jnp.bfloat16),
                           sd((b,), jnp.int32), sd((64,), jnp.float32), sd((b, n_rows, d), jnp.bfloat16),
                           sd((b, t, k), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in low.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,w,n_rows,k,pos0", [
    (2, 300, 128, 5000, 512, [0, 19000]),  # a sequence from its start beside one deep in its cache
    (1, 2048, 128, 32768, 512, [129024])])  # the last query block of a 128K prefill
def test_gpu_equals_reference_and_triton(b, t, w, n_rows, k, pos0):
    if not SP.available():
        pytest.skip("needs a Hopper GPU")
    args = _case(rng(t), b, t, 512, w, n_rows, k, pos0)
    q, kv, ring, pos0, sink, rows, idx, count = args
    o = SP.sparse_attention_mgpu(q, kv, ring, pos0, sink, rows, idx, ratio=4)
    _check(o, *args)
    tri = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, idx=idx, mgpu=False)
    assert rel(o, tri.astype(jnp.float32)) < ATTN_TOL
