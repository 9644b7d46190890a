"""Memory preflight: a config's bytes per device on a mesh, before anything is compiled or allocated.

The state (parameters, optimizer state) is exact: the real model and optimizer under `jax.eval_shape`,
each leaf divided as its sharding rule divides it over the mesh sizes (no devices needed, so a laptop
can size a pod). Gradients and the update's temporaries follow the parameters. Activations are counted
per token and layer from the model's shape, by remat policy and micro-batch:

- what the backward pass keeps per layer and token: `ACT_D` bytes per model-width element (residual
  stream, norm outputs, q/k/v and attention output with their bf16 matmul copies, MLP output),
  `ACT_F` per feed-forward element (gate, up, their product, its bf16 copy), `ACT_S` per attention
  score (the softmax probabilities kept for the backward), and `ACT_V` per logit (logits, the
  log-softmax and its gradient);
- remat 'full' keeps only each layer's f32 input and recomputes one layer at a time (its activations
  and their cotangents: two layers' worth); 'dots' keeps the matmul outputs; XLA:CPU honours remat only under scan_layers (README Performance), so on CPU an
  unrolled remat model is counted as 'none'; a scanned model without remat keeps one layer more (the
  stacked residual buffer); XLA:CPU's partitioned program (several devices) keeps `CPU_SPMD` times
  the single-device bytes (measured; accelerators' partitioners are not measured here).

The per-element counts were read off the implementation and checked against XLA's buffer assignment
of the compiled train step (`compiled.memory_analysis()`, arguments + temporaries) on configs from 16k
to 30M parameters (README Scale: estimate vs measured). Treat the activation part as +-20%.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import types

import flax.linen as nn
import jax
import jax.numpy as jnp

import modes
import sharding as sharding_lib
import steps

log = logging.getLogger("lmstack")

ACT_D = 48.0  # bytes per token, layer and model-width element kept for the backward (remat 'none')
ACT_F = 18.0  # ... per feed-forward element
ACT_S = 3.0  # ... per attention score (B x H x L x L)
ACT_V = 13.5  # bytes per token and vocabulary entry at the LM head
CPU_SPMD = 1.55  # XLA:CPU partitioned over several devices keeps this many times the activation bytes
UPDATE_TEMPS = 0.5  # the optimizer update's temporaries, as a share of the parameter bytes
HEADROOM = 0.9  # fit when the estimate is within this share of the device's memory


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device."""
    params: int
    opt_state: int
    grads: int
    update_temps: int
    activations: int
    logits: int
    total_params: int  # all devices together (unsharded parameter bytes)
    limit: int = 0  # the device's memory (0: unknown)

    @property
    def total(self) -> int:
        return self.params + self.opt_state + self.grads + self.update_temps + self.activations + self.logits

    @property
    def fits(self) -> bool:
        return not self.limit or self.total <= HEADROOM * self.limit

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
        rows = [("parameters", self.params), ("optimizer state", self.opt_state), ("gradients", self.grads),
                ("update temporaries", self.update_temps), ("activations", self.activations),
                ("logits", self.logits), ("total per device", self.total)]
        out = [f"  {name:<20}{gib(b)}" for name, b in rows]
        if self.limit:
            out.append(f"  {'device memory':<20}{gib(self.limit)}  ({100 * self.total / self.limit:.0f}% used, "
                       f"{'fits' if self.fits else 'does NOT fit'} within {HEADROOM:.0%})")
        return out


def shard_bytes(abstract_boxed, sizes: dict, rules) -> tuple[int, int]:
    """(bytes per device, bytes in all) of a boxed abstract tree sharded by `rules` over a mesh of `sizes`."""
    specs = nn.get_partition_spec(abstract_boxed)
    plain = nn.meta.unbox(abstract_boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
    flat = jax.tree.leaves(plain)
    per_device = total = 0
    for leaf, spec in zip(flat, flat_specs):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if is_spec(spec) and len(spec) else ()
        shape = list(leaf.shape)
        for i, axes in enumerate(tuple(mesh_spec)[:len(shape)]):
            if axes is not None:
                n = math.prod(sizes[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
                shape[i] = -(-shape[i] // n)
        itemsize = jnp.dtype(leaf.dtype).itemsize
        per_device += math.prod(shape) * itemsize
        total += math.prod(leaf.shape) * itemsize
    return per_device, total


def state_bytes(model, tx, sizes: dict, rules, seq_len: int) -> tuple[int, int, int]:
    """(params per device, optimizer state per device, params in all): eval_shape only, nothing allocated."""
    def init(key):
        params = model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return params, tx.init(params)
    params, opt_state = jax.eval_shape(init, jax.random.key(0))
    p_dev, p_all = shard_bytes(params, sizes, rules)
    o_dev, _ = shard_bytes(opt_state, sizes, rules)
    return p_dev, o_dev, p_all


def activation_bytes(cfg, *, rows: int, seq_len: int, sizes: dict, lm_logits: bool, platform: str) -> tuple[int, int]:
    """(activations, logits) bytes per device of one micro-batch of `rows` sequences (`cfg`: ModelConfig)."""
    batch_shards = sizes["data"] * sizes["fsdp"]
    tp = sizes["tensor"]
    tokens = rows * seq_len / batch_shards
    d, f, heads = cfg.d_model, cfg.d_ff / tp, max(1.0, cfg.n_heads / tp)
    one_layer = tokens * (ACT_D * d + ACT_F * f) + ACT_S * (rows / batch_shards) * heads * seq_len ** 2
    remat = cfg.remat
    if platform == "cpu" and not cfg.scan_layers:
        remat = "none"  # XLA:CPU keeps every activation of an unrolled remat model
    if remat == "none":
        layers = cfg.n_layers * one_layer + (one_layer if cfg.scan_layers else 0)
    elif remat == "full":  # a recomputed layer's activations and their cotangents live together: 2 layers
        layers = cfg.n_layers * tokens * 4 * d + 2 * one_layer
    else:  # 'dots': the matmul outputs (q/k/v, attention out, projections, gate/up/down) and a layer in flight
        dots = tokens * 4 * (3 * d + 3 * f)
        layers = cfg.n_layers * dots + 2 * one_layer
    logits = ACT_V * tokens * cfg.vocab_size / tp if lm_logits else 0
    if platform == "cpu" and math.prod(sizes.values()) > 1:
        layers, logits = CPU_SPMD * layers, CPU_SPMD * logits
    return int(layers), int(logits)


def device_memory() -> int:
    """The first local device's memory in bytes; on CPU the host's RAM shared by its local devices."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    import psutil  # CPU: fake devices share the host's memory
    return int(psutil.virtual_memory().total // max(1, jax.local_device_count()))


def sized_inputs(vocab: int, num_classes: int = 2):
    """What a mode's model builder reads from its Inputs (the tokenizer's sizes, a class count), for sizing a
    model without its data."""
    tok = types.SimpleNamespace(vocab_size=vocab, base_size=vocab)
    return types.SimpleNamespace(tokenizer=tok, num_classes=num_classes)


def estimate(config, mode, inputs, *, n_devices: int, limit: int = 0, platform: str | None = None) -> Estimate:
    """Bytes per device of training `config` (its mode's model on `inputs`' tokenizer, its optimizer,
    micro-batch and mesh) on `n_devices` with `limit` bytes each (0: unknown)."""
    sizes = sharding_lib.mesh_sizes(config.mesh, n_devices)
    model = mode.model(config, inputs)
    rules = sharding_lib.logical_rules(config.sharding)
    seq_len = int(config.data.seq_len)
    p_dev, o_dev, p_all = state_bytes(model, modes.optimizer(config)[0], sizes, rules, seq_len)
    acts, logits = activation_bytes(model.cfg, rows=micro_rows(config, mode), seq_len=seq_len, sizes=sizes,
                                    lm_logits=has_lm_logits(config), platform=platform or jax.default_backend())
    return Estimate(params=p_dev, opt_state=o_dev, grads=p_dev, update_temps=int(UPDATE_TEMPS * p_dev),
                    activations=acts, logits=logits, total_params=p_all, limit=limit)


PAIRED_MODES = ("reward", "dpo")  # each row is a chosen and a rejected sequence: two sequences through the model
NO_LM_LOGITS = ("classify", "qa", "reward")  # heads with a few outputs per sequence or token, not the vocabulary


def micro_rows(config, mode) -> int:
    """Sequences through the model per micro-batch, the whole mesh's (RL: its update minibatch)."""
    rows = mode.device_batch(config)[0] if mode.device_batch else (
        int(config.data.batch_size) // int(config.optim.grad_accum_steps))
    return rows * (2 if config.mode in PAIRED_MODES else 1)


def has_lm_logits(config) -> bool:
    return config.mode not in NO_LM_LOGITS


def suggestions(plan, config, limit_count: int = 3) -> list[str]:
    """Config changes that make `plan(config) -> Estimate` fit, smallest first: more FSDP (the data axis
    folded into fsdp), remat (scanned, so XLA:CPU honours it too), then a smaller micro-batch with more
    gradient accumulation (same global batch), alone or with those. Each as --config overrides with its estimate."""
    def variant(c, fsdp: bool, remat: bool, accum: int):
        c = copy.deepcopy(c)
        with c.unlocked():
            if fsdp and int(c.mesh.data) != 1:
                c.mesh.fsdp, c.mesh.data = -1, 1
            if remat:
                c.model.remat, c.model.scan_layers = "full", True
            c.optim.grad_accum_steps = int(c.optim.grad_accum_steps) * accum
        return c

    def flags(c) -> str:
        changed = []
        for key in ("mesh.data", "mesh.fsdp", "model.remat", "model.scan_layers", "optim.grad_accum_steps"):
            a, b = key.split(".")
            if c[a][b] != config[a][b]:
                changed.append(f"--config.{key}={c[a][b]}")
        return " ".join(changed)

    out, seen = [], set()
    accums = [1]
    while accums[-1] * 2 <= int(config.data.batch_size) // int(config.optim.grad_accum_steps):
        accums.append(accums[-1] * 2)
    for accum in accums:
        for fsdp, remat in ((False, False), (True, False), (False, True), (True, True)):
            c = variant(config, fsdp, remat, accum)
            if int(c.data.batch_size) % int(c.optim.grad_accum_steps):
                continue
            key = flags(c)
            if not key or key in seen:
                continue
            seen.add(key)
            try:
                est = plan(c)
            except ValueError:  # e.g. the micro-batch no longer divides over the data-parallel devices
                continue
            if est.fits:
                out.append(f"{key}  ({human(est.total)} per device)")
                if len(out) == limit_count:
                    return out
    return out or ["nothing in reach: more devices (a larger fsdp axis), a smaller model, or a shorter data.seq_len"]


def human(n_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{int(n_bytes)} B"


class MemoryPreflightError(ValueError):
    pass


def check(config, mode, inputs) -> Estimate:
    """At start-up (train.preflight): the estimate for this machine's devices, logged; a run that would not
    fit is refused before anything is compiled, naming the numbers and the changes that would fit."""
    n = jax.device_count()
    limit = int(float(config.train.memory_limit_gb) * 2**30) or device_memory()
    plan = lambda c: estimate(c, mode, inputs, n_devices=n, limit=limit)  # noqa: E731
    est = plan(config)
    sizes = sharding_lib.mesh_sizes(config.mesh, n)
    log.info("memory preflight: about %s per device of %s (parameters %s, optimizer state %s, activations and "
             "logits %s)", human(est.total), human(limit), human(est.params), human(est.opt_state),
             human(est.activations + est.logits))
    if est.fits:
        return est
    raise MemoryPreflightError(
        f"memory preflight: about {human(est.total)} per device are needed on mesh {sizes} (parameters "
        f"{human(est.params)}, optimizer state {human(est.opt_state)}, gradients and update "
        f"{human(est.grads + est.update_temps)}, activations and logits {human(est.activations + est.logits)}) "
        f"but the device has {human(est.limit)} (fit within {HEADROOM:.0%}). Changes that would fit:\n  " + "\n  ".join(suggestions(plan, config))
        + "\n(train.preflight=False skips this check; train.memory_limit_gb sets the device memory.)")


def measure(config, mode) -> tuple[int, int]:
    """(XLA's bytes per device (arguments + temporaries) of the compiled train step of `config` on this
    machine's mesh, the tokenizer's size), on a real batch of the mode's inputs (built in a scratch
    directory). Allocates the state: for configs that fit this machine."""
    micro = int(config.data.batch_size) // int(config.optim.grad_accum_steps)
    with tempfile.TemporaryDirectory() as scratch:
        inputs = mode.inputs(config, scratch, micro)
        batch = next(inputs.train_iter)
    model, tx = mode.model(config, inputs), modes.optimizer(config)[0]
    mesh = sharding_lib.make_mesh(config.mesh)
    rules = sharding_lib.logical_rules(config.sharding)
    state, state_sh = steps.init_state(model, tx, mesh, rules, config.seed, int(config.data.seq_len))
    if mode.trim is not None:
        batch = mode.trim(batch)
    train_step = steps.make_train_step(model=model, tx=tx, objective=mode.loss(config), schedule=lambda s: 0.0,
                                       accum=int(config.optim.grad_accum_steps), mesh=mesh, rules=rules,
                                       state_shardings=state_sh)
    batch = sharding_lib.put_batch(batch, sharding_lib.batch_sharding(mesh))
    with sharding_lib.activate(mesh, rules):
        analysis = train_step.jitted.lower(state, batch).compile().memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes), inputs.tokenizer.vocab_size
