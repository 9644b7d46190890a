"""Device mesh and logical-axis sharding.

The mesh has three named axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and `tensor` (tensor/model parallel). The model
names its axes logically (model/axes.py); `config.sharding.rules` maps them onto the mesh.

Several hosts (a TPU pod, GPU nodes): every host runs the same train.py; `initialize_distributed`
joins them (config.dist) before any device is touched, and the mesh spans every host's devices.
`mesh.dcn_*` > 1 splits an axis across slices (TPU multi-slice) or hosts (GPU nodes) so that the
slow network between them carries only that axis (README, Multi-host).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import flax.linen as nn
import jax
import optax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("lmstack")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh from {data, fsdp, tensor} sizes; one of them may be -1 (fill the rest). With `dcn_data`,
    `dcn_fsdp`, `dcn_tensor` (default 1) the sizes are per slice (or host) and each axis is that size times
    its dcn size: the devices of one slice/host form a contiguous block of the mesh (hybrid_grid)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes, dcn = axis_sizes(mesh_cfg, len(devices))
    if math.prod(dcn.values()) == 1:
        grid = np.array(devices).reshape([sizes[a] for a in MESH_AXES])
    else:
        grid = hybrid_grid([sizes[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_sizes(mesh_cfg, n_devices: int) -> tuple[dict, dict]:
    """({axis: size inside a slice/host, -1 filled}, {axis: dcn size}) for `n_devices` devices in all, checked."""
    dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    if any(s < 1 for s in dcn.values()):
        raise ValueError(f"mesh.dcn_* sizes {dcn}: each must be >= 1 (1 = the axis stays inside a slice/host)")
    granules = math.prod(dcn.values())
    if n_devices % granules:
        raise ValueError(f"mesh.dcn_* {dcn} asks for {granules} slices/hosts but {n_devices} devices cannot be "
                         f"split into {granules} equal groups")
    return _ici_sizes(mesh_cfg, n_devices // granules, "mesh" if granules == 1 else "mesh (per slice/host)"), dcn


def mesh_sizes(mesh_cfg, n_devices: int) -> dict:
    """{data, fsdp, tensor}: each axis's size in all (inside a slice/host times across them), checked as
    make_mesh checks them, without devices (the memory preflight's mesh)."""
    ici, dcn = axis_sizes(mesh_cfg, n_devices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _ici_sizes(mesh_cfg, n_devices: int, what: str) -> dict:
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad or len(free) > 1:
        raise ValueError(f"{what} sizes {sizes}: each must be a positive size, with at most one -1 (fill)")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % known:
            raise ValueError(f"{what} {sizes}: {n_devices} devices are not divisible by {known}")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"{what} {sizes} needs {math.prod(sizes.values())} devices but {n_devices} are present")
    return sizes


def granule_attr(devices) -> str:
    """What splits devices into DCN groups: TPU slices ('slice_index', when the devices span several),
    else processes ('process_index': one group per host, e.g. GPU nodes or CPU processes)."""
    if all(hasattr(d, "slice_index") for d in devices) and len({d.slice_index for d in devices}) > 1:
        return "slice_index"
    return "process_index"


def hybrid_grid(ici_shape, dcn_shape, devices) -> np.ndarray:
    """Device array of shape ici * dcn (per axis): each slice (or host) lays out `ici_shape` over its own fast
    interconnect, and the slices tile `dcn_shape` (jax's mesh_utils.create_hybrid_device_mesh). With several
    processes per host (one per GPU under SLURM), consecutive process indices form a host (SLURM's default
    block distribution of tasks to nodes)."""
    attr = granule_attr(devices)
    keys = sorted({getattr(d, attr) for d in devices})
    want = math.prod(dcn_shape)
    if attr == "process_index" and len(keys) > want and len(keys) % want == 0:
        per_host = len(keys) // want
        groups = [[d for d in devices if d.process_index // per_host == h] for h in range(want)]
        tiles = np.empty(len(groups), dtype=object)
        for h, g in enumerate(groups):
            tiles[h] = mesh_utils.create_device_mesh(ici_shape, g)
        return np.block(tiles.reshape(dcn_shape).tolist())
    if len(keys) != want:
        raise ValueError(f"mesh.dcn_* {dict(zip(MESH_AXES, dcn_shape))} asks for {want} slices/hosts but the "
                         f"{len(devices)} devices form {len(keys)} (by {attr})")
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=attr == "process_index")


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


REPLICATED_LIMIT = 2 ** 16  # elements: a parameter at least this big must be sharded when mesh fsdp > 1


def state_shardings(abstract_boxed, mesh: Mesh, rules, replicated_limit: int = REPLICATED_LIMIT):
    """Boxed (logically partitioned) abstract state -> NamedShardings, checked for divisibility and, when
    FSDP is on, for large parameters left whole on every device (check_replicated)."""
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
    check_replicated(abstract_boxed, shardings, mesh, replicated_limit)
    return shardings


def check_replicated(abstract_boxed, shardings, mesh: Mesh, limit: int = REPLICATED_LIMIT) -> None:
    """With mesh fsdp > 1, a logically partitioned leaf of >= `limit` elements whose sharding splits it over
    no device is an error naming it, its logical axes and the rule that would shard it."""
    if mesh.shape["fsdp"] <= 1:
        return
    is_box = lambda x: isinstance(x, (nn.meta.AxisMetadata, optax.MaskedNode))  # noqa: E731
    boxes = jax.tree_util.tree_leaves_with_path(abstract_boxed, is_leaf=is_box)
    flat_sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
    for (path, box), sh in zip(boxes, flat_sh):
        if not isinstance(box, nn.LogicallyPartitioned) or not isinstance(sh, NamedSharding):
            continue
        leaf = box.unbox(apply_constraint=False)
        ways = math.prod(mesh.shape[a] for axes_ in sh.spec if axes_ is not None
                         for a in (axes_ if isinstance(axes_, tuple) else (axes_,)))
        if ways == 1 and math.prod(leaf.shape) >= limit:
            names = tuple(box.names)
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} ({math.prod(leaf.shape):,} elements) "
                f"would be replicated on every device although mesh.fsdp={mesh.shape['fsdp']}: its logical axes "
                f"{names} map to no mesh axis of size > 1 in config.sharding.rules; add a rule such as "
                f"({names[0]!r}, 'fsdp')")


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch (this process's rows: host_rows) -> global jax arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """A batch every process holds whole (eval sets) -> global arrays: each process places only the rows
    of its own devices."""
    return {k: jax.make_array_from_process_local_data(sharding, v, v.shape) for k, v in batch.items()}


def host_rows(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """(block, blocks): this process feeds rows [block * n, (block + 1) * n) of every global batch, where
    n = global_rows / blocks. Blocks follow the mesh's device order, so the global batch and its row order
    are the same for any process count. Processes that are replicas of each other (a batch shard spread
    over several hosts' devices, e.g. tensor parallel across hosts) get the same block."""
    sh = batch_sharding(mesh)
    rows = sorted({idx[0].indices(global_rows)[:2] for idx in sh.addressable_devices_indices_map((global_rows,)).values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or global_rows % (stop - start):
        raise ValueError(f"process {jax.process_index()} holds batch rows {rows} of {global_rows}: not one contiguous "
                         f"equal block; order the mesh so each host's devices are adjacent on the batch axes "
                         f"(mesh.dcn_* for multi-host)")
    return start // (stop - start), global_rows // (stop - start)


# ---- Several processes ---------------------------------------------------------------------------------
def cluster_processes() -> int:
    """Processes of the cluster jax detects here (SLURM, Cloud TPU VMs, ...: jax's own detection); 1 if none."""
    try:
        from jax._src.clusters import ClusterEnv  # jax's detection table (private: guarded)
        envs = [e for e in ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()]
        return int(envs[0].get_process_count()) if envs else 1
    except Exception as e:  # noqa: BLE001 - detection is best effort; explicit flags still work
        log.warning("cluster detection failed (%s): set dist.initialize='yes' or the dist.* fields", e)
        return 1


def _check_dist(dist) -> None:
    if dist.initialize not in ("auto", "yes", "no"):
        raise ValueError(f"dist.initialize={dist.initialize!r}: expected 'auto', 'yes' or 'no'")
    addr = dist.coordinator_address
    if addr:
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"dist.coordinator_address={addr!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
    if dist.num_processes < 0 or dist.process_id < -1:
        raise ValueError(f"dist.num_processes={dist.num_processes} / dist.process_id={dist.process_id}: expected "
                         f"num_processes >= 0 (0 = detect) and process_id >= -1 (-1 = detect)")
    if dist.num_processes and dist.process_id >= dist.num_processes:
        raise ValueError(f"dist.process_id={dist.process_id} must be < dist.num_processes={dist.num_processes}")


def initialize_distributed(dist) -> bool:
    """Join this process to the others (jax.distributed.initialize) before any device is used; True if joined.

    config.dist.initialize: 'no' never; 'yes' always (what is not given, jax detects); 'auto' when an
    address or process count is given (config or JAX_COORDINATOR_ADDRESS), or jax detects a cluster of more
    than one process (SLURM with several tasks, a multi-host Cloud TPU VM)."""
    _check_dist(dist)
    if dist.initialize == "no" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    explicit = bool(dist.coordinator_address or dist.num_processes or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if dist.initialize == "auto" and not explicit and cluster_processes() <= 1:
        return False
    kwargs = dict(coordinator_address=dist.coordinator_address or None, num_processes=dist.num_processes or None,
                  process_id=None if dist.process_id < 0 else dist.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"jax.distributed.initialize({kwargs}) failed: {e}") from e
    log.info("process %d of %d: %d local devices, %d in all (%s)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    return True
