"""The GPU kernels over the structurally different configurations of ``test_config_sweep.py`` (heads 2-8, head
widths 64-96 with 16-64 rotary dims, indexers of 3-4 heads x 32-128 dims with top-k 1-64, windows 1-32, HCA ratios
2-128, hidden sizes 64-192): the model with its kernels (bf16, ``kernels.ENABLED``) against the same model with the
pure-JAX references on the same GPU, and decode after a ragged prefill with the kernels against ``forward``. The
kernels pad what they do not take natively (heads, widths, indexer heads), so these shapes take paths Flash's
miniature in ``test_model_gpu.py`` does not. Run on a GPU machine:
``JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_config_sweep_gpu.py``."""

import jax
import numpy as np
import pytest
from test_config_sweep import CASES, DECODE

import dsv4_jax as d
from dsv4_jax import kernels

pytestmark = pytest.mark.gpu


def _logits(model, tokens, enabled: bool) -> np.ndarray:
    kernels.ENABLED = enabled
    jax.clear_caches()
    try:
        return np.asarray(d.forward(model, tokens), np.float32)
    finally:
        kernels.ENABLED = True
        jax.clear_caches()


def _per_position(a, b) -> np.ndarray:
    return np.abs(a - b).max(-1) / np.abs(b).max()


@pytest.fixture(autouse=True)
def _gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_equal_references(name):
    """bf16 tolerance as test_model_gpu.py: the median position within 2% of the logit scale, 95% within 10%
    (bf16 rounding, and the rare top-k or routing flip it causes)."""
    case = CASES[name]
    model = d.random_model(case.config, seed=21)
    tokens = np.random.default_rng(22).integers(0, case.config.vocab_size, (case.batch, case.t))
    err = _per_position(_logits(model, tokens, True), _logits(model, tokens, False))
    print(f"{name}: kernels vs references: median {np.median(err):.2e}, p95 {np.quantile(err, 0.95):.2e}")
    assert np.median(err) < 0.02 and np.quantile(err, 0.95) < 0.1


@pytest.mark.parametrize("name", DECODE)
def test_decode_with_kernels_equals_forward(name):
    """prefill (rows of different lengths) then decode_step token by token, with the kernels, against forward with
    the kernels: the same bf16 tolerance at every step."""
    case = CASES[name]
    lengths, end = np.array(case.decode[0]), case.decode[1]
    model = d.random_model(case.config, seed=23)
    tokens = np.random.default_rng(24).integers(0, case.config.vocab_size, (case.batch, case.t))
    full = np.asarray(d.forward(model, tokens), np.float32)
    logits, cache = d.prefill(model, tokens[:, : lengths.max()], max_len=case.t, lengths=lengths)
    errs = [_per_position(np.asarray(logits, np.float32)[b, :n], full[b, :n]) for b, n in enumerate(lengths)]
    rows = np.arange(case.batch)
    for k in range(end - lengths.max()):
        step, cache = d.decode_step(model, tokens[rows, lengths + k], cache)
        errs.append(_per_position(np.asarray(step, np.float32), full[rows, lengths + k]))
    err = np.concatenate(errs)
    print(f"{name}: decode vs forward (kernels): median {np.median(err):.2e}, max {err.max():.2e}")
    assert np.median(err) < 0.02 and np.quantile(err, 0.95) < 0.1
