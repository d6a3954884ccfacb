"""Expert parallelism: a model whose routed experts are sharded over a mesh's "expert" axis computes what the
same model computes on one device, moves no expert weights between devices, and generates the same tokens (also
through `dsv4-jax sample --expert-parallel N`).
Runs in a subprocess with four CPU devices (a "data" 2 x "expert" 2 mesh, and an "expert" 4 mesh)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import dsv4_jax as d
from dsv4_jax.generation import decode_step, prefill

_SCRIPT = textwrap.dedent("""
    import contextlib
    import io
    import re
    import tempfile
    import jax, numpy as np
    from jax.sharding import Mesh
    import dsv4_jax as d
    from dsv4_jax import kernels
    from dsv4_jax.__main__ import main
    from dsv4_jax.generation import decode_step, generate, prefill

    assert len(jax.devices()) == 4
    config = d.tiny(n_routed_experts=8, num_experts_per_tok=3, vocab_size=512)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 37))
    meshes = {"data2_expert2": Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "expert")),
              "expert4": Mesh(np.array(jax.devices()), ("expert",))}
    for name, dtype, tol in (("data2_expert2", "float32", 1e-5), ("expert4", "bfloat16", 2e-2)):
        mesh = meshes[name]
        single = d.random_model(config, seed=1, dtype=dtype)
        sharded = single.on_mesh(mesh)
        w = sharded.params.layers[3].ffn.experts.w1.weight
        assert {s.data.shape[0] for s in w.addressable_shards} == {8 // mesh.shape["expert"]}
        a, b = np.asarray(d.forward(single, tokens)), np.asarray(d.forward(sharded, tokens))
        err = np.abs(a - b).max() / np.abs(a).max()
        assert err < tol, (name, dtype, err)
        hlo = d.model._forward.lower(sharded, tokens).compile().as_text()
        assert "all-gather" not in hlo, "expert weights were gathered"
        assert re.search(r"all-reduce", hlo), "no psum over the expert axis"
        # The GPU kernels' layout keeps the expert sharding.
        q = kernels.prepare_weights(sharded.params).layers[3].ffn.experts.w1.qweight
        assert q.sharding.spec == jax.sharding.PartitionSpec("expert"), q.sharding
        assert {s.data.shape[0] for s in q.addressable_shards} == {8 // mesh.shape["expert"]}
    # A mesh without an "expert" axis would shard nothing: refused, naming the axes.
    try:
        d.random_model(config, seed=1).on_mesh(Mesh(np.array(jax.devices()), ("experts",)))
        raise AssertionError("a mesh without an 'expert' axis was accepted")
    except ValueError as e:
        assert "no 'expert' axis" in str(e) and "('experts',)" in str(e), e
    # Incremental decoding on the mesh equals the whole forward; greedy generation equals one device's
    # (float32, where the psum's order of addition cannot flip a token).
    single = d.random_model(config, seed=1, dtype="float32")
    sharded = single.on_mesh(meshes["data2_expert2"])
    full = np.asarray(d.forward(sharded, tokens))
    logits, cache = prefill(sharded, tokens[:, :33], max_len=40)
    for i in range(33, 37):
        step, cache = decode_step(sharded, tokens[:, i], cache)
        err = np.abs(np.asarray(step) - full[:, i]).max() / np.abs(full).max()
        assert err < 1e-4, ("decode", i, err)
    prompts = [list(map(int, tokens[0, :9])), list(map(int, tokens[1, :5]))]
    kw = dict(max_new_tokens=4, ignore_eos=True)
    assert generate(sharded, prompts, **kw) == generate(single, prompts, **kw)

    # The command line: --expert-parallel 4 samples what one device samples (greedy, float32); 3 devices do not
    # divide 8 experts and are refused before any work.
    ckpt = tempfile.mkdtemp() + "/ckpt"
    d.save_checkpoint(d.random_model(d.tiny(n_routed_experts=8, vocab_size=129280), seed=2), ckpt)
    outs = []
    for n in ("1", "4"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["sample", "--checkpoint", ckpt, "--expert-parallel", n, "--max-new-tokens", "4",
                         "--temperature", "0", "--dtype", "float32", "--quiet", "--ignore-eos",
                         "--no-compile-cache"]) == 0
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] and outs[0].strip(), outs
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["sample", "--checkpoint", ckpt, "--expert-parallel", "3", "--quiet", "--no-compile-cache"]) == 2
    assert "does not divide" in err.getvalue(), err.getvalue()
    for n, msg in (("5", "there are 4 cpu device(s)"), ("-1", ">= 1, or 0 for all")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["sample", "--checkpoint", ckpt, "--expert-parallel", n, "--quiet"]) == 2
        assert msg in err.getvalue(), err.getvalue()
    try:
        d.load_model(ckpt, mesh=Mesh(np.array(jax.devices()), ("data",)), progress=False)
        raise AssertionError("load_model accepted a mesh without an 'expert' axis")
    except ValueError as e:
        assert "no 'expert' axis" in str(e), e
    print("ok")
""")


def test_expert_parallel_model_equals_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # (keeping conftest.py's XLA flags)
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.gpu
def test_gpu_expert_parallel_with_kernels():
    """On two or more GPUs: the expert-parallel model with the Pallas kernels (bf16) against the same model on
    one GPU — logits to bf16 tolerance, and decode after prefill against the sharded forward."""
    gpus = [x for x in jax.devices() if x.platform == "gpu"]
    if len(gpus) < 2:
        pytest.skip("needs two GPUs")
    config = d.tiny(n_routed_experts=8, num_experts_per_tok=3, vocab_size=512, max_position_embeddings=4096)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 300))
    single = d.random_model(config, seed=1)
    sharded = single.on_mesh(Mesh(np.array(gpus[:2]), ("expert",)))
    a, b = np.asarray(d.forward(single, tokens)), np.asarray(d.forward(sharded, tokens))
    err = np.abs(a - b).max(-1) / np.abs(a).max()
    print(f"sharded vs one GPU: median {np.median(err):.2e}, max {err.max():.2e}")
    assert np.median(err) < 0.02
    _, cache = prefill(sharded, tokens[:, :280], max_len=300)
    errs = []
    for i in range(280, 290):
        step, cache = decode_step(sharded, tokens[:, i], cache)
        errs.append(np.abs(np.asarray(step) - b[:, i]).max(-1) / np.abs(b).max())
    print(f"sharded decode vs sharded forward: median {np.median(errs):.2e}")
    assert np.median(errs) < 0.02
