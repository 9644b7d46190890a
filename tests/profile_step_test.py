"""scripts/profile_step.py: the xplane wire decoder, HLO classification, and an end-to-end run."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import profile_step  # noqa: E402


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    """One protobuf field: int -> varint (wire 0), bytes/str -> length-delimited (wire 2)."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _xspace() -> bytes:
    meta = b"".join(_field(4, _field(1, mid) + _field(2, _field(1, mid) + _field(2, name)))
                    for mid, name in ((1, "dot.3"), (2, "fusion.7"), (300, "ThunkExecutor::Execute")))
    line = (_field(1, 5) + _field(2, "tf_XLAEigen/123") + _field(3, 7)  # timestamp 7 ns
            + _field(4, _field(1, 1) + _field(2, 10) + _field(3, 2_000_000))
            + _field(4, _field(1, 2) + _field(2, 20) + _field(3, 300))
            + _field(4, _field(1, 300) + _field(3, 1 << 40)))  # > 32 bits: multi-byte varints
    other = _field(2, "python") + _field(4, _field(1, 2) + _field(3, 7))
    plane = _field(1, 9) + _field(2, "/host:CPU") + _field(3, line) + meta + _field(3, other)
    # a fixed64 and a fixed32 field the decoder must skip
    plane += _varint(99 << 3 | 1) + (5).to_bytes(8, "little") + _varint(98 << 3 | 5) + (6).to_bytes(4, "little")
    return _field(1, plane) + _field(2, "ignored hostname")


def test_decode_xspace_hand_built():
    events = profile_step.decode_xspace(_xspace())
    # (line, op, duration ps, start ps = line timestamp + event offset)
    assert events == [("tf_XLAEigen/123", "dot.3", 2_000_000, 7010), ("tf_XLAEigen/123", "fusion.7", 300, 7020),
                      ("tf_XLAEigen/123", "ThunkExecutor::Execute", 1 << 40, 7000), ("python", "fusion.7", 7, 0)]


HLO = """HloModule jit__train_step, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0: bf16[256,64], param_1: bf16[64,128]) -> f32[256,128] {
  %param_0 = bf16[256,64]{1,0} parameter(0)
  %param_1 = bf16[64,128]{1,0} parameter(1)
  ROOT %dot.1 = f32[256,128]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(_train_step)/jvp(Transformer)/Transformer.encode/layer_0/mlp/up/dot_general" stack_frame_id=1}
}

%fused_computation.2 (param_0.1: f32[8,4,32,16], param_1.1: f32[8,4,16,32]) -> f32[8,4,32,32] {
  %param_0.1 = f32[8,4,32,16]{3,2,1,0} parameter(0)
  %param_1.1 = f32[8,4,16,32]{3,2,1,0} parameter(1)
  ROOT %dot_general.2 = f32[8,4,32,32]{3,2,1,0} dot(%param_0.1, %param_1.1), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}, metadata={op_name="jit(_train_step)/transpose(jvp(Transformer))/Transformer.encode/layer_0/attn/dot_general"}
}

ENTRY %main.9 (a: bf16[256,64], b: bf16[64,128], q: f32[8,4,32,16], k: f32[8,4,16,32]) -> f32[] {
  %a = bf16[256,64]{1,0} parameter(0)
  %b = bf16[64,128]{1,0} parameter(1)
  %q = f32[8,4,32,16]{3,2,1,0} parameter(2)
  %k = f32[8,4,16,32]{3,2,1,0} parameter(3)
  %ynn_fusion.1 = f32[256,128]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(_train_step)/jvp(Transformer)/Transformer.encode/layer_0/mlp/up/dot_general"}
  %ynn_fusion.2 = f32[8,4,32,32]{3,2,1,0} fusion(%q, %k), kind=kCustom, calls=%fused_computation.2, metadata={op_name="jit(_train_step)/transpose(jvp(Transformer))/Transformer.encode/layer_0/attn/dot_general"}
  ROOT %add.3 = f32[] add(%a, %b), metadata={op_name="jit(_train_step)/add"}
}
"""


def test_classify_dots_and_components():
    instrs, comps = profile_step.parse_hlo(HLO)
    mlp = profile_step.classify("ynn_fusion.1", instrs, comps)
    assert (mlp["category"], mlp["flops"], mlp["component"], mlp["backward"]) == (
        "dense matmul bf16", 2 * 256 * 128 * 64, "mlp", False)
    attn = profile_step.classify("ynn_fusion.2", instrs, comps)
    assert (attn["category"], attn["flops"], attn["component"], attn["backward"]) == (
        "attention matmul f32", 2 * 8 * 4 * 32 * 32 * 16, "attn", True)
    add = profile_step.classify("add.3", instrs, comps)
    assert (add["category"], add["component"]) == (profile_step.OTHER, "optimizer/other")

    ms = 1_000_000_000  # ps
    # thread 1: the dot runs 0-4 ms and 10-12 ms; thread 2: add.3 runs 3-4 ms beside it, then alone 5-6 ms
    events = [("tf_XLAEigen/1", "ynn_fusion.1", 4 * ms, 0), ("tf_XLAEigen/1", "ynn_fusion.1", 2 * ms, 10 * ms),
              ("tf_XLAEigen/2", "add.3", 1 * ms, 3 * ms), ("tf_XLAEigen/2", "add.3", 1 * ms, 5 * ms),
              ("tf_XLAEigen/2", "end: add.3", 5, 0), ("tf_XLAEigen/2", "mystery.1", 2 * ms, 0),
              ("python", "add.3", 9 * ms, 0)]
    r = profile_step.summarise(events, HLO, steps=2, wall_s=0.01)
    assert r["op_ms_per_step"] == 4.0 and r["unmatched_ms_per_step"] == 1.0
    dense = r["categories"]["dense matmul bf16"]
    assert dense["ms"] == 3.0 and abs(dense["gflops"] - 2 * 256 * 128 * 64 / 3e-3 / 1e9) < 1e-6
    # wall: the shared millisecond is split in half; alone: time with no other op running
    assert (dense["wall_ms"], dense["alone_ms"]) == (2.75, 2.5)
    other = r["categories"][profile_step.OTHER]
    assert (other["wall_ms"], other["alone_ms"]) == (0.75, 0.5)
    assert r["busy_ms_per_step"] == 3.5


def test_profile_step_end_to_end():
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user runs it
    out = subprocess.run([sys.executable, "scripts/profile_step.py", "--config=configs/pretrain_causal.py:tiny",
                          "--config.model.n_layers=1", "--config.model.d_model=64", "--steps=2", "--warmup=1",
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    cats = r["categories"]
    assert profile_step.OTHER in cats and any(k.startswith("attention matmul") for k in cats)
    # bf16 dots, or f32 ones holding bf16-rounded values where the CPU has no bf16 hardware (layers.lowp)
    dense = [c for name, c in cats.items() if name.startswith("dense matmul")]
    assert dense and all(c["ms"] > 0 and c["gflops"] > 0 for c in dense)
    assert abs(sum(c["ms"] for c in cats.values()) - r["op_ms_per_step"]) <= 0.1 * r["op_ms_per_step"]
    assert {"attn", "mlp"} <= set(r["components"])
    assert r["unmatched_ms_per_step"] < 0.1 * r["op_ms_per_step"]  # the trace's ops are the dumped module's
    assert 0 < r["wall_ms_per_step"] and r["ops"][0]["ms"] >= r["ops"][-1]["ms"]
