"""Lowering the Pallas-Triton kernels for an sm_90 GPU on a machine without one (the lowering tests and
``scripts/inspect_kernels.py``). Pallas-Triton asks the runtime which GPU it targets; :func:`sm90` answers for
it, and can keep each Triton module it lowers with the warps and stages of its launch. This uses JAX internals: where a JAX version lacks them,
:class:`LoweringUnavailable` says so."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"


class LoweringUnavailable(RuntimeError):
    """This JAX lacks the Pallas-Triton internals that lowering without a GPU needs."""


@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    """One lowered ``pallas_call``: its Triton module (MLIR text) and the warps / pipeline stages it asks for."""

    module: str
    num_warps: int
    num_stages: int


@contextlib.contextmanager
def sm90(launches: list[TritonLaunch] | None = None):
    """Inside, Pallas-Triton lowers for an sm_90 GPU; with ``launches``, every ``pallas_call`` it lowers is
    appended to it (its module, and the warps and stages of the Triton call it emits)."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg

        info = reg.gpu_info_lib.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
        get_info, lower = reg.gpu_info_lib.get_gpu_info, reg.lowering.lower_jaxpr_to_triton_module
        custom_call = reg.mlir.custom_call
    except (ImportError, AttributeError, TypeError) as e:
        raise LoweringUnavailable(f"JAX {jax.__version__} has no hook to lower Pallas-Triton without a GPU: {e}")
    pending: list[str] = []

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        pending.append(result.module.operation.get_asm())
        return result

    def call(*args, backend_config=None, **kwargs):
        # the Triton call of the module just lowered (the same pallas_call lowering emits both, in this order)
        if pending and isinstance(backend_config, dict) and "num_warps" in backend_config:
            launches.append(TritonLaunch(pending.pop(), backend_config["num_warps"].value,
                                         backend_config["num_stages"].value))
        return custom_call(*args, backend_config=backend_config, **kwargs)

    reg.gpu_info_lib.get_gpu_info = lambda: info
    if launches is not None:
        reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call = keep, call
    try:
        yield
    finally:
        reg.gpu_info_lib.get_gpu_info = get_info
        reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call = lower, custom_call


def export_for_cuda(fn, *args) -> export.Exported:
    """``jax.export`` of ``jit(fn)(*args)`` (arrays or ``ShapeDtypeStruct``) for CUDA, Triton calls allowed; call
    it inside :func:`sm90`."""
    allow = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*args)
