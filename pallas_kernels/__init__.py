"""Pallas-Triton GPU kernels of dsv4_jax, one file per kernel, each with its pure-JAX reference:

* :mod:`.nvfp4_layout`  kernel layout of NVFP4 weights (exact, reversible repacking) and the E2M1 decoders;
* :mod:`.nvfp4_matmul`  dense NVFP4 x bf16 (W4A16) matmul;
* :mod:`.nvfp4_moe`     grouped NVFP4 routed experts (w1/w3 + clipped SwiGLU, w2 with routing weights);
* :mod:`.fp8_matmul`    FP8 e4m3 x bf16 with 128x128 power-of-two block scales;
* :mod:`.fp8_matmul_mgpu`  the same for decode shapes on Hopper in Mosaic GPU (``plgpu``), a second backend
  that ``fp8_matmul`` dispatches where it measured faster;
* :mod:`.nvfp4_mgpu`    NVFP4 decode-shaped matmuls (dense and grouped MoE) on Hopper in Mosaic GPU, reading the
  same packed weights, which ``nvfp4_matmul`` and ``nvfp4_moe`` dispatch where they measured faster;
* :mod:`.nvfp4_act`     W4A4 option (activations quantised to NVFP4 with the checkpoint's input_scale);
* :mod:`.compressed_attention`  window + compressed-row attention (SWA / CSA / HCA), prefill and decode;
* :mod:`.compressed_attention_mgpu`  the window and HCA layers (no selection) on Hopper in Mosaic GPU, which
  ``compressed_attention`` dispatches where it measured faster;
* :mod:`.indexer_topk`  Lightning Indexer scoring and exact top-k selection;
* :mod:`.indexer_mgpu`  the indexer's prefill scoring on Hopper in Mosaic GPU, which ``indexer_topk.index_select``
  dispatches;
* :mod:`.sinkhorn`      the Sinkhorn normalisation of the mHC mixing matrices in one launch (compiles in seconds
  where XLA's fusion of the unrolled rounds took minutes);
* :mod:`.lowering`      lowering the kernels for an sm_90 GPU without one (tests, ``scripts/inspect_kernels.py``).

The model chooses between kernels and references in one place, ``dsv4_jax.kernels``.

Public entry points (the modules keep their own names; import functions from them):
``nvfp4_matmul.nvfp4_matmul``, ``nvfp4_moe.nvfp4_moe``, ``fp8_matmul.fp8_matmul``, ``nvfp4_act.w4a4_matmul``,
``nvfp4_layout.pack_nvfp4`` / ``unpack_nvfp4``, ``sinkhorn.sinkhorn``, each beside its ``*_reference``.
"""

import dsv4_jax  # noqa: F401  (first: dsv4_jax.kernels imports these modules, which use dsv4_jax.quant)

from . import fp8_matmul, nvfp4_act, nvfp4_layout, nvfp4_matmul, nvfp4_moe
from .nvfp4_layout import Nvfp4Packed, pack_nvfp4, unpack_nvfp4

__all__ = ["Nvfp4Packed", "fp8_matmul", "nvfp4_act", "nvfp4_layout", "nvfp4_matmul", "nvfp4_moe", "pack_nvfp4",
           "unpack_nvfp4"]
