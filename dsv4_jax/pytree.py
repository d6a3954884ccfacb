"""Frozen dataclasses registered as pytrees whose fields are all array leaves (or nested pytrees / None)."""

from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                            meta_fields=[])
