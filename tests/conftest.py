import os
import sys

# Tests run on the CPU unless asked otherwise (GPU tests: JAX_PLATFORMS=cuda pytest -m gpu).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tiny models compile many small programs; XLA's backend optimisations cost more than they save here.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
sys.path.insert(0, os.path.dirname(__file__))

import jax

jax.config.update("jax_default_matmul_precision", "highest")
