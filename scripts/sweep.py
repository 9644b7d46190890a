"""Grid or random search over config fields; each trial is a normal training run in its own workdir.

    python scripts/sweep.py --config=configs/pretrain_causal.py:tiny --workdir=runs/sweep \
        --grid='optim.lr=1e-3,3e-3;data.batch_size=8,16' [--random=N --seed=S] \
        [--metric=eval/loss --mode=min] [--config.train.steps=50]

--grid lists `field=v1,v2,...` groups separated by ';' (any config field; values parsed with the
field's type). All combinations run, or --random=N of them (drawn with --seed). Trial k of the full
grid trains in WORKDIR/trial_kk_<values> via train.train_and_evaluate: a finished trial (trial.json
with the same config) is not rerun, an interrupted one resumes from its checkpoint, a failing one is
recorded with its error (the sweep fails only if every trial does). Selection is on the final
validation metric. Writes WORKDIR/results.csv, results.md (trial, swept values, eval metrics, wall
seconds) and best.json, and prints the best trial.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import overrides  # noqa: E402
import train  # noqa: E402

log = logging.getLogger("lmstack")
FLAGS = flags.FLAGS


def parse_grid(config, text: str) -> list[tuple[str, list]]:
    """'a.b=1,2;c.d=x' -> [('a.b', [1, 2]), ('c.d', ['x'])], values typed like the config field."""
    grid = []
    for group in filter(None, (g.strip() for g in text.split(";"))):
        field, sep, values = group.partition("=")
        field = field.strip()
        if not sep or not values.strip():
            raise ValueError(f"grid group {group!r}: expected FIELD=V1,V2,...")
        if field in dict(grid):
            raise ValueError(f"grid field {field!r} is listed twice")
        grid.append((field, [overrides.parse(config, field, v.strip()) for v in values.split(",")]))
    if not grid:
        raise ValueError(f"grid {text!r} lists no field")
    return grid


def trial_list(grid, n_random: int = 0, seed: int = 0) -> list[tuple[int, dict]]:
    """(index in the full grid, {field: value}) for every combination, or `n_random` of them."""
    fields = [f for f, _ in grid]
    combos = [dict(zip(fields, vs)) for vs in itertools.product(*(v for _, v in grid))]
    indices = list(range(len(combos)))
    if n_random > 0:
        indices = sorted(random.Random(seed).sample(indices, min(n_random, len(combos))))
    return [(i, combos[i]) for i in indices]


def trial_name(index: int, values: dict) -> str:
    """trial_03_lr0.003_batch_size16: the index in the full grid and the swept values."""
    parts = [f"{field.split('.')[-1]}{v:g}" if isinstance(v, float) else f"{field.split('.')[-1]}{v}"
             for field, v in values.items()]
    return f"trial_{index:02d}_" + re.sub(r"[^A-Za-z0-9._+-]", "", "_".join(parts))[:60]


def run_trial(config, index: int, values: dict, sweep_dir: str) -> dict:
    """One trial (or its recorded result, if it finished under the same config) -> a results row."""
    name = trial_name(index, values)
    workdir = os.path.join(sweep_dir, name)
    record_path = os.path.join(workdir, "trial.json")
    row = {"trial": name, "values": values, "workdir": workdir}
    try:
        trial_config = overrides.apply(copy.deepcopy(config), values)
    except (ValueError, TypeError) as e:
        return dict(row, status="failed", error=f"{type(e).__name__}: {e}", wall_s=0.0, metrics={})
    config_dict = json.loads(trial_config.to_json())
    if os.path.exists(record_path):
        with open(record_path) as f:
            done = json.load(f)
        if done["config"] == config_dict:
            log.info("%s: finished earlier, not rerun", name)
            return dict(row, status="ok", metrics=done["metrics"], wall_s=done["wall_s"], reused=True)
    log.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in values.items()))
    t0 = time.time()
    try:
        last = train.train_and_evaluate(trial_config, workdir)
    except Exception as e:  # noqa: BLE001 - a bad value fails its trial, not the sweep
        log.exception("%s failed", name)
        # one line for the table, all of it kept: a multi-line message's detail follows its first line
        return dict(row, status="failed", error=" ".join(f"{type(e).__name__}: {e}".split()),
                    wall_s=time.time() - t0, metrics={})
    wall = time.time() - t0
    metrics = {k: v for k, v in last.items() if k.startswith("eval/") or k == "step"}
    if last.get("preempted"):
        return dict(row, status="interrupted", metrics=metrics, wall_s=wall)
    with open(record_path, "w") as f:
        json.dump({"values": values, "metrics": metrics, "wall_s": wall, "config": config_dict}, f, indent=1)
    return dict(row, status="ok", metrics=metrics, wall_s=wall)


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The finished trial with the lowest ('min') or highest ('max') finite `metric`."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: expected 'min' or 'max'")
    scored = [r for r in rows if r["status"] == "ok" and math.isfinite(r["metrics"].get(metric, math.nan))]
    ok = [r for r in rows if r["status"] == "ok"]
    if ok and not scored:
        have = sorted({k for r in ok for k in r["metrics"]})
        raise ValueError(f"metric {metric!r} is in no finished trial's results; they have: {', '.join(have)}")
    if not scored:
        return None
    key = lambda r: r["metrics"][metric]  # noqa: E731
    return min(scored, key=key) if mode == "min" else max(scored, key=key)


def _table(rows: list[dict], fields: list[str]) -> tuple[list[str], list[list]]:
    metric_names = sorted({k for r in rows for k in r["metrics"] if k != "step"})
    header = ["trial", "status", *fields, *metric_names, "step", "wall_s", "error"]
    body = [[r["trial"], r["status"], *(r["values"][f] for f in fields),
             *(r["metrics"].get(m, "") for m in metric_names), r["metrics"].get("step", ""),
             round(r["wall_s"], 1), r.get("error", "")] for r in rows]
    return header, body


def _cell(v) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def write_results(sweep_dir: str, rows: list[dict], fields: list[str], best: dict | None, metric: str,
                  mode: str) -> None:
    """results.csv, results.md and best.json in the sweep directory."""
    header, body = _table(rows, fields)
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)
    lines = [f"# Sweep: {len(rows)} trials, selection on {metric} ({mode})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in line) + " |" for line in body]
    if best is not None:
        lines += ["", f"**Best**: {best['trial']} ({metric} = {best['metrics'][metric]:.4g}; "
                      + ", ".join(f"{k}={v}" for k, v in best["values"].items()) + ")"]
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if best is not None:
        with open(os.path.join(sweep_dir, "best.json"), "w") as f:
            json.dump({"trial": best["trial"], "workdir": best["workdir"], "values": best["values"],
                       "metric": metric, "mode": mode, "value": best["metrics"][metric],
                       "metrics": best["metrics"]}, f, indent=1)


def run_sweep(config, sweep_dir: str, grid_text: str, *, n_random: int = 0, seed: int = 0,
              metric: str = "eval/loss", mode: str = "min") -> dict:
    """Runs (or resumes) the sweep; returns {'rows': [...], 'best': row or None}. Raises if every trial failed."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: expected 'min' or 'max'")
    grid = parse_grid(config, grid_text)
    os.makedirs(sweep_dir, exist_ok=True)
    rows = []
    for index, values in trial_list(grid, n_random, seed):
        rows.append(run_trial(config, index, values, sweep_dir))
        if rows[-1]["status"] == "interrupted":
            break
    best, problem = None, None
    try:
        best = pick_best(rows, metric, mode)
    except ValueError as e:  # the tables are still written
        problem = e
    write_results(sweep_dir, rows, [f for f, _ in grid], best, metric, mode)
    if problem is not None:
        raise problem
    if all(r["status"] == "failed" for r in rows):
        raise RuntimeError(f"all {len(rows)} trials failed; first error: {rows[0]['error']} "
                           f"(see {os.path.join(sweep_dir, 'results.md')})")
    return {"rows": rows, "best": best}


def define_flags() -> None:
    """--config (file + `--config.x.y=v` overrides) and --workdir are train.py's flags, defined on its import."""
    flags.DEFINE_string("grid", None, "'field=v1,v2;field2=v3,v4': the values to combine.")
    flags.DEFINE_integer("random", 0, "Run this many random combinations of the grid; 0 = all of them.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Seed for --random.")
    flags.DEFINE_string("metric", "eval/loss", "Validation metric that selects the best trial.")
    flags.DEFINE_enum("mode", "min", ["min", "max"], "Whether the best trial minimises or maximises --metric.")
    flags.mark_flags_as_required(["grid"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.quiet_logs()
    out = run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.grid, n_random=FLAGS.random, seed=FLAGS.seed,
                    metric=FLAGS.metric, mode=FLAGS.mode)
    rows, best = out["rows"], out["best"]
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"{len(rows)} trials ({failed} failed); results in {os.path.join(FLAGS.workdir, 'results.md')}")
    if any(r["status"] == "interrupted" for r in rows):
        print("interrupted: rerun the same command to resume")
        return 1
    print(f"best: {best['trial']} {FLAGS.metric}={best['metrics'][FLAGS.metric]:.4g} ({best['workdir']})")
    return 0


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'sweep.py', errors=(ValueError, OSError, RuntimeError))
