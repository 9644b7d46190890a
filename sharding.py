"""Device mesh and logical-axis sharding.

The mesh has three named axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and `tensor` (tensor/model parallel). The model
names its axes logically (model/axes.py); `config.sharding.rules` maps them onto the mesh.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import optax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh from {data, fsdp, tensor} sizes; one of them may be -1 (fill the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes {sizes}: each must be a positive size, with at most one -1 (fill)")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are present")
    grid = np.array(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(sharding_cfg) -> tuple[tuple[str, object], ...]:
    """config.sharding.rules -> flax logical-axis rules (tuples; lists become tuples)."""
    out = []
    for logical, mesh_axes in sharding_cfg.rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((logical, mesh_axes))
    return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Mesh + logical rules in effect while tracing (activation sharding constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(f"{what}={batch_size} is not divisible by {dp} data-parallel devices "
                         f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def state_shardings(abstract_boxed, mesh: Mesh, rules):
    """Boxed (logically partitioned) abstract state -> NamedShardings, checked for divisibility."""
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    # optax's MaskedNode (the state slot of a frozen/masked param) is an empty node, not an array:
    # keep it as is, so the shardings tree has the state's structure (restore maps over both).
    # (Under a box: optax masks boxed params leaf by leaf, so a box may hold a MaskedNode.)
    def keep_masked(a, s):
        inner = a.unbox(apply_constraint=False) if isinstance(a, nn.meta.AxisMetadata) else a
        return inner if isinstance(inner, optax.MaskedNode) else s
    shardings = jax.tree.map(keep_masked, abstract_boxed, shardings,
                             is_leaf=lambda x: isinstance(x, (optax.MaskedNode, nn.meta.AxisMetadata)))
    plain = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                         abstract_boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    flat_abs = jax.tree_util.tree_leaves_with_path(plain)
    flat_sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_abs, flat_sh):
        for dim, axes_ in zip(leaf.shape, sh.spec):
            if axes_ is None:
                continue
            n = math.prod(mesh.shape[a] for a in (axes_ if isinstance(axes_, tuple) else (axes_,)))
            if dim % n:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
                                 f"sharded as {sh.spec}: dimension {dim} is not divisible by {n} devices")
    return shardings


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch (this process's rows) -> global jax arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
