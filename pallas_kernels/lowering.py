"""Lowering the Pallas-Triton kernels for an sm_90 GPU on a machine without one (the lowering tests and
``scripts/inspect_kernels.py``). Pallas-Triton asks the runtime which GPU it targets; :func:`sm90` answers for
it, and can keep each Triton module it lowers. This uses JAX internals: where a JAX version lacks them,
:class:`LoweringUnavailable` says so."""

from __future__ import annotations

import contextlib

import jax
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"


class LoweringUnavailable(RuntimeError):
    """This JAX lacks the Pallas-Triton internals that lowering without a GPU needs."""


@contextlib.contextmanager
def sm90(modules: list[str] | None = None):
    """Inside, Pallas-Triton lowers for an sm_90 GPU; with ``modules``, the MLIR text of every Triton module it
    lowers is appended to it."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg

        info = reg.gpu_info_lib.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
        get_info, lower = reg.gpu_info_lib.get_gpu_info, reg.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError, TypeError) as e:
        raise LoweringUnavailable(f"JAX {jax.__version__} has no hook to lower Pallas-Triton without a GPU: {e}")

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    reg.gpu_info_lib.get_gpu_info = lambda: info
    if modules is not None:
        reg.lowering.lower_jaxpr_to_triton_module = keep
    try:
        yield
    finally:
        reg.gpu_info_lib.get_gpu_info = get_info
        reg.lowering.lower_jaxpr_to_triton_module = lower


def export_for_cuda(fn, *args) -> export.Exported:
    """``jax.export`` of ``jit(fn)(*args)`` (arrays or ``ShapeDtypeStruct``) for CUDA, Triton calls allowed; call
    it inside :func:`sm90`."""
    allow = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*args)
