"""The GPU kernels over the structurally different configurations of ``test_config_sweep.py`` (heads 2-8, head
widths 64-96 with 16-64 rotary dims, indexers of 1-4 heads x 32-128 dims with top-k 1-64, windows 1-34, HCA ratios
2-128, hidden sizes 64-192): the model with its kernels (bf16, ``kernels.ENABLED``) against the same model with the
pure-JAX references on the same GPU (measured against the bf16 noise of each configuration), and decode after a
ragged prefill with the kernels against ``forward``. The kernels pad what they do not take natively (heads,
widths, indexer heads), so these shapes take paths Flash's miniature in ``test_model_gpu.py`` does not. About
100 s a configuration on an H200, most of it compiling. Run on a GPU machine:
``JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_config_sweep_gpu.py``."""

import jax
import numpy as np
import pytest
from kernel_utils import model_logits, per_position
from test_config_sweep import CASES, DECODE

import dsv4_jax as d

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_equal_references(name):
    """The kernels change the bf16 model's logits no more than bf16 itself does. The yardstick is each
    configuration's own bf16 noise: the bf16 references against the float32 model with the same weights. Small
    random models differ in how much bf16 moves them (median 0.6-2.7% of the logit scale in Pallas' interpreter
    on the CPU), and a few positions in each jump where a routing or top-k choice sits on a near-tie that any
    rounding flips (ARCHITECTURE.md §11.2); both paths meet such flips, at different positions. So: the median
    position within max(2%, 1.5x the noise's median) and the mean within max(5%, 2x the noise's mean)."""
    case = CASES[name]
    model = d.random_model(case.config, seed=21)
    tokens = np.random.default_rng(22).integers(0, case.config.vocab_size, (case.batch, case.t))
    ref = model_logits(model, tokens, False)
    f32 = model_logits(d.random_model(case.config, seed=21, dtype="float32"), tokens, False)
    err = per_position(model_logits(model, tokens, True), ref)
    noise = per_position(ref, f32)
    print(f"{name}: kernels vs references: median {np.median(err):.2e}, mean {err.mean():.2e}, "
          f"p95 {np.quantile(err, 0.95):.2e}; bf16 references vs float32: median {np.median(noise):.2e}, "
          f"mean {noise.mean():.2e}")
    assert np.median(err) < max(0.02, 1.5 * np.median(noise)), "median"
    assert err.mean() < max(0.05, 2 * noise.mean()), "mean"


@pytest.mark.parametrize("name", DECODE)
def test_decode_with_kernels_equals_forward(name):
    """prefill (rows of different lengths) then decode_step token by token, with the kernels, against forward with
    the kernels (decode runs other kernels than a prompt: other roundings, other near-tie flips): the median
    position within 2% of the logit scale, the mean within 5%."""
    case = CASES[name]
    lengths, end = np.array(case.decode[0]), case.decode[1]
    model = d.random_model(case.config, seed=23)
    tokens = np.random.default_rng(24).integers(0, case.config.vocab_size, (case.batch, case.t))
    full = np.asarray(d.forward(model, tokens), np.float32)
    logits, cache = d.prefill(model, tokens[:, : lengths.max()], max_len=case.t, lengths=lengths)
    errs = [per_position(np.asarray(logits, np.float32)[b, :n], full[b, :n]) for b, n in enumerate(lengths)]
    rows = np.arange(case.batch)
    for k in range(end - lengths.max()):
        step, cache = d.decode_step(model, tokens[rows, lengths + k], cache)
        errs.append(per_position(np.asarray(step, np.float32), full[rows, lengths + k]))
    err = np.concatenate(errs)
    print(f"{name}: decode vs forward (kernels): median {np.median(err):.2e}, mean {err.mean():.2e}, "
          f"max {err.max():.2e}")
    assert np.median(err) < 0.02 and err.mean() < 0.05
