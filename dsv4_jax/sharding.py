"""Placement of the parameters on a mesh: routed experts are split along their leading expert axis over the
mesh axis ``"expert"`` (expert parallelism); every other parameter is replicated (KERNELS.md §9).

The rule looks only at parameter-tree names: a leaf under a field called ``experts`` (``MoE.experts``, the
stacked ``[E, ...]`` routed experts, and every array of their quantised formats) is expert-sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

EXPERT_AXIS = "expert"


def is_routed_expert(path: Sequence) -> bool:
    """Whether a parameter-tree path (field names / indices, or jax key entries) is a routed-expert leaf."""
    return any(getattr(k, "name", k) == "experts" for k in path)


def expert_shards(mesh: Mesh | None) -> int:
    """Into how many pieces the expert axis is split (1 without a mesh or without an ``"expert"`` axis)."""
    return mesh.shape[EXPERT_AXIS] if mesh is not None and EXPERT_AXIS in mesh.axis_names else 1


def leaf_sharding(path: Sequence, mesh: Mesh | None) -> jax.sharding.Sharding:
    """The sharding of the parameter at ``path``: ``P("expert")`` for routed experts, replicated otherwise;
    the first device without a mesh."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    if is_routed_expert(path) and EXPERT_AXIS in mesh.axis_names:
        return NamedSharding(mesh, PartitionSpec(EXPERT_AXIS))
    return NamedSharding(mesh, PartitionSpec())


def check_mesh(mesh: Mesh | None, n_routed_experts: int) -> None:
    """A mesh must have an ``"expert"`` axis (without one nothing would be sharded, silently), and that axis
    must divide the number of routed experts."""
    if mesh is not None and EXPERT_AXIS not in mesh.axis_names:
        raise ValueError(
            f"the mesh has axes {tuple(mesh.axis_names)} but no {EXPERT_AXIS!r} axis to shard the routed experts "
            f"over (pass mesh=None for one device)"
        )
    k = expert_shards(mesh)
    if n_routed_experts % k:
        raise ValueError(
            f"mesh axis {EXPERT_AXIS!r} has {k} devices, which does not divide the "
            f"{n_routed_experts} routed experts"
        )


def param_shardings(params, mesh: Mesh | None):
    """A tree of shardings matching ``params`` (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_sharding(path, mesh), params)


def devices(mesh: Mesh | None) -> list[jax.Device]:
    """The devices a placement uses."""
    return [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
