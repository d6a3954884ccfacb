"""The safetensors container (CHECKPOINT.md §3.1, §7.1), read and written without the ``safetensors`` package.

A shard is ``u64 little-endian header length | JSON header | payload``; the header maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the payload) plus an optional
``__metadata__`` string map. ``safetensors``' numpy path fails on ``F8_E4M3`` (KERNELS.md §10), so shards are
parsed here and tensors are zero-copy ``np.memmap`` views in their ml_dtypes type. This module also holds the
exceptions and warnings of every check of CHECKPOINT.md §7, each message naming the file and the tensor
or key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Errors and warnings (CHECKPOINT.md §7; names as suggested there)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the tensor or key."""


class CorruptShard(CheckpointError):
    """§7.1.1: bad header length, JSON, entry, offsets, overlap, unknown dtype, or a truncated file."""


class MissingShard(CheckpointError):
    """§7.1.2: the index names a shard file that does not exist."""


class UnsafeShardPath(CheckpointError):
    """§7.1.2: the index names a shard outside the checkpoint directory."""


class MissingTensor(CheckpointError):
    """§7.1.2 / §7.3: a tensor the index or the model needs is absent."""


class UnexpectedTensor(CheckpointError):
    """§7.1.2 / §7.3: a tensor that the index does not list, or that no parameter uses."""


class ShapeMismatch(CheckpointError):
    """§7.3.6: a tensor's shape differs from the one the configuration implies."""


class DtypeMismatch(CheckpointError):
    """§7.3.6: a tensor's dtype is not one its parameter can be stored in."""


class UnsupportedConfig(CheckpointError):
    """§7.2.3: config.json is not a DeepSeek-V4 configuration this code supports (also a missing key)."""


class UnsupportedExpertDtype(UnsupportedConfig):
    """§7.2.3: ``expert_dtype`` other than fp4 (e.g. Flash-Base's FP8 experts with fp32 block scales)."""


class UnsupportedQuantConfig(CheckpointError):
    """§7.2.4: ``quantization_config`` is not FP8 e4m3 with UE8M0 128x128 block scales."""


class UnsupportedMoeQuant(CheckpointError):
    """§7.2.4: ``moe_quant_algo`` other than NVFP4 with group size 16."""


class BadQuantManifest(CheckpointError):
    """§7.2.5: hf_quant_config.json is not a ModelOpt NVFP4 manifest of the current or legacy schema."""


class MixedExpertEncoding(CheckpointError):
    """§7.3.7: a partial NVFP4 quartet, a quartet plus an MXFP4 ``.scale``, or experts of one layer in
    different formats."""


class SwizzledScaleUnsupported(CheckpointError):
    """§7.3.8: a 1-D uint8 (TensorRT-LLM swizzled) ``weight_scale``."""


class BadBlockGeometry(CheckpointError):
    """§7.3.8: an input dimension that is not a multiple of the format's block."""


class MissingScale(CheckpointError):
    """§7.3.9: a quantised weight without its scale."""


class ScaleShapeMismatch(CheckpointError):
    """§7.3.9: a scale whose shape does not tile its weight."""


class BadGlobalScale(CheckpointError):
    """§7.4.10: ``weight_scale_2`` or ``input_scale`` not finite and positive."""


class BadBlockScale(CheckpointError):
    """§7.4.11: an e4m3 NVFP4 block scale that is NaN or negative."""


class BadE8M0(CheckpointError):
    """§7.4.12: a UE8M0 scale byte 0xFF (NaN)."""


class NaNWeight(CheckpointError):
    """§7.4.13: an FP8 weight byte that is NaN (0x7F / 0xFF)."""


class InsufficientMemory(CheckpointError):
    """The requested placement does not fit in device memory."""


class CheckpointWarning(UserWarning):
    """A defect a loader tolerates (CHECKPOINT.md §7)."""


class StaleIndexTotalSize(CheckpointWarning):
    """§7.1.2: ``metadata.total_size`` differs from the payload sum (Format Q ships a stale value)."""


class InconsistentQuantManifest(CheckpointWarning):
    """§7.2.5: hf_quant_config.json and config.json name different NVFP4 layers."""


class ExpertEncodingDisagreesWithConfig(CheckpointWarning):
    """§7.3.7: the experts' observed encoding differs from what the quantisation manifest announces."""


class UnfusedW13Scales(CheckpointWarning):
    """§7.4.14: w1 and w3 of an NVFP4 expert have different global or input scales."""


# ---------------------------------------------------------------------------------------------------------
# Dtypes

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
    """The safetensors name of a numpy / ml_dtypes / jax dtype."""
    try:
        return DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no safetensors dtype for {dtype}") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a shard's header (§7.1.1) without reading the payload.

    Returns the tensors by name and the ``__metadata__`` map. Raises ``CorruptShard`` naming the file and,
    where there is one, the tensor."""
    path = Path(path)
    if not path.is_file():
        raise CorruptShard(f"{path}: not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptShard(f"{path}: {size} bytes, too short for a safetensors header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CorruptShard(
                f"{path}: header length {n} exceeds the file size {size} - 8 (truncated or "
                "not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptShard(f"{path}: the header is not valid UTF-8 JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CorruptShard(f"{path}: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CorruptShard(f"{path}: __metadata__ is not a JSON object")
    start, payload = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CorruptShard(
                f"{path}: tensor {name!r}: entry needs dtype, shape and data_offsets, got {e!r}"
            )
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CorruptShard(f"{path}: tensor {name!r}: unknown dtype {dt!r}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
        ):
            raise CorruptShard(f"{path}: tensor {name!r}: malformed shape {shape!r} or data_offsets {offs!r}")
        b, end = offs
        if not 0 <= b <= end:
            raise CorruptShard(f"{path}: tensor {name!r}: data_offsets {offs} are not ordered")
        if end > payload:
            raise CorruptShard(
                f"{path}: tensor {name!r}: data ends at payload byte {end} but the file holds only "
                f"{payload} payload bytes (truncated shard)"
            )
        want = math.prod(shape) * DTYPES[dt].itemsize
        if end - b != want:
            raise CorruptShard(
                f"{path}: tensor {name!r}: {end - b} bytes for {dt}{shape}, which needs {want}"
            )
        tensors[name] = TensorInfo(name, dt, tuple(shape), start + b, start + end)
    # The tensors must cover the payload exactly, without overlap, as the safetensors format requires: a gap
    # or trailing bytes mean a damaged file (e.g. a header length that lost bytes, which shifts every tensor)
    at, prev = start, None
    for b, e, name in sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin):
        if b < at:
            raise CorruptShard(f"{path}: tensors {prev!r} and {name!r} overlap")
        if b > at:
            raise CorruptShard(f"{path}: {b - at} payload bytes before tensor {name!r} belong to no tensor "
                               "(damaged header length or offsets)")
        at, prev = e, name
    if at != size:
        raise CorruptShard(f"{path}: the last {size - at} bytes of the file belong to no tensor (damaged "
                           "header length or offsets, or bytes appended)")
    return tensors, meta


class Shard:
    """A memory-mapped shard; :meth:`read` returns zero-copy views (the page cache does the reading)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._map: np.memmap | None = None

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its stored dtype and shape (read-only view of the file)."""
        t = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[t.begin : t.end].view(DTYPES[t.dtype]).reshape(t.shape)

    def close(self) -> None:
        self._map = None


# ---------------------------------------------------------------------------------------------------------
# Index

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclasses.dataclass
class Index:
    """``model.safetensors.index.json`` (or a lone ``model.safetensors``): tensor name -> shard file name."""

    path: Path  # the index file (or the lone shard)
    weight_map: dict[str, str]
    total_size: int | None

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def read_index(directory: str | Path) -> Index:
    """Read and check the index of a checkpoint directory (§7.1.2): every shard exists and lies inside the
    directory. A directory with only ``model.safetensors`` (how transformers saves small models) gets an
    index built from that file's header."""
    directory = Path(directory)
    path = directory / INDEX
    if not path.exists():
        single = directory / SINGLE
        if single.exists():
            tensors, _ = read_header(single)
            return Index(single, {k: SINGLE for k in tensors}, None)
        raise MissingShard(f"{directory}: neither {INDEX} nor {SINGLE} exists")
    if not path.is_file():
        raise CorruptShard(f"{path}: not a regular file")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptShard(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CorruptShard(f"{path}: no 'weight_map' object of tensor name -> shard file")
    for shard in sorted(set(wm.values())):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts or p.name != shard:
            raise UnsafeShardPath(
                f"{path}: shard {shard!r} is not a plain file name in the checkpoint directory"
            )
        if not (directory / shard).is_file():
            first = next(k for k, v in wm.items() if v == shard)
            raise MissingShard(f"{path}: shard {shard!r} (holding e.g. tensor {first!r}) does not exist")
    meta = d.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        warnings.warn(StaleIndexTotalSize(f"{path}: 'metadata' is {type(meta).__name__}, not a JSON object; "
                                          "ignored"), stacklevel=2)
    total = meta.get("total_size") if isinstance(meta, dict) else None
    try:
        total = None if total is None else int(total)
    except (TypeError, ValueError):
        warnings.warn(StaleIndexTotalSize(f"{path}: metadata.total_size {total!r} is not a number; ignored"),
                      stacklevel=2)
        total = None
    return Index(path, dict(wm), total)


def open_shards(directory: str | Path, index: Index) -> dict[str, Shard]:
    """Open every shard of ``index`` and check that each holds exactly the tensors the index assigns to it
    (§7.1.2); a stale ``total_size`` only warns (``StaleIndexTotalSize``)."""
    directory = Path(directory)
    shards = {name: Shard(directory / name) for name in index.shards}
    for name, shard in shards.items():
        listed = {k for k, v in index.weight_map.items() if v == name}
        missing, extra = sorted(listed - shard.tensors.keys()), sorted(shard.tensors.keys() - listed)
        if missing:
            raise MissingTensor(
                f"{index.path}: lists tensor {missing[0]!r} in {shard.path}, which does not hold "
                f"it ({len(missing)} such tensor(s))"
            )
        if extra:
            elsewhere = index.weight_map.get(extra[0])
            why = (f"lists in {elsewhere} (a tensor held twice)" if elsewhere is not None
                   else "does not list")
            raise UnexpectedTensor(
                f"{shard.path}: holds tensor {extra[0]!r}, which {index.path.name} {why} "
                f"({len(extra)} such tensor(s))"
            )
    if index.total_size is not None:
        payload = sum(t.nbytes for s in shards.values() for t in s.tensors.values())
        if payload != index.total_size:
            warnings.warn(
                f"{index.path}: metadata.total_size is {index.total_size} but the shards hold {payload} "
                "payload bytes (stale index)",
                StaleIndexTotalSize,
                stacklevel=3,
            )
    return shards


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_shard(
    path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> int:
    """Write one safetensors file (header padded to 8 bytes, payload in the given order); returns the payload
    size. Arrays are written as they are (their dtype names the safetensors dtype)."""
    tensors = [(k, np.asarray(v, order="C")) for k, v in tensors]  # (ascontiguousarray makes 0-d arrays 1-d)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, a in tensors:
        header[name] = {
            "dtype": dtype_name(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in tensors:
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
    return offset


class ShardWriter:
    """Writes tensors into numbered shards of at most ``max_shard_bytes`` payload each, then the index.

    Shards are first written under temporary names; :meth:`finish` renames them to
    ``model-0000K-of-0000N.safetensors`` and writes ``model.safetensors.index.json``. At most one
    shard's worth of arrays is held at a time."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 << 30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[tuple[str, np.ndarray]] = []
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self.flush()
        self._pending.append((name, array))
        self._pending_bytes += array.nbytes

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._written):05d}.tmp"
        self.total_size += write_shard(path, self._pending)
        self._written.append((path, [k for k, _ in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def finish(self, single_file: bool = False) -> dict[str, str]:
        """Name the shards and write the index (``single_file``: one shard named ``model.safetensors`` and no
        index, as transformers does for small models). Returns the weight map."""
        self.flush()
        n = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._written):
            final = SINGLE if single_file and n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.directory / final)
            weight_map.update((k, final) for k in names)
        if not (single_file and n == 1):
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
