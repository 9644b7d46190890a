"""Llama-style presets for accelerators: model size x target (mesh, micro-batch, remat), shared by
configs/llama_{125m,350m,1b,7b}.py. Each target's memory per device was checked with
scripts/estimate_memory.py (README Scale has the table); the run refuses at start-up when it would not
fit (train.preflight), naming the changes that would.

Targets (the `:ARG` of a preset file):
  v4-8    TPU v4-8: 4 chips (32 GiB each), one host
  v5e-16  TPU v5e-16 (v5litepod-16): 16 chips (16 GiB each), 4 hosts
  gpu8    one node of 8 NVIDIA H100 80GB
  local   this machine's devices, parameters FSDP-sharded over all of them (the default)
  tiny    the model shrunk to a seconds-long CPU smoke run (tests)
"""

from configs import common

# peak dense bf16 FLOP/s per device, for MFU
PEAK_FLOPS = {"v4-8": 275e12, "v5e-16": 197e12, "gpu8": 989e12}

# per size: global batch (sequences of 2048 tokens), peak lr, and per target the mesh
# (data, fsdp, tensor), micro-batches per update, remat policy (and optim.name when not AdamW)
PLANS = {
    "125m": dict(batch=256, lr=6e-4, targets={
        "v4-8": ((4, 1, 1), 8, "dots"), "v5e-16": ((16, 1, 1), 4, "dots"), "gpu8": ((8, 1, 1), 2, "dots")}),
    "350m": dict(batch=256, lr=3e-4, targets={
        "v4-8": ((1, 4, 1), 16, "dots"), "v5e-16": ((1, 16, 1), 8, "dots"), "gpu8": ((1, 8, 1), 4, "dots")}),
    "1b": dict(batch=512, lr=3e-4, targets={
        "v4-8": ((1, 4, 1), 16, "full"), "v5e-16": ((1, 16, 1), 8, "full"), "gpu8": ((1, 8, 1), 8, "dots")}),
    # 7B with AdamW does not fit a v4-8 (its f32 state alone is 26 GiB of a chip's 32): Adafactor's factored
    # second moments (and no first moment) make it fit there.
    "7b": dict(batch=1024, lr=1.5e-4, targets={
        "v4-8": ((1, 4, 1), 256, "full", "adafactor"), "v5e-16": ((1, 16, 1), 64, "full"),
        "gpu8": ((1, 8, 1), 16, "full")}),
}


def llama(size: str, arg=None):
    """The `size` preset for target `arg` (see the module docstring)."""
    plan = PLANS[size]
    target = arg or "local"
    if target not in PLANS[size]["targets"] and target not in ("local", "tiny"):
        raise ValueError(f"preset target {target!r}: expected one of {sorted(plan['targets']) + ['local', 'tiny']}")
    c = common.base()
    common.model_size(c, size)
    c.model.scan_layers = True  # compile time independent of depth
    c.data.seq_len = 2048
    c.data.batch_size = plan["batch"]
    c.data.path = ""  # replace with a prepared dataset (scripts/prepare_data.py): see the preset's docstring
    c.optim.lr = plan["lr"]
    c.optim.b2 = 0.95
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.1
    c.train.steps = 100_000
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.train.compile_cache_dir = "~/.cache/lmstack_xla"
    if target == "tiny":
        common.tiny(c)
        c.model.scan_layers = True
        return c
    mesh, accum, remat, *optimizer = plan["targets"].get(target, plan["targets"]["gpu8"])
    if optimizer:
        c.optim.name = optimizer[0]
    if target == "local":
        mesh = (1, -1, 1)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.optim.grad_accum_steps = accum
    c.model.remat = remat
    c.train.peak_flops = PEAK_FLOPS.get(target, c.train.peak_flops)
    return c
