"""One table of what compression does to a run: size, quality and decode speed of every variant.

    python scripts/compress_report.py --workdir=runs/mini --out=runs/mini_compress [--group=64] \
        [--variants=qat_int4=runs/mini_qat,gradual_50=runs/mini_prune50,gradual_2of4=runs/mini_prune24] \
        [--max_batches=16] [--decode_tokens=64] [--calib=128] [--only=int8,int4_gptq,...]

Rows: the run's params (f32, stored without the optimizer state a training checkpoint holds), the
same rounded to bf16, int8, int4 round-to-nearest / GPTQ / AWQ (group --group), one-shot 50%
magnitude and Wanda, one-shot 2:4, and each --variants entry (a trained run: QAT runs are quantized
here at their own bits and group, gradually pruned runs exported compactly by scripts/prune.py at
their own sparsity, whose magnitude masks are their zeros; others measured as they are). Variants
are built under OUT (an existing OUT/<name> is reused). Columns: bytes on disk of the checkpoint, parameter bytes in memory once loaded (a pruned
checkpoint loads dense: XLA has no sparse kernels), validation loss on the first --max_batches
batches of the run's validation split, bits per byte (byte tokenizer: loss / ln 2 per token),
change relative to f32, and greedy decode tokens/s through the project's decoder (batch 1, median
of 3 generations after a compiled warm-up). Writes OUT/report.md, OUT/report.json, OUT/report.png.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import serving  # noqa: E402
from model import decode  # noqa: E402

import prune as prune_script  # noqa: E402  (scripts/ is on the path: this file's directory)
import quantize as quantize_script  # noqa: E402

FLAGS = flags.FLAGS


def planned(group: int) -> dict:
    """name -> how to build it from the run (a function of (workdir, out))."""
    q, p = quantize_script.quantize_run, prune_script.prune_run
    return {
        "int8": lambda w, o, c: q(w, o, method="rtn", bits=8, embed_bits=8),
        "int4_rtn": lambda w, o, c: q(w, o, method="rtn", bits=4, group=group, embed_bits=8),
        "int4_gptq": lambda w, o, c: q(w, o, method="gptq", bits=4, group=group, embed_bits=8, calib=c),
        "int4_awq": lambda w, o, c: q(w, o, method="awq", bits=4, group=group, embed_bits=8, calib=c),
        "oneshot_50_magnitude": lambda w, o, c: p(w, o, method="magnitude", sparsity=0.5),
        "oneshot_50_wanda": lambda w, o, c: p(w, o, method="wanda", sparsity=0.5, calib=c),
        "oneshot_2of4_magnitude": lambda w, o, c: p(w, o, method="magnitude", nm="2:4"),
        "oneshot_2of4_wanda": lambda w, o, c: p(w, o, method="wanda", nm="2:4", calib=c),
    }


def params_copy(workdir: str, out: str, dtype=None) -> None:
    """The run's params alone (a training checkpoint also holds the optimizer state), optionally rounded
    to `dtype` (bf16: stored so; inference casts them back up)."""
    config, params, step = checkpoint.load_for_inference(workdir)
    if dtype is not None:
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype,
                                                                                    np.floating) else x, params)
    checkpoint.save_run(out, step, params, config, workdir)


def decode_speed(run: serving.Run, new_tokens: int) -> float:
    prompt = run.tokenizer.encode("import os\n\n\ndef ")
    dec = decode.Decoder(run.model, batch=1, cache_len=len(prompt) + new_tokens)
    greedy = lambda: dec.generate(run.params, [prompt], max_new_tokens=new_tokens)  # noqa: E731
    greedy()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = greedy()
        times.append(time.perf_counter() - t0)
    return len(out[0].tokens) / statistics.median(times)


def measure(name: str, workdir: str, max_batches: int, new_tokens: int) -> dict:
    run = serving.load_run(workdir)  # what inference holds in memory (a ppo run: its policy)
    disk = checkpoint.dir_bytes(os.path.join(workdir, "checkpoints", str(run.step)))
    loss = float(evaluation.evaluate_run(workdir, max_batches=max_batches)["eval/loss"])
    return {"variant": name, "dir": os.path.abspath(workdir), "disk_bytes": disk,
            "param_bytes": quantize_script.param_bytes(run.params), "val_loss": loss,
            "bits_per_byte": loss / math.log(2) if run.tokenizer.kind == "byte" else None,
            "decode_tokens_per_s": decode_speed(run, new_tokens) if new_tokens else None}


def build_variants(workdir: str, out: str, group: int, calib: int, trained: dict, only=None) -> dict:
    """name -> directory to measure (built here unless present); `only`: the planned variants to build."""
    plan = planned(group)
    unknown = sorted(set(only or ()) - set(plan) - {"bf16"})
    if unknown:
        raise ValueError(f"--only {unknown}: expected names among bf16, {', '.join(plan)}")
    os.makedirs(out, exist_ok=True)
    dirs = {"f32": os.path.join(out, "f32")}
    if not os.path.isdir(dirs["f32"]):
        params_copy(workdir, dirs["f32"])
    if only is None or "bf16" in only:
        dirs["bf16"] = os.path.join(out, "bf16")
        if not os.path.isdir(dirs["bf16"]):
            params_copy(workdir, dirs["bf16"], jnp.bfloat16)
    for name, make in plan.items():
        if only is not None and name not in only:
            continue
        dirs[name] = os.path.join(out, name)
        if not os.path.isdir(dirs[name]):
            make(workdir, dirs[name], calib)
    for name, run in trained.items():
        config, _ = evaluation.load_run(run)
        if int(config.quant.bits) > 0 and not bool(config.quant.stored):  # QAT: deploy at its own grid
            dirs[name] = os.path.join(out, name)
            if not os.path.isdir(dirs[name]):
                quantize_script.quantize_run(run, dirs[name], method="rtn", bits=int(config.quant.bits),
                                             group=int(config.quant.group), embed_bits=int(config.quant.embed_bits))
        elif config.get("prune") is not None and config.prune.method != "none":  # stored compactly, as exported
            dirs[name] = os.path.join(out, name)
            if not os.path.isdir(dirs[name]):
                nm = f"{int(config.prune.n)}:{int(config.prune.m)}" if config.prune.method == "nm" else ""
                prune_script.prune_run(run, dirs[name], method="magnitude", sparsity=float(config.prune.sparsity),
                                       nm=nm, scope="" if nm else str(config.prune.scope),
                                       include_embedding=bool(config.prune.include_embedding),
                                       include_heads=bool(config.prune.include_heads))
        else:
            dirs[name] = run
    return dirs


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | disk MB | params MB | size vs f32 | val loss | bits/byte | loss change | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "-"
        tps = f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] else "-"
        lines.append(f"| {r['variant']} | {r['disk_bytes'] / 1e6:.2f} | {r['param_bytes'] / 1e6:.2f} | "
                     f"{base['disk_bytes'] / r['disk_bytes']:.2f}x smaller | {r['val_loss']:.4f} | {bpb} | "
                     f"{100 * (r['val_loss'] / base['val_loss'] - 1):+.2f}% | {tps} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["disk_bytes"] / 1e6, r["val_loss"])
        ax.annotate(r["variant"], (r["disk_bytes"] / 1e6, r["val_loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("checkpoint on disk (MB)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("compression: size vs quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(workdir: str, out: str, *, group: int = 64, calib: int = 128, trained: dict | None = None,
           max_batches: int = 16, decode_tokens: int = 64, only=None) -> list[dict]:
    dirs = build_variants(workdir, out, group, calib, trained or {}, only)
    rows = [measure(name, d, max_batches, decode_tokens) for name, d in dirs.items()]
    for r in rows:
        r["loss_change"] = r["val_loss"] / rows[0]["val_loss"] - 1
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"workdir": os.path.abspath(workdir), "group": group, "max_batches": max_batches,
                   "cpu": cpu_name(), "rows": rows}, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table(rows))
    plot(rows, os.path.join(out, "report.png"))
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def parse_variants(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isdir(path):
            raise ValueError(f"--variants entry {item!r}: expected name=RUN_DIR with an existing directory")
        out[name] = path
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        rows = report(FLAGS.workdir, FLAGS.out, group=FLAGS.group, calib=FLAGS.calib,
                      trained=parse_variants(FLAGS.variants), max_batches=FLAGS.max_batches,
                      decode_tokens=FLAGS.decode_tokens, only=FLAGS.only or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(table(rows))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The float run.", required=True)
    flags.DEFINE_string("out", None, "Directory for the variants and the report.", required=True)
    flags.DEFINE_integer("group", 64, "int4 group size.")
    flags.DEFINE_integer("calib", 128, "Calibration sequences (GPTQ, AWQ, Wanda).")
    flags.DEFINE_string("variants", "", "Trained variants: name=RUN_DIR,... (QAT runs, gradually pruned runs).")
    flags.DEFINE_integer("max_batches", 16, "Validation batches per variant.")
    flags.DEFINE_list("only", [], "Build only these of the planned variants (default: all).")
    flags.DEFINE_integer("decode_tokens", 64, "Greedy tokens per decode timing; 0 = skip decode speed.")
    app.run(main)
