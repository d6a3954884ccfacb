"""The Mosaic GPU window + compressed-row attention (pallas_kernels.compressed_attention_mgpu) against the
pure-JAX reference: Mosaic GPU's interpreter on the CPU (the kernel's copies, barriers, masks, online softmax,
split merge and epilogue; the interpreter runs its two products as ``jnp.dot``), its lowering for Hopper on the
CPU, and the kernel itself on the GPU (``JAX_PLATFORMS=cuda pytest -m gpu``).

Tolerances as tests/test_kernels_attention.py: bf16 rounding of the output and of the probabilities.
"""

import jax
import jax.numpy as jnp
import pytest
from kernel_utils import bf16, mgpu_interpret_or_skip, mgpu_lowering_or_skip, rel, rng

from dsv4_jax import kernels
from pallas_kernels import compressed_attention as CA
from pallas_kernels import compressed_attention_mgpu as CM

ATTN_TOL = 8e-3


def _inputs(r, b, t, d, w, n_rows):
    sink = jnp.asarray(r.standard_normal(64), jnp.float32)
    rows = bf16(r, b, n_rows, d) if n_rows else None
    return bf16(r, b, t, 64, d), bf16(r, b, t, d), bf16(r, b, w, d), rows, sink


def _check(o, q, kv, ring, pos0, sink, rows, **kw):
    assert o.shape == q.shape and o.dtype == jnp.bfloat16
    ref = CA.compressed_attention_reference(q, kv, ring, pos0, sink, rows, dtype=jnp.float32, **kw)
    assert rel(o, ref) < ATTN_TOL


# (B, T, W, R, ratio, pos0, count, config): prefill from 0 beside a continued chunk (ring wrap-around, one
# sequence without rows yet), its programs walking 2 tokens each at the most; the window alone, a program a token;
# decode over rows split across programs (some splits empty, a count below the visible rows, a sequence with
# none); a chunk longer than a 64-key block whose window and rows straddle block boundaries (blocks that would run
# past the array start earlier and mask what they repeat), 3 programs walking 23-24 tokens each (tokens of one
# key step and of several, the output leaving through the last step's key slot, the next tokens' copies queued).
CASES = [
    (2, 9, 8, 9, 4, [0, 13], None, CM.MgpuAttnConfig(programs=5)),
    (2, 5, 8, 0, 1, [0, 13], None, None),
    (3, 1, 16, 70, 4, [281, 2, 130], [60, 0, 33], CM.MgpuAttnConfig(splits=3)),
    (2, 1, 16, 70, 4, [281, 150], None, CM.MgpuAttnConfig(splits=2)),
    (1, 70, 72, 90, 1, [100], None, CM.MgpuAttnConfig(programs=3)),
]


@pytest.mark.parametrize("b,t,w,n_rows,ratio,pos0,count,cfg", CASES)
def test_kernel_equals_reference_interpret(b, t, w, n_rows, ratio, pos0, count, cfg):
    mgpu_interpret_or_skip()
    r = rng(b * 100 + t)
    q, kv, ring, rows, sink = _inputs(r, b, t, 128, w, n_rows)
    pos0 = jnp.asarray(pos0)
    count = None if count is None else jnp.asarray(count)
    o = CM.compressed_attention_mgpu(q, kv, ring, pos0, sink, rows, ratio=ratio, count=count, config=cfg,
                                     interpret=True)
    _check(o, q, kv, ring, pos0, sink, rows, ratio=ratio, count=count)


def test_dispatch_takes_the_mosaic_kernel_when_asked_interpret():
    """``compressed_attention(mgpu=True)`` is this kernel (the head size 256 splits into two 128-column halves)."""
    mgpu_interpret_or_skip()
    r = rng(7)
    q, kv, ring, rows, sink = _inputs(r, 1, 3, 256, 8, 12)
    pos0 = jnp.asarray([40])
    o = CA.compressed_attention(q, kv, ring, pos0, sink, rows, ratio=4, mgpu=True, interpret=True)
    _check(o, q, kv, ring, pos0, sink, rows, ratio=4)


def test_shapes_and_dispatch_policy(monkeypatch):
    assert CM.supported(64, 512) and CM.supported(64, 128)
    assert not CM.supported(32, 512) and not CM.supported(64, 576) and not CM.supported(64, 1024)
    assert not CM.supported(64, 512, CM.MgpuAttnConfig(bk=32))  # P @ V's K: whole 64-row swizzled tiles
    assert not CM.supported(64, 512, CM.MgpuAttnConfig(stages=3))  # 256 KB of shared memory
    with pytest.raises(ValueError, match="64 heads"):
        CM.compressed_attention_mgpu(*[jnp.zeros(s, jnp.bfloat16) for s in ((1, 1, 8, 128), (1, 1, 128),
                                                                           (1, 4, 128))],
                                     jnp.zeros((1,), jnp.int32), jnp.zeros((8,), jnp.float32))
    # decode splits: about one wave of 132 programs, at least 2 blocks of 64 rows a split
    assert CM.default_config(1, 1024, 32).splits == 4
    assert CM.default_config(1, 8192, 64).splits == 2
    assert CM.default_config(1, 8192, 8).splits == 16
    assert CM.default_config(1, 100, 1).splits == 1
    # prefill: one wave of resident programs walking the tokens, unsplit; one program a token where that is fewer
    assert CM.default_config(4096, 1024, 1) == CM.MgpuAttnConfig(bk=64, stages=2, splits=1, programs=132)
    assert CM.default_config(4096, 0, 4, sms=114).programs == 28
    assert CM.default_config(100, 0, 2).programs == 66 and CM.default_config(60, 0, 4).programs == 33
    assert CM.default_config(64, 0, 4, 512).programs == 33 and CM.default_config(16, 0, 8).programs == 0
    assert CM.default_config(1, 1024, 32).programs == 0
    q, kv, ring, rows, sink = _inputs(rng(2), 1, 4, 128, 8, 8)
    with pytest.raises(ValueError, match="one split"):  # refused while tracing, before anything runs
        CM.compressed_attention_mgpu(q, kv, ring, jnp.asarray([9]), sink, rows, ratio=4,
                                     config=CM.MgpuAttnConfig(splits=2, programs=2))
    monkeypatch.setattr(CM, "available", lambda: True)
    assert CA.use_mgpu(1, 4096, 64, 512, dense=False) and CA.use_mgpu(1, 4096, 64, 512, dense=True)
    assert CA.use_mgpu(32, 1, 64, 512, dense=True) and not CA.use_mgpu(4, 1, 64, 512, dense=True)
    assert not CA.use_mgpu(32, 1, 64, 512, dense=False)  # the window alone stays with Triton in decode
    assert not CA.use_mgpu(1, 4096, 64, 512, dense=True, idx=jnp.zeros((1, 1, 1), jnp.int32))
    assert not CA.use_mgpu(1, 4096, 16, 512, dense=True)
    monkeypatch.setattr(CM, "available", lambda: False)
    assert not CA.use_mgpu(1, 4096, 64, 512, dense=True)
    # the interpreter needs a CPU thread for each of the kernel's 3 warpgroups: refused, not a hang
    monkeypatch.setenv("NPROC", "2")
    assert CM.interpreter_threads() == 2
    q, kv, ring, rows, sink = _inputs(rng(3), 1, 2, 128, 8, 4)
    with pytest.raises(RuntimeError, match="NPROC"):
        CM.compressed_attention_mgpu(q, kv, ring, jnp.asarray([5]), sink, rows, ratio=4, interpret=True)


@pytest.mark.parametrize("b,t,n_rows,d", [(1, 256, 1024, 512), (4, 1, 8192, 512), (2, 1, 0, 512), (1, 100, 30, 384)])
def test_kernel_lowers_for_hopper_on_cpu(b, t, n_rows, d):
    """Mosaic GPU lowers the kernel (layout inference, the wgmma operands, TMA offsets proven multiples of 8,
    shared memory within the SM's) for a CUDA device without one, at Flash's dimensions and with 3 key slots."""
    mgpu_lowering_or_skip()
    sd = jax.ShapeDtypeStruct

    def f(q, kv, ring, pos0, sink, rows):
        return CM.compressed_attention_mgpu(q, kv, ring, pos0, sink, rows, ratio=128)

    args = (sd((b, t, 64, d), jnp.bfloat16), sd((b, t, d), jnp.bfloat16), sd((b, 128, d), jnp.bfloat16),
            sd((b,), jnp.int32), sd((64,), jnp.float32), sd((b, n_rows, d), jnp.bfloat16) if n_rows else None)
    low = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in low.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n_rows,ratio,pos0,count,splits,d", [
    (1, 300, 0, 1, [0], None, 1, 512),  # prefill, window only (window rows from any offset)
    (2, 200, 40, 128, [5000, 100], None, 1, 512),  # continued chunks
    (2, 333, 90, 4, [0, 61], None, None, 256),  # d = 256 (two column tiles a half), resident programs
    (1, 150, 20, 4, [3], None, None, 128),  # d = 128 (one column tile a half)
    (3, 1, 1000, 128, [130000, 5, 127], [900, 0, 1], None, 512),  # decode, counts, the default splits
    (4, 1, 8192, 128, [1048575, 1000000, 777, 300000], None, None, 512),  # 1M tokens
    (2, 1, 4096, 128, [524287, 9999], None, 8, 512),
    (40, 1, 64, 128, None, None, None, 512)])  # a batch past the dispatch threshold, through the model's entry
def test_gpu_kernel_equals_reference(b, t, n_rows, ratio, pos0, count, splits, d):
    if not CM.available():
        pytest.skip("needs a Hopper GPU")
    r = rng(b + t)
    q, kv, ring, rows, sink = _inputs(r, b, t, d, 128, n_rows)
    if pos0 is None:
        pos0 = r.integers(n_rows * ratio, n_rows * ratio + 100, b)
    pos0 = jnp.asarray(pos0)
    count = None if count is None else jnp.asarray(count)
    if pos0.shape[0] == 40:
        assert CA.use_mgpu(b, t, 64, d, dense=True)
        o = kernels.window_attention(q, kv, ring, pos0, rows, None, sink, ratio, jnp.bfloat16)
    else:
        cfg = None if splits is None else CM.MgpuAttnConfig(splits=splits)
        o = CM.compressed_attention_mgpu(q, kv, ring, pos0, sink, rows, ratio=ratio, count=count, config=cfg)
    ref = CA.compressed_attention_reference(q, kv, ring, pos0, sink, rows, ratio=ratio, count=count)
    assert o.shape == q.shape and rel(o, ref) < ATTN_TOL
