"""Loading and saving checkpoints (CHECKPOINT.md): ``load_model`` reads a checkpoint directory (Format Q, the
ModelOpt NVFP4 release; Format N, the original DeepSeek release; or transformers' layout) or an orbax cache
made by :func:`save_cache`, and ``save_checkpoint`` writes any of the three layouts.

Reading is lazy and streaming: shards are memory-mapped, each parameter is assembled on the host from its
tensors (for routed experts only the experts a device owns) and moved to its device before the next one is
read, in shard order, so the host never holds more than one parameter. Nothing is ever written into the
checkpoint directory. Every failure of CHECKPOINT.md §7 raises a ``CheckpointError`` naming the file and the
tensor or key; tolerated defects warn (``CheckpointWarning``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from . import kernels, sharding, weights
from .config import Config
from .model import DType, Model, check_dtype
from .quant import Fp8Block, Mxfp4, Nvfp4
from .safetensors_io import (
    BadQuantManifest,
    CheckpointError,
    InconsistentQuantManifest,
    InsufficientMemory,
    ShardWriter,
    UnexpectedTensor,
    UnsupportedConfig,
    UnsupportedMoeQuant,
    UnsupportedQuantConfig,
    open_shards,
    read_index,
)

CACHE_MANIFEST = "dsv4_cache.json"
CheckpointFormat = weights.CheckpointFormat
GiB = float(1 << 30)


# ---------------------------------------------------------------------------------------------------------
# Configuration files (CHECKPOINT.md §7.2)


def _read_json(path: Path, err: type[CheckpointError] = UnsupportedConfig) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise err(f"{path}: no such file") from None
    except IsADirectoryError:
        raise err(f"{path}: a directory, not a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise err(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def _read_config_json(source: Path) -> dict:
    """A ``config.json`` that must hold a JSON object."""
    d = _read_json(source)
    if not isinstance(d, dict):
        raise UnsupportedConfig(f"{source}: not a JSON object")
    return d


def _check_quantization_config(q: Any, source: str) -> None:
    """§7.2.4: FP8 e4m3 linears with UE8M0 128x128 block scales; NVFP4 group-16 experts if announced."""
    if not isinstance(q, dict):
        raise UnsupportedQuantConfig(f"{source}: key 'quantization_config' is not an object")
    want = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    for k, v in want.items():
        if q.get(k, v if k in ("fmt", "scale_fmt") else None) != v:
            raise UnsupportedQuantConfig(
                f"{source}: key 'quantization_config.{k}' is {q.get(k)!r}, expected {v!r}"
            )
    if "moe_quant_algo" in q and (q["moe_quant_algo"] != "NVFP4" or q.get("group_size", 16) != 16):
        raise UnsupportedMoeQuant(
            f"{source}: key 'quantization_config.moe_quant_algo' is {q['moe_quant_algo']!r} "
            f"with group_size {q.get('group_size')!r}; only 'NVFP4' with group 16 is supported"
        )


def read_config(path: Path, layout: weights.Layout) -> tuple[Config, set[str] | None]:
    """The model configuration of a checkpoint directory, and the set of routed-expert modules its
    quantisation manifests announce as NVFP4 (None if none does)."""
    source = path / "config.json"
    d = _read_config_json(source)
    if layout == "hf":
        if "quantization_config" in d:
            raise UnsupportedQuantConfig(
                f"{source}: key 'quantization_config': quantised checkpoints in the "
                "transformers layout are not supported"
            )
        return weights.config_from_hf(d, str(source)), None
    config = weights.config_from_native(d, str(source))
    announced = None
    if "quantization_config" in d:
        _check_quantization_config(d["quantization_config"], str(source))
        announced = weights.config_quantized_set(d["quantization_config"], str(source))
    manifest = path / "hf_quant_config.json"
    if manifest.exists():
        m = _read_json(manifest, BadQuantManifest)
        listed = weights.parse_manifest(m, str(manifest))
        if announced is not None and listed != announced:
            diff = sorted(listed ^ announced)
            warnings.warn(
                f"{manifest}: quantized layers differ from {source} (e.g. {diff[0]!r})",
                InconsistentQuantManifest,
                stacklevel=3,
            )
        announced = listed
        excluded = m["quantization"].get("exclude_modules")  # parse_manifest checked m["quantization"]
        ignored = (d.get("quantization_config") or {}).get("ignore")
        both = isinstance(excluded, list) and isinstance(ignored, list)
        diff = sorted(set(map(str, excluded)) ^ set(map(str, ignored))) if both else []
        if diff:
            warnings.warn(
                f"{manifest}: key 'quantization.exclude_modules' differs from {source}'s "
                f"'quantization_config.ignore' (e.g. {diff[0]!r})",
                InconsistentQuantManifest,
                stacklevel=3,
            )
    return config, announced


# ---------------------------------------------------------------------------------------------------------
# Loading


def _available_memory(devs: list[jax.Device]) -> int:
    """Free bytes per device: the accelerator's allocator limit, or for CPU devices the host's available
    memory shared among them."""
    stats = devs[0].memory_stats() if devs else None
    if stats and "bytes_limit" in stats:
        return min(d.memory_stats()["bytes_limit"] - d.memory_stats().get("bytes_in_use", 0) for d in devs)
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        avail = info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // len(devs)


def _check_fits(
    per_device: int, replicated: int, experts: int, mesh: Mesh | None, device_memory: int | None
) -> None:
    devs = sharding.devices(mesh)
    avail = _available_memory(devs) if device_memory is None else device_memory
    if per_device > avail:
        k = sharding.expert_shards(mesh)
        raise InsufficientMemory(
            f"the model needs {per_device / GiB:.2f} GiB per device ({replicated / GiB:.2f} GiB replicated + "
            f"{experts / GiB:.2f} GiB of routed experts split {k} way(s)) on {len(devs)} device(s) "
            f"({devs[0].platform}), but only {avail / GiB:.2f} GiB is free per device; use a mesh with a "
            f"larger {sharding.EXPERT_AXIS!r} axis"
        )


def checkpoint_config(path: str | os.PathLike) -> Config:
    """The model configuration of a checkpoint directory or orbax cache, read from its JSON and the shards'
    headers without reading any weight (what ``load_model`` will load; for refusing a request early)."""
    path = Path(path)
    if (path / CACHE_MANIFEST).exists():
        return weights.config_from_native(_read_config_json(path / "config.json"), str(path / "config.json"))
    index = read_index(path)
    infos = {name: t for shard in open_shards(path, index).values() for name, t in shard.tensors.items()}
    return read_config(path, weights.detect_layout(infos))[0]


def load_model(
    path: str | os.PathLike,
    *,
    dtype: DType = "bfloat16",
    mesh: Mesh | None = None,
    device_memory: int | None = None,
    progress: bool = True,
    kernel_layout: bool | None = None,
) -> Model:
    """Load a checkpoint directory (Format Q / N / transformers layout) or an orbax cache into a ``Model``.

    Weights stay in their stored formats (``Fp8Block``, ``Nvfp4``, ``Mxfp4``, bf16 / fp32 arrays; hash
    tables int32); ``dtype`` is the compute dtype. With ``mesh``, routed experts ``[E, ...]`` are sharded over
    its ``"expert"`` axis and every device reads only its experts; everything else is replicated. Before
    reading, the bytes per device are compared with ``device_memory`` (default: what the devices report
    free) and a placement that cannot fit raises ``InsufficientMemory``. ``progress`` shows a tqdm bar.

    ``kernel_layout``: repack the NVFP4 weights into the GPU kernels' layout once, here (exact, reversible,
    ``dsv4_jax.kernels.prepare_weights``); default: when the model will run them (bf16 on GPUs). The model
    then runs expert-parallel over ``mesh`` (``Model.mesh``)."""
    path = Path(path)
    check_dtype(dtype)  # (before any weight is read)
    if (path / CACHE_MANIFEST).exists():
        return _restore_cache(path, dtype=dtype, mesh=mesh, device_memory=device_memory,
                              kernel_layout=kernel_layout)
    index = read_index(path)
    shards = open_shards(path, index)
    infos, file_of = {}, {}
    for shard in shards.values():
        for name, t in shard.tensors.items():
            infos[name], file_of[name] = t, shard
    layout = weights.detect_layout(infos)
    config, announced = read_config(path, layout)
    sharding.check_mesh(mesh, config.n_routed_experts)

    def where(name: str) -> str:
        s = file_of.get(name)
        return str(s.path if s is not None else index.path)

    tree = weights.param_entries(config)
    entries, treedef = jax.tree.flatten(tree)
    sources = [weights.resolve(e, infos, layout, where) for e in entries]
    used = {n for s in sources for n in s.tensor_names()}
    extra = sorted(set(infos) - used)
    if extra:
        raise UnexpectedTensor(
            f"{where(extra[0])}: tensor {extra[0]!r} is not a parameter of this configuration "
            f"({len(extra)} such tensor(s))"
        )
    weights.check_expert_encodings(sources, announced, str(path / "hf_quant_config.json"))

    k = sharding.expert_shards(mesh)
    sizes = [weights.leaf_nbytes(s, infos) for s in sources]
    experts = sum(n for s, n in zip(sources, sizes) if sharding.is_routed_expert(s.entry.path))
    replicated = sum(sizes) - experts
    _check_fits(replicated + experts // k, replicated, experts, mesh, device_memory)

    order = sorted(
        range(len(sources)),
        key=lambda i: min((file_of[n].path.name, infos[n].begin) for n in sources[i].tensor_names()),
    )
    values: list[Any] = [None] * len(sources)

    def read(name: str) -> np.ndarray:
        return file_of[name].read(name)

    w13: dict[tuple, tuple] = {}
    total = sum(
        n if not sharding.is_routed_expert(s.entry.path) else n * _local_fraction(mesh)
        for s, n in zip(sources, sizes)
    )
    with tqdm(
        total=int(total),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"loading {path.name}",
        disable=not progress,
        smoothing=0.1,
    ) as bar:
        for i in order:
            src = sources[i]
            values[i], scales = _place(src, read, where, mesh)
            if src.format == "nvfp4" and src.entry.path[-1] in ("w1", "w3"):
                key = src.entry.path[:-1]
                if key not in w13:
                    w13[key] = (src, scales)
                else:
                    (w1, s1), (_, s3) = sorted([w13.pop(key), (src, scales)], key=lambda x: x[0].entry.path)
                    weights.check_w13(w1, s1, s3, where)
            bar.update(
                sum(infos[n].nbytes for n in src.tensor_names())
                * (_local_fraction(mesh) if sharding.is_routed_expert(src.entry.path) else 1)
            )
    for shard in shards.values():
        shard.close()
    return _finish(Model(config=config, params=jax.tree.unflatten(treedef, values), dtype=dtype, mesh=mesh),
                   kernel_layout)


def _finish(model: Model, kernel_layout: bool | None) -> Model:
    """Repack the NVFP4 weights for the kernels where they will run (see :func:`load_model`)."""
    if kernel_layout is None:
        kernel_layout = kernels.use_kernel_layout(model.dtype, sharding.devices(model.mesh))
    if not kernel_layout:
        return model
    return dataclasses.replace(model, params=kernels.prepare_weights(model.params, donate=True))


def _local_fraction(mesh: Mesh | None) -> float:
    """Share of the routed experts this process reads."""
    if mesh is None:
        return 1.0
    local = {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
    k = sharding.expert_shards(mesh)
    if k == 1:
        return 1.0
    axis = mesh.axis_names.index(sharding.EXPERT_AXIS)
    owned = {idx[axis] for idx in np.ndindex(mesh.devices.shape) if mesh.devices[idx] in local}
    return len(owned) / k


def _scalars(host) -> dict[str, np.ndarray] | None:
    """The NVFP4 global and input scales ``[E]`` of a host value, kept for the w1/w3 check."""
    if isinstance(host, Nvfp4):
        return {"weight_scale_2": host.weight_scale_2, "input_scale": host.input_scale}
    return None


def _place(src: weights.Source, read, where, mesh: Mesh | None):
    """Read one entry and put it on its devices; returns the device value and its NVFP4 scales (host)."""
    target = sharding.leaf_sharding(src.entry.path, mesh)
    if not (
        mesh is not None and sharding.is_routed_expert(src.entry.path) and sharding.expert_shards(mesh) > 1
    ):
        host = weights.read_leaf(src, read, where)
        return jax.device_put(host, target), _scalars(host)
    # Expert parallel: one read per distinct expert slice among this process's devices.
    e = src.entry.shape[0]
    index_map = target.addressable_devices_indices_map((e,))
    pieces: dict[tuple, Any] = {}
    for idx in index_map.values():
        key = idx[0].indices(e)[:2]
        if key not in pieces:
            pieces[key] = weights.read_leaf(src, read, where, slice(*key))
    placed = {d: jax.device_put(pieces[idx[0].indices(e)[:2]], d) for d, idx in index_map.items()}
    some = next(iter(pieces.values()))
    leaves0, tdef = jax.tree.flatten(some)
    arrays = []
    for j, leaf in enumerate(leaves0):
        shape = (e, *leaf.shape[1:])
        arrays.append(
            jax.make_array_from_single_device_arrays(
                shape, target, [jax.tree.leaves(placed[d])[j] for d in index_map]
            )
        )
    scal = [_scalars(p) for _, p in sorted(pieces.items())]
    scales = None if scal[0] is None else {k: np.concatenate([s[k] for s in scal]) for k in scal[0]}
    return jax.tree.unflatten(tdef, arrays), scales


# ---------------------------------------------------------------------------------------------------------
# Saving


def _atomic_dir(path: Path):
    """A temporary sibling directory that becomes ``path`` by one rename (never a half-written ``path``)."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def save_checkpoint(
    model: Model,
    path: str | os.PathLike,
    format: CheckpointFormat = "modelopt-nvfp4",
    *,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write ``model`` as a checkpoint directory; ``format``:

    * ``"modelopt-nvfp4"`` (Format Q, CHECKPOINT.md §5): native names, FP8 linears, routed experts of the
      main layers as NVFP4 quartets (MXFP4 cast losslessly, §5.4; NVFP4 kept; dense quantised with ModelOpt's
      quantiser, w1/w3 sharing global scales), MTP experts MXFP4, ``config.json`` (§5.6) and
      ``hf_quant_config.json`` (§5.5), a correct ``total_size``;
    * ``"native"`` (Format N, §3): the same with MXFP4 experts everywhere (I8 codes + E8M0 scales);
    * ``"hf"``: transformers' layout (quantised weights dequantised exactly to fp32, other arrays as stored,
      no MTP), a single ``model.safetensors`` when it fits in one shard, as ``save_pretrained`` writes it.

    Plain arrays keep their dtype. The directory is written under a temporary name and renamed when complete;
    ``path`` must not exist."""
    if format not in ("modelopt-nvfp4", "native", "hf"):
        raise ValueError(f"unknown checkpoint format {format!r}")
    path = Path(path)
    tmp = _atomic_dir(path)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        params = kernels.checkpoint_layout(model.params)
        for name, array in weights.checkpoint_tensors(params, model.config, format):
            writer.add(name, array)
        writer.finish(single_file=format == "hf")
        if format == "hf":
            cfg = weights.hf_config(model.config)
        else:
            cfg = weights.native_config(model.config, format)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if format == "modelopt-nvfp4":
            (tmp / "hf_quant_config.json").write_text(
                json.dumps(weights.hf_quant_config(model.config), indent=2)
            )
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------
# Orbax cache


def _format_of(leaf) -> str:
    return {Fp8Block: "fp8", Nvfp4: "nvfp4", Mxfp4: "mxfp4"}.get(type(leaf), "tensor")


_CLASSES = {"fp8": Fp8Block, "nvfp4": Nvfp4, "mxfp4": Mxfp4}


def save_cache(model: Model, path: str | os.PathLike) -> Path:
    """Save the parameter tree with orbax-checkpoint (plus ``config.json`` and a small manifest of each
    leaf's format, shapes and dtypes) so that :func:`load_model` can restore it straight into the requested
    shardings. Written atomically like :func:`save_checkpoint`."""
    import orbax.checkpoint as ocp

    path = Path(path)
    tmp = _atomic_dir(path)
    try:
        params = kernels.checkpoint_layout(model.params)  # the cache holds the checkpoint's bytes
        leaves = jax.tree.leaves(params, is_leaf=weights.is_weight)
        manifest = {
            "format": "dsv4_jax orbax cache",
            "version": 1,
            "leaves": [
                {
                    "format": _format_of(leaf),
                    "arrays": [[list(a.shape), np.dtype(a.dtype).name] for a in jax.tree.leaves(leaf)],
                }
                for leaf in leaves
            ],
        }
        ocp.PyTreeCheckpointer().save((tmp / "params").absolute(), params)
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _restore_cache(path: Path, *, dtype: DType, mesh: Mesh | None, device_memory: int | None,
                   kernel_layout: bool | None) -> Model:
    import orbax.checkpoint as ocp

    config = checkpoint_config(path)
    sharding.check_mesh(mesh, config.n_routed_experts)
    manifest = _read_json(path / CACHE_MANIFEST, CheckpointError)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("leaves", []), list):
        raise CheckpointError(f"{path / CACHE_MANIFEST}: not a cache manifest (an object with a list "
                              "'leaves')")
    entries, treedef = jax.tree.flatten(weights.param_entries(config))
    if len(manifest.get("leaves", [])) != len(entries):
        raise CheckpointError(
            f"{path / CACHE_MANIFEST}: {len(manifest.get('leaves', []))} leaves, the configuration "
            f"has {len(entries)}"
        )
    abstract, replicated, experts = [], 0, 0
    for entry, leaf in zip(entries, manifest["leaves"]):
        _check_cache_leaf(path, entry, leaf)
        s = sharding.leaf_sharding(entry.path, mesh)
        arrays = [
            jax.ShapeDtypeStruct(tuple(shape), np.dtype(dt), sharding=s) for shape, dt in leaf["arrays"]
        ]
        nbytes = sum(a.size * a.dtype.itemsize for a in arrays)
        if sharding.is_routed_expert(entry.path):
            experts += nbytes
        else:
            replicated += nbytes
        abstract.append(_CLASSES[leaf["format"]](*arrays) if leaf["format"] in _CLASSES else arrays[0])
    _check_fits(
        replicated + experts // sharding.expert_shards(mesh), replicated, experts, mesh, device_memory
    )
    target = jax.tree.unflatten(treedef, abstract)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    data = path / "params"
    if not data.is_dir():
        raise CheckpointError(f"{data}: the orbax cache has no parameter data (rebuild it: scripts/convert.py)")
    try:
        params = ocp.PyTreeCheckpointer().restore(
            data.absolute(), args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    except Exception as e:  # orbax / TensorStore errors on damaged data: name the cache, keep the cause
        raise CheckpointError(
            f"{data}: the orbax cache could not be read ({type(e).__name__}: {str(e)[:500]}); "
            "rebuild it from the checkpoint (scripts/convert.py)"
        ) from e
    return _finish(Model(config=config, params=params, dtype=dtype, mesh=mesh), kernel_layout)


def _is_dtype(name: Any) -> bool:
    """Whether a cache manifest's dtype entry names a NumPy dtype."""
    if not isinstance(name, str):
        return False
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def _check_cache_leaf(path: Path, entry: weights.Entry, leaf: dict) -> None:
    """The manifest's record of one leaf against what ``config.json`` implies for it (format allowed for the
    parameter, the shape of every array), so that a cache and a configuration that do not belong together are
    refused before anything is read, naming the parameter."""
    where = path / CACHE_MANIFEST
    if not isinstance(leaf, dict) or not isinstance(leaf.get("arrays"), list) or not all(
            isinstance(a, list) and len(a) == 2 and _is_dtype(a[1]) for a in leaf["arrays"]):
        raise CheckpointError(f"{where}: the record of parameter {entry.label} is damaged: {str(leaf)[:200]}")
    fmt = leaf.get("format")
    got = [shape for shape, _ in leaf["arrays"]]  # [[shape, dtype], ...]
    kinds = {"experts": ("nvfp4", "mxfp4", "fp8", "tensor"), "linear": ("fp8", "tensor")}
    allowed = kinds.get(entry.kind, ("tensor",))
    if fmt not in allowed:
        raise CheckpointError(
            f"{where}: parameter {entry.label} is stored as {fmt!r}, which it cannot hold "
            f"(expected {' or '.join(allowed)})"
        )
    if fmt == "tensor":
        want = [list(entry.shape)]
    else:
        lead, (out, inn) = list(entry.shape[:-2]), entry.shape[-2:]
        want = [lead + list(shape) for _, shape in weights.expected_parts(fmt, out, inn).values()]
    if got != want:
        raise CheckpointError(
            f"{where}: parameter {entry.label} is stored as {fmt} arrays of shapes {got}; the configuration "
            f"({path / 'config.json'}) needs {want}: the cache and its config.json do not match"
        )
