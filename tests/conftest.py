import os
import sys

# Tests run on the CPU unless asked otherwise (GPU tests: JAX_PLATFORMS=cuda pytest -m gpu).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tiny models compile many small programs; XLA's backend optimisations cost more than they save here.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Mosaic GPU's interpreter runs each warpgroup of a kernel as an XLA:CPU program whose callbacks block on the
# kernel's barriers, so XLA's CPU thread pool (NPROC threads, default one a core) must hold every warpgroup of a
# kernel at once: on a 2-core machine the 3-warpgroup attention kernel otherwise waits forever.
os.environ.setdefault("NPROC", str(max(4, os.cpu_count() or 1)))
sys.path.insert(0, os.path.dirname(__file__))

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop jax's compiled programs after each test module. The suite compiles thousands of small programs; with
    all of them kept alive, the process aborted inside XLA:CPU compilation late in the suite (twice, at the same
    test, which passes alone)."""
    yield
    jax.clear_caches()
