"""Forgetting and gain of continued runs: every checkpoint on every domain, before and after.

    python scripts/continual_report.py --workdir=runs/continual/plain --workdir=runs/continual/replay ... \
        --eval=old=runs/continual/stdlib --eval=new=runs/continual/new_val.txt [--out=DIR] [--max_batches=50]

Every checkpoint of every --workdir, and the final checkpoint of each one's source run (its init_from:
"before"), is evaluated on every --eval (NAME=PATH, or PATH named by its base name) exactly as
scripts/evaluate.py --data does (evaluation.evaluate_run; a prepared dataset directory: its 'val' split;
a text file or directory: all of it). The first --eval is the old domain, the last the new one:
forgetting = old-domain loss after - before (lower is better), gain = new-domain loss before - after
(higher is better), both at each run's last checkpoint; "forgetting vs first" divides each run's
forgetting by the first --workdir's (list the plain continued run first). Prints the markdown table;
--out=DIR also writes DIR/continual_report.md, .json and .png (loss per domain against the step).
Errors (workdir, checkpoint, data) exit 1 with the reason.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import hostenv  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_multi_string("workdir", [], "A continued run (init_from set); repeat for each run.")
    flags.DEFINE_multi_string("eval", [], "NAME=PATH (or PATH) to evaluate on; the first is the old domain, the "
                              "last the new one.")
    flags.DEFINE_string("out", "", "Directory for continual_report.md / .json / .png.")
    flags.DEFINE_integer("max_batches", 50, "Eval batches per (checkpoint, data); 0 = all.", lower_bound=0)


def parse_evals(specs: list[str]) -> dict[str, str]:
    """{name: path} of the --eval flags; errors name the bad value."""
    if len(specs) < 2:
        raise ValueError(f"--eval given {len(specs)} times: give the old domain's data and the new one's")
    evals = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (os.path.basename(os.path.normpath(spec)), spec)
        if name in evals:
            raise ValueError(f"--eval={spec!r}: the name {name!r} is used twice")
        if not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"--eval={spec!r}: {path!r} does not exist")
        evals[name] = path
    return evals


def _steps(workdir: str) -> list[int]:
    mngr = checkpoint.open_read_only(workdir)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def _losses(workdir: str, step: int, evals: dict, max_batches: int) -> dict[str, float]:
    return {name: float(evaluation.evaluate_run(workdir, step=step, data=path, max_batches=max_batches)["eval/loss"])
            for name, path in evals.items()}


def report(workdirs: list[str], evals: dict[str, str], max_batches: int = 50) -> dict:
    """Every checkpoint of every run and each source's final checkpoint on every eval; forgetting and gain."""
    if not workdirs:
        raise ValueError("no --workdir given")
    sources, runs = {}, []
    for workdir in workdirs:
        config, _ = evaluation.load_run(workdir)
        if not config.init_from:
            raise ValueError(f"--workdir={workdir!r} has init_from='': it continues no run (nothing to compare with)")
        sources.setdefault(config.init_from, None)
        runs.append({"workdir": workdir, "source": config.init_from, "continual": config.continual.to_dict()
                     if "continual" in config else {}, "checkpoints": []})
    for source in sources:
        step = _steps(source)[-1]
        sources[source] = {"step": step, "loss": _losses(source, step, evals, max_batches)}
    old, new = list(evals)[0], list(evals)[-1]
    for run in runs:
        for step in _steps(run["workdir"]):
            run["checkpoints"].append({"step": step, "loss": _losses(run["workdir"], step, evals, max_batches)})
        before, after = sources[run["source"]]["loss"], run["checkpoints"][-1]["loss"]
        run["forgetting"] = after[old] - before[old]
        run["gain"] = before[new] - after[new]
    first = runs[0]["forgetting"]
    for run in runs:
        run["forgetting_vs_first"] = run["forgetting"] / first if first > 0 else None
    return {"evals": evals, "old": old, "new": new, "max_batches": max_batches, "before": sources, "runs": runs}


def markdown(result: dict) -> str:
    names, old, new = list(result["evals"]), result["old"], result["new"]
    lines = [f"Eval loss (nats per token; first {result['max_batches'] or 'all'} batches of each eval set). "
             f"Old domain: `{old}` ({result['evals'][old]}); new domain: `{new}` ({result['evals'][new]}).", "",
             "| run | step | " + " | ".join(f"{n} loss" for n in names) + " | forgetting | gain | forgetting vs first |",
             "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    for source, b in result["before"].items():
        lines.append(f"| before: `{source}` | {b['step']} | " + " | ".join(f"{b['loss'][n]:.4f}" for n in names)
                     + " | | | |")
    for run in result["runs"]:
        for i, ck in enumerate(run["checkpoints"]):
            last = i == len(run["checkpoints"]) - 1
            extra = (f"{run['forgetting']:+.4f} | {run['gain']:+.4f} | "
                     + (f"{run['forgetting_vs_first']:.2f}" if run["forgetting_vs_first"] is not None else "n/a")
                     if last else " | | ")
            lines.append(f"| `{run['workdir']}` | {ck['step']} | "
                         + " | ".join(f"{ck['loss'][n]:.4f}" for n in names) + f" | {extra} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["evals"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (source, b) in enumerate(result["before"].items()):
            ax.axhline(b["loss"][name], color="black", linestyle="--", linewidth=1,
                       label="before" if i == 0 else None)
        for run in result["runs"]:
            steps = [0] + [ck["step"] for ck in run["checkpoints"]]
            losses = [result["before"][run["source"]]["loss"][name]] + [ck["loss"][name] for ck in run["checkpoints"]]
            ax.plot(steps, losses, marker="o", label=os.path.basename(os.path.normpath(run["workdir"])))
        role = "old domain" if name == result["old"] else "new domain" if name == result["new"] else "eval"
        ax.set_title(f"{name} ({role})")
        ax.set_xlabel("step of the continued run")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"continual_report.{ext}") for ext in ("md", "json", "png")]
    with open(paths[0], "w") as f:
        f.write(markdown(result))
    with open(paths[1], "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plot(result, paths[2])
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    hostenv.compile_cache(tempfile.mkdtemp(prefix="lmstack_report_xla_"))  # one eval program, compiled once
    try:
        result = report(FLAGS.workdir, parse_evals(FLAGS.eval), FLAGS.max_batches)
    except (FileNotFoundError, ValueError) as e:
        print(f"continual_report.py: error: {e}", file=sys.stderr)
        return 1
    print(markdown(result))
    if FLAGS.out:
        for path in write(result, FLAGS.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'continual_report.py')
