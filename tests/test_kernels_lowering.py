"""Every Pallas kernel the model launches lowers to Triton for a GPU, on the CPU, for structurally different
configurations: Pallas' interpreter (the other CPU tests) accepts shapes that Triton refuses (its tiles must
have power-of-two sizes), so without this a head size of 192 or 5 indexer heads worked on the CPU and stopped
on the GPU. The model's prefill and decode steps are exported for CUDA with the kernels on (nothing is
compiled or run). Needs JAX's private GPU-info hook; skipped where a JAX version lacks it."""

import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax import kernels
from dsv4_jax.cache import init_cache
from dsv4_jax.generation import _step_fn
from pallas_kernels import fp8_matmul as F8
from pallas_kernels import lowering

CONFIGS = {
    "tiny": {},
    "head_dim_192": {"head_dim": 192},
    "index_heads_5": {"index_n_heads": 5, "index_topk": 7},
    "heads_3": {"num_attention_heads": 3, "o_groups": 1},
    "heads_12_hidden_320": {"num_attention_heads": 12, "o_groups": 4, "hidden_size": 320, "q_lora_rank": 96,
                            "o_lora_rank": 96, "n_routed_experts": 5, "num_experts_per_tok": 3,
                            "moe_intermediate_size": 96},
}


@contextlib.contextmanager
def _lowering_for_gpu():
    """Kernels on, and Pallas-Triton told it targets an sm_90 GPU (no GPU needed to lower)."""
    on_gpu = kernels.on_gpu
    kernels.on_gpu = lambda: True
    try:
        with lowering.sm90():
            yield
    except lowering.LoweringUnavailable as e:
        pytest.skip(str(e))
    finally:
        kernels.on_gpu = on_gpu


def _lowered_step(model: d.Model, t: int, max_len: int = 512) -> str:
    """The model's step over ``t`` tokens of 2 sequences (prefill chunk or decode), lowered for an sm_90 GPU:
    its StableHLO text, with the Triton kernels as custom calls named after the kernels."""
    cache = init_cache(model.config, 2, max_len, jnp.bfloat16)
    with _lowering_for_gpu():
        exp = lowering.export_for_cuda(lambda m, c, tok, n: _step_fn(m, c, tok, n, False),
                                       model, cache, jnp.ones((2, t), jnp.int32), jnp.full((2,), t, jnp.int32))
    return exp.mlir_module()


def _triton_kernels(text: str) -> set[str]:
    """Names of the Triton launches in a lowered module (the text also names source files, so a plain substring
    test of a kernel's name would pass on its module's file name)."""
    return set(re.findall(r'name = "([a-z0-9_]+)"', text))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_kernels_lower_for_gpu(name):
    model = d.random_model(d.tiny(vocab_size=256, **CONFIGS[name]), seed=0, kernel_layout=True)
    for t in (300, 1):  # a prefill chunk, a decode step
        names = _triton_kernels(_lowered_step(model, t))
        # (larger FP8 products go through exact dequantisation + XLA's dot instead)
        for kernel in ("compressed_attention", "nvfp4_moe", "indexer_scores" if t > 1 else "fp8_block_matmul"):
            assert any(n.startswith(kernel) for n in names), (t, kernel, names)


@pytest.mark.parametrize("t", [300, 1])
def test_model_with_the_hopper_kernels_lowers_for_gpu(t, monkeypatch):
    """With the Hopper dispatch on (``available`` faked), the model's prefill chunk and decode step lower for
    CUDA with the Mosaic GPU NVFP4 kernels of the routed experts (sorted blocks for 600 (token, expert) pairs,
    one block per pair for 2 tokens) beside the Triton kernels."""
    from pallas_kernels import nvfp4_mgpu

    monkeypatch.setattr(nvfp4_mgpu, "available", lambda: True)
    model = d.random_model(d.tiny(vocab_size=256), seed=0, kernel_layout=True)
    jax.clear_caches()  # (a step traced without the patch would be reused)
    try:
        text = _lowered_step(model, t)
    finally:
        jax.clear_caches()
    triton = _triton_kernels(text)
    assert "nvfp4_block_gemv_mgpu" in text and not any(n.startswith("nvfp4_moe") for n in triton)
    assert "compressed_attention" in triton


@pytest.mark.slow
def test_model_with_interpreted_kernels_is_as_close_to_float32_as_the_references():
    """The whole model with its kernels (Pallas' interpreter, bf16) against the float32 model, beside the bf16
    references against the same float32 model, on a configuration that needs the padding of heads and head
    sizes (3 heads of 192, 5 indexer heads): the kernels' error is that of bf16 (median within 1.5x of the
    references' + 0.005 of the logit scale), and decode after a ragged prefill follows ``forward``."""
    from dsv4_jax.generation import decode_step, prefill

    config = d.tiny(vocab_size=256, num_attention_heads=3, o_groups=1, head_dim=192, index_n_heads=5)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 45))
    f32 = np.asarray(d.forward(d.random_model(config, seed=2, dtype="float32"), tokens))
    model = d.random_model(config, seed=2)
    scale = np.abs(f32).max()
    ref_err = np.median(np.abs(np.asarray(d.forward(model, tokens)) - f32).max(-1)) / scale
    kernels.INTERPRET = True
    jax.clear_caches()
    try:
        ker = np.asarray(d.forward(model, tokens))
        _, cache = prefill(model, tokens[:, :40], max_len=48, lengths=[40, 33])
        step, _ = decode_step(model, np.array([tokens[0, 40], tokens[1, 33]]), cache)
    finally:
        kernels.INTERPRET = False
        jax.clear_caches()
    ker_err = np.median(np.abs(ker - f32).max(-1)) / scale
    print(f"median error vs float32: kernels {ker_err:.4f}, references {ref_err:.4f}")
    assert ker_err < 1.5 * ref_err + 0.005
    assert np.abs(np.asarray(step)[0] - ker[0, 40]).max() / scale < 0.05


def test_w4a4_model_lowers_for_gpu():
    """``Numerics(w4a4=True)``: the routed experts' products go through the W4A4 matmul kernel (one expert at a
    time, not the grouped kernel) and lower for the GPU."""
    model = d.random_model(d.tiny(vocab_size=256), seed=0, kernel_layout=True)
    text = _lowered_step(dataclasses.replace(model, numerics=d.Numerics(w4a4=True)), 1, max_len=64)
    names = _triton_kernels(text)
    assert "nvfp4_matmul" in names and not any(n.startswith("nvfp4_moe") for n in names)


def test_inspect_kernels_script_writes_triton_ir(tmp_path):
    """``scripts/inspect_kernels.py`` (kernel IR for an sm_90 GPU, lowered on the CPU) runs and writes each
    launch's Triton IR."""
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "inspect_kernels.py"), "--out", str(tmp_path),
                          "--only", "fp8"], capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| fp8_8192x8192_m1 | fp8_block_matmul |"))
    cfg = F8.default_config(1, 8192, 8192)  # the launch's own warps / stages, read from its Triton call
    assert f"| {cfg.num_warps} / {cfg.num_stages} |" in row
    files = list(tmp_path.glob("fp8_8192x8192_m1_*.ttir"))
    assert len(files) == 1 and "tt.func" in files[0].read_text()
