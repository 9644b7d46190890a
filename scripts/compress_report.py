"""One table of what compression does to a run: size, quality and decode speed of every variant.

    python scripts/compress_report.py --workdir=runs/mini --out=runs/mini_compress [--group=64] \
        [--variants=qat_int4=runs/mini_qat,gradual_50=runs/mini_prune50,gradual_2of4=runs/mini_prune24] \
        [--max_batches=16] [--decode_tokens=64] [--calib=128] [--only=int8,int4_gptq,...]

Rows: the run's params (f32, stored without the optimizer state a training checkpoint holds), the
same rounded to bf16, int8, int4 round-to-nearest / GPTQ / AWQ (group --group), one-shot 50%
magnitude and Wanda, one-shot 2:4, and each --variants entry (a trained run: QAT runs are quantized
here at their own bits and group, gradually pruned runs exported compactly by scripts/prune.py at
their own sparsity, whose magnitude masks are their zeros; others measured as they are). Variants
are built under OUT (an existing OUT/<name> is reused when OUT/variants.json says it was built from the same
run, checkpoint step, group and calibration; otherwise the report is refused, naming both). Columns: bytes
on disk of the checkpoint, parameter bytes in memory once loaded (a pruned
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

import overrides  # noqa: E402
import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import serving  # noqa: E402
from data import tokenizer as tokenizer_lib  # noqa: E402
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
    config, step = evaluation.load_run(workdir)
    if config.mode in serving.LM_MODES:
        run = serving.load_run(workdir)  # what inference holds in memory (a ppo run: its policy)
        params, kind = run.params, run.tokenizer.kind
    else:  # an encoder, classifier or reward model: size and quality (its mode's eval loss), no decoding
        run, (_, params, _) = None, checkpoint.load_for_inference(workdir, step)
        kind = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json")).kind
    disk = checkpoint.dir_bytes(os.path.join(workdir, "checkpoints", str(step)))
    loss = float(evaluation.evaluate_run(workdir, max_batches=max_batches)["eval/loss"])
    per_token_nll = config.mode in ("causal", "sft")  # other modes' eval loss is not bits per token
    return {"variant": name, "dir": os.path.abspath(workdir), "disk_bytes": disk,
            "param_bytes": quantize_script.param_bytes(params), "val_loss": loss,
            "bits_per_byte": loss / math.log(2) if kind == "byte" and per_token_nll else None,
            "decode_tokens_per_s": decode_speed(run, new_tokens) if new_tokens and run is not None else None}


# which settings each planned variant is built with, besides its source run (the recipe a reused one must match)
USES = {"int8": (), "int4_rtn": ("group",), "int4_gptq": ("group", "calib"), "int4_awq": ("group", "calib"),
        "oneshot_50_magnitude": (), "oneshot_50_wanda": ("calib",), "oneshot_2of4_magnitude": (),
        "oneshot_2of4_wanda": ("calib",)}
RECIPES = "variants.json"  # OUT/variants.json: name -> the recipe its directory was built from


def _recipe(source: str, step: int, **settings) -> dict:
    """What a variant is built from: the source run and its checkpoint step, and the settings it uses."""
    return {"source": os.path.abspath(source), "step": step, **settings}


class _Variants:
    """OUT/<name> directories with the recipe each was built from. One present is reused only when its recipe
    is this report's (the same source run, step, group, calibration); otherwise the report is refused before
    anything is built: a reused variant of another run or group would be reported as this one's."""

    def __init__(self, out: str):
        self.out, self.path = out, os.path.join(out, RECIPES)
        self.recipes = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def check(self, name: str, recipe: dict) -> None:
        d = os.path.join(self.out, name)
        if os.path.isdir(d) and self.recipes.get(name) != recipe:
            was = self.recipes.get(name, "an unknown recipe (no entry in OUT/variants.json)")
            raise ValueError(f"{d!r} was built from {was}, not this report's {recipe}: give another --out, or remove "
                             f"{d!r} to rebuild it")

    def get(self, name: str, recipe: dict, build) -> str:
        d = os.path.join(self.out, name)
        if not os.path.isdir(d):
            build(d)
            self.recipes[name] = recipe
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.recipes, f, indent=1)
            os.replace(self.path + ".tmp", self.path)
        return d


def build_variants(workdir: str, out: str, group: int, calib: int, trained: dict, only=None) -> dict:
    """name -> directory to measure (built here unless present from the same recipe); `only`: the planned
    variants to build."""
    plan = planned(group)
    unknown = sorted(set(only or ()) - set(plan) - {"bf16"})
    if unknown:
        raise ValueError(f"--only {unknown}: expected names among bf16, {', '.join(plan)}")
    settings = {"group": group, "calib": calib}
    step = evaluation.load_run(workdir)[1]
    jobs = {"f32": (_recipe(workdir, step), lambda d: params_copy(workdir, d))}  # name -> (recipe, build(dir))
    if only is None or "bf16" in only:
        jobs["bf16"] = (_recipe(workdir, step, dtype="bfloat16"), lambda d: params_copy(workdir, d, jnp.bfloat16))
    for name, make in plan.items():
        if only is None or name in only:
            jobs[name] = (_recipe(workdir, step, **{k: settings[k] for k in USES[name]}),
                          lambda d, make=make: make(workdir, d, calib))
    dirs = {}
    for name, run in trained.items():
        config, run_step = evaluation.load_run(run)
        if int(config.quant.bits) > 0 and not bool(config.quant.stored):  # QAT: deploy at its own grid
            jobs[name] = (_recipe(run, run_step, quantized="rtn"),
                          lambda d, run=run, q=config.quant: quantize_script.quantize_run(
                              run, d, method="rtn", bits=int(q.bits), group=int(q.group), embed_bits=int(q.embed_bits)))
        elif config.get("prune") is not None and config.prune.method != "none":  # stored compactly, as exported
            pc = config.prune
            nm = f"{int(pc.n)}:{int(pc.m)}" if pc.method == "nm" else ""
            jobs[name] = (_recipe(run, run_step, exported="prune"),
                          lambda d, run=run, pc=pc, nm=nm: prune_script.prune_run(
                              run, d, method="magnitude", sparsity=float(pc.sparsity), nm=nm,
                              scope="" if nm else str(pc.scope), include_embedding=bool(pc.include_embedding),
                              include_heads=bool(pc.include_heads)))
        else:
            dirs[name] = run
    os.makedirs(out, exist_ok=True)
    variants = _Variants(out)
    for name, (recipe, _) in jobs.items():  # every reuse checked before anything is built
        variants.check(name, recipe)
    built = {name: variants.get(name, recipe, build) for name, (recipe, build) in jobs.items()}
    return {**built, **dirs}


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
    rows = report(FLAGS.workdir, FLAGS.out, group=FLAGS.group, calib=FLAGS.calib,
                  trained=parse_variants(FLAGS.variants), max_batches=FLAGS.max_batches,
                  decode_tokens=FLAGS.decode_tokens, only=FLAGS.only or None)  # errors: one line (overrides.run)
    print(table(rows))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The float run.", required=True)
    flags.DEFINE_string("out", None, "Directory for the variants and the report.", required=True)
    flags.DEFINE_integer("group", 64, "int4 group size.", lower_bound=0)
    flags.DEFINE_integer("calib", 128, "Calibration sequences (GPTQ, AWQ, Wanda).", lower_bound=1)
    flags.DEFINE_string("variants", "", "Trained variants: name=RUN_DIR,... (QAT runs, gradually pruned runs).")
    flags.DEFINE_integer("max_batches", 16, "Validation batches per variant.", lower_bound=0)
    flags.DEFINE_list("only", [], "Build only these of the planned variants (default: all).")
    flags.DEFINE_integer("decode_tokens", 64, "Greedy tokens per decode timing; 0 = skip decode speed.", lower_bound=0)
    overrides.run(main, 'compress_report.py')
