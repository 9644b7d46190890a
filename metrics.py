"""Metric writers (JSONL + TensorBoard event files via tensorboardX) and a console progress line."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import time


def _import_tensorboardx():
    """tensorboardX imports torch at module level whenever torch is installed, only to accept torch
    tensors as values (we log floats): about a second and a few hundred MB at every start of train.py
    on a machine with PyTorch. Hidden from that one import (an ImportError tensorboardX expects);
    a process that already imported torch keeps it."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is in place
    try:
        import tensorboardX
        import tensorboardX.proto.event_pb2  # noqa: F401
    finally:
        del sys.modules["torch"]
    return tensorboardX


_tbx = _import_tensorboardx()
SummaryWriter = _tbx.SummaryWriter
event_pb2 = _tbx.proto.event_pb2


class MetricWriter:
    """Writes {name: scalar} at a step to WORKDIR/metrics.jsonl and WORKDIR/tb/ (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tb_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files in `logdir` (WORKDIR/tb), without
    TensorBoard installed. An event file is a sequence of records: length (u64), a CRC of it, the
    serialized Event, a CRC of that (CRCs not checked here)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0


class Progress:
    """One console line per log step: step, loss, tokens/s, step time, MFU, ETA; at an eval, the validation
    loss and the mode's `headline` metrics (accuracy, macro-F1, exact match, ...)."""

    def __init__(self, total_steps: int, start_step: int, stream=None, headline: tuple[str, ...] = ()):
        self.total, self.stream, self.headline = total_steps, stream, tuple(headline)
        self.t0, self.s0 = time.time(), start_step

    def line(self, step: int, scalars: dict) -> str:
        elapsed = time.time() - self.t0
        rate = (step - self.s0) / elapsed if elapsed > 0 and step > self.s0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        for key, fmt in (("train/loss", "loss {:.4f}"), ("eval/loss", "val {:.4f}"), ("train/lr", "lr {:.2e}"),
                         ("perf/tokens_per_s", "{:,.0f} tok/s"), ("perf/step_ms", "{:.1f} ms/step"),
                         ("perf/mfu", "MFU {:.1%}")):
            if key in scalars:
                parts.append(fmt.format(float(scalars[key])))
        for key in self.headline:
            if key in scalars:  # 'eval/macro_f1' -> 'macro_f1 0.8123'
                parts.append(f"{key.split('/', 1)[-1]} {float(scalars[key]):.4f}")
        parts.append(f"ETA {eta:.0f}s" if eta == eta else "ETA ?")
        return " | ".join(parts)

    def print(self, step: int, scalars: dict) -> None:
        print(self.line(step, scalars), file=self.stream or sys.stdout, flush=True)
