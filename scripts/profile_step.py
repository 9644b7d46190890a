"""Where the train step's time goes on CPU: per-op profile mapped onto the optimised HLO.

    python scripts/profile_step.py --config=configs/pretrain_mini.py [--steps=3] [--top=25] [--gpt2] [--json]
        [--keep_hlo]

Compiles the config's train step (scripts/benchmark.py's make_jax_step, random tokens),
warms it up, then traces --steps steps with jax.profiler (blocking on each) and reports:
wall ms/step; summed op ms/step (CPU time of every XLA op, all threads added up, so it can
exceed wall time when ops run in parallel); a category table (dense matmul = 2-D dots,
attention matmul = batched dots, each split by operand dtype, and elementwise/reduce/copy
for everything else) with ms/step, share and GFLOP/s for the dots (2 x output elements x
contracting size), then "wall ms" (every instant of the trace split evenly among the ops
running then: these add up to the step's busy time, so they say what removing an op would
save) with its GFLOP/s, and "alone ms" (time no other op ran: a single-threaded op, such as
a batched matmul of small items, leaves the second core idle then); a component table (attn, mlp, norm, embed/head, loss/metrics, optimizer/other
from the op's metadata op_name, forward and backward (op_name has "transpose(jvp(") split);
and the top-N ops. --json prints one JSON object instead. Flags --config, --gpt2,
--num_tokens and --warmup are scripts/benchmark.py's (imported as a module).

How: XLA_FLAGS gets `--xla_dump_to=<tmpdir> --xla_dump_hlo_as_text` before jax is imported;
the trace's `*.xplane.pb` is decoded with the small protobuf wire decoder below, and each
op event (named after its HLO instruction) is looked up in the dumped
`*train_step.cpu_after_optimizations.txt`; fusions are classified by the `dot(`
instructions of their called computation. This relies on XLA:CPU's per-thunk profiler
events and on the HLO dump's file and instruction naming as of jax 0.10.x: if a jax
upgrade changes either, "unmatched ms/step" grows or the dump is not found (a clear error).

Runtime: configs/shakespeare_char.py about 7 s on 2 CPU cores (compile dominates); bigger
configs add their compile time plus (warmup + steps) steps.
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile

_DUMP_DIR = None
if __name__ == "__main__":  # the dump flags must be in place before the XLA backend starts
    _DUMP_DIR = tempfile.mkdtemp(prefix="profile_step_hlo_")
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={_DUMP_DIR}", "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=.*train_step.*"]))

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from absl import flags  # noqa: E402

import hostenv  # noqa: E402
import overrides  # noqa: E402

FLAGS = flags.FLAGS

OTHER = "elementwise/reduce/copy"
_CONTROL_FLOW = {"while", "conditional", "call"}  # their bodies' ops are traced on their own


# ----------------------------------------------------------------------------- xplane decoding

def _varint(buf: bytes, i: int):
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes):
    """Yields (field_number, value) of one protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {i}")
        yield field, value


def decode_xspace(data: bytes) -> list[tuple[str, str, int, int]]:
    """XSpace bytes -> [(line_name, event_name, duration_ps, start_ps)] over all planes.

    XSpace.planes=1; XPlane: name=2, lines=3, event_metadata=4 (map entry: key=1, value=2 with
    XEventMetadata.name=2); XLine: name=2, timestamp_ns=3, events=4; XEvent: metadata_id=1,
    offset_ps=2 (from the line's timestamp), duration_ps=3.
    """
    out = []
    for field, plane in _fields(data):
        if field != 1:
            continue
        names, lines = {}, []
        for f, v in _fields(plane):
            if f == 3:
                lines.append(v)
            elif f == 4:
                entry = dict(_fields(v))
                names[entry.get(1, 0)] = dict(_fields(entry.get(2, b""))).get(2, b"").decode(errors="replace")
        for line in lines:
            line_name, line_ns, events = "", 0, []
            for f, v in _fields(line):
                if f == 2:
                    line_name = v.decode(errors="replace")
                elif f == 3:
                    line_ns = v
                elif f == 4:
                    events.append(v)
            for ev in events:
                e = dict(_fields(ev))
                out.append((line_name, names.get(e.get(1, 0), "?"), e.get(3, 0), line_ns * 1000 + e.get(2, 0)))
    return out


# ----------------------------------------------------------------------------- HLO text

_INSTR = re.compile(r"^\s*(?:ROOT )?%([^\s=]+) = (.+?) ([a-z][\w-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([^\s(]+) .*\{\s*$")


def _shape(text: str):
    """'bf16[8,4,32]{2,1,0}' -> ('bf16', [8, 4, 32]); tuples and tokens -> ('', [])."""
    m = re.match(r"([a-z]\w*)\[([\d,]*)\]", text)
    return (m.group(1), [int(d) for d in m.group(2).split(",") if d]) if m else ("", [])


def parse_hlo(text: str) -> tuple[dict, dict]:
    """HLO module text -> (instructions by name, instruction names by computation).

    Each instruction: {name, computation, dtype, dims, opcode, operands, calls, op_name, line}.
    """
    instrs, comps, comp = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, shape, opcode, rest = m.groups()
        dtype, dims = _shape(shape.lstrip("("))
        args = rest.split(")", 1)[0]
        calls = re.search(r"calls=%([^\s,]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instrs[name] = {"name": name, "computation": comp, "dtype": dtype, "dims": dims, "opcode": opcode,
                        "operands": re.findall(r"%([^\s,)]+)", args), "calls": calls.group(1) if calls else None,
                        "op_name": op_name.group(1) if op_name else "", "line": line.strip(),
                        "shape": re.sub(r"\{[^}]*\}|/\*[^*]*\*/", "", shape)}
        comps[comp].append(name)
    return instrs, dict(comps)


def _dot_info(dot: dict, instrs: dict) -> dict:
    """FLOPs, kind and operand dtype of one `dot` instruction."""
    lhs = instrs.get(dot["operands"][0], {}) if dot["operands"] else {}
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot["line"])
    k = math.prod(lhs["dims"][int(d)] for d in contracting.group(1).split(",") if d) if contracting and lhs else 0
    dtypes = sorted({instrs[o]["dtype"] for o in dot["operands"] if o in instrs})
    return {"flops": 2 * math.prod(dot["dims"]) * k,
            "kind": "dense matmul" if len(dot["dims"]) <= 2 else "attention matmul",
            "dtype": dtypes[0] if len(dtypes) == 1 else "mixed " + "/".join(dtypes),
            "shape": dot["shape"]}


def component(op_name: str) -> tuple[str, bool]:
    """Metadata op_name -> (model component, is_backward)."""
    backward = "transpose(jvp(" in op_name
    path = op_name.lower()
    if "norm" in path:
        comp = "norm"
    elif "/attn/" in path or "/attention/" in path:
        comp = "attn"
    elif "/mlp/" in path:
        comp = "mlp"
    elif "embed" in path or "logits" in path or "/head" in path:
        comp = "embed/head"
    elif "transformer" in path:
        comp = "model other"
    elif "jvp(" in path:  # differentiated but outside the model: the objective
        comp = "loss/metrics"
    else:
        comp = "optimizer/other"
    return comp, backward


def classify(name: str, instrs: dict, comps: dict) -> dict:
    """One op (an HLO instruction name from the trace) -> category, FLOPs, component, shape."""
    ins = instrs[name]
    body = [instrs[n] for n in comps.get(ins["calls"], [])] if ins["calls"] else [ins]
    dots = [_dot_info(d, instrs) for d in body if d["opcode"] == "dot"]
    comp, backward = component(ins["op_name"])
    row = {"op": name, "opcode": ins["opcode"], "op_name": ins["op_name"], "component": comp,
           "backward": backward, "flops": sum(d["flops"] for d in dots)}
    if dots:
        main = max(dots, key=lambda d: d["flops"])
        row.update(category=f"{main['kind']} {main['dtype']}", kind=main["kind"], dtype=main["dtype"],
                   shape=main["shape"])
    else:
        row.update(category=OTHER, kind=ins["opcode"], dtype=ins["dtype"], shape=ins["shape"])
    return row


# ----------------------------------------------------------------------------- profiling

def op_times(events, instrs: dict) -> tuple[dict, dict, dict, dict, float]:
    """-> (summed ps per HLO instruction, wall-attributed ps per instruction, ps it ran alone (no
    other op running: a single-threaded op leaves the other core idle then), executions per
    instruction, unmatched ps).

    Ops on XLA threads only; while/call/conditional are left out as their bodies' ops are events
    too. Wall-attributed time splits every instant among the ops running then (two ops side by
    side on the two threads get half each), so it adds up to the time some op was running, and
    an op slowed down by a neighbour is charged only its part of the machine.
    """
    per_op, wall, alone, count = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()
    unmatched, edges = 0, []
    for line, name, dur, start in events:
        if "XLA" not in line or name.startswith(("ThunkExecutor", "end:", "Slinky", "Threadpool")):
            continue
        if name in instrs:
            if instrs[name]["opcode"] not in _CONTROL_FLOW:
                per_op[name] += dur
                count[name] += 1
                edges += [(start, 1, name), (start + dur, -1, name)]
        else:
            unmatched += dur
    active, prev = collections.Counter(), None
    for t, kind, name in sorted(edges, key=lambda e: (e[0], e[1])):
        n = sum(active.values())
        if n and t > prev:
            for op, k in active.items():
                wall[op] += (t - prev) * k / n
            if n == 1:
                alone[next(iter(active))] += t - prev
        active[name] += kind
        if not active[name]:
            del active[name]
        prev = t
    return per_op, wall, alone, count, unmatched


def summarise(events, hlo_text: str, steps: int, wall_s: float) -> dict:
    """Trace events + train-step HLO -> the report dict (all times in ms per step)."""
    instrs, comps = parse_hlo(hlo_text)
    per_op, wall, alone, count, unmatched = op_times(events, instrs)
    rows = []
    for n, ps in per_op.items():
        r = classify(n, instrs, comps)
        r["ms"] = ps / 1e9 / steps
        r["wall_ms"] = wall[n] / 1e9 / steps
        r["alone_ms"] = alone[n] / 1e9 / steps
        r["runs_per_step"] = count[n] / steps  # > 1 inside a while loop (scanned layers)
        r["flops"] *= r["runs_per_step"]
        rows.append(r)
    for r in rows:
        r["gflops"] = r["flops"] / (r["ms"] / 1e3) / 1e9 if r["flops"] and r["ms"] else None
    total = sum(r["ms"] for r in rows)

    def table(key):
        acc = collections.defaultdict(lambda: {"ms": 0.0, "wall_ms": 0.0, "alone_ms": 0.0, "flops": 0, "fwd_ms": 0.0,
                                               "bwd_ms": 0.0, "ops": 0})
        for r in rows:
            a = acc[key(r)]
            a["ms"] += r["ms"]
            a["wall_ms"] += r["wall_ms"]
            a["alone_ms"] += r["alone_ms"]
            a["flops"] += r["flops"]
            a["bwd_ms" if r["backward"] else "fwd_ms"] += r["ms"]
            a["ops"] += 1
        for a in acc.values():
            a["share"] = a["ms"] / total if total else 0.0
            a["gflops"] = a["flops"] / (a["ms"] / 1e3) / 1e9 if a["flops"] and a["ms"] else None
            a["wall_gflops"] = a["flops"] / (a["wall_ms"] / 1e3) / 1e9 if a["flops"] and a["wall_ms"] else None
        return dict(sorted(acc.items(), key=lambda kv: -kv[1]["ms"]))

    rows.sort(key=lambda r: -r["ms"])
    return {"wall_ms_per_step": 1e3 * wall_s, "op_ms_per_step": total,
            "busy_ms_per_step": sum(r["wall_ms"] for r in rows), "unmatched_ms_per_step": unmatched / 1e9 / steps,
            "steps": steps, "train_step_flops": sum(r["flops"] for r in rows),
            "categories": table(lambda r: r["category"]), "components": table(lambda r: r["component"]),
            "ops": rows}


def find_hlo(dump_dir: str) -> str:
    paths = sorted(glob.glob(os.path.join(dump_dir, "*train_step.cpu_after_optimizations.txt")))
    if not paths:
        raise FileNotFoundError(
            f"no *train_step.cpu_after_optimizations.txt in {dump_dir}: XLA_FLAGS must contain "
            f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text before jax starts (run this file as a script)")
    return paths[-1]  # the last compiled train step


def profile(config, steps: int = 3, dump_dir: str | None = None, num_tokens: int | None = None,
            warmup: int = 2) -> dict:
    """Compile, warm up and trace `steps` train steps; -> summarise()'s dict.

    `dump_dir` is where XLA dumps HLO text: it only works if XLA_FLAGS named it before the
    XLA backend started (the script does that; default: the script's dump directory).
    """
    dump_dir = dump_dir or _DUMP_DIR
    if not dump_dir:
        raise ValueError("profile() needs the HLO dump directory set in XLA_FLAGS at startup (run as a script)")
    import benchmark  # here, not at the top: see define_flags
    num_tokens = num_tokens or benchmark.default_num_tokens(config)
    run, _, _, _ = benchmark.make_jax_step(config, num_tokens)
    for _ in range(warmup + 1):
        jax.block_until_ready(run())
    hlo_path = find_hlo(dump_dir)
    with open(hlo_path) as f:
        hlo_text = f.read()
    with tempfile.TemporaryDirectory(prefix="profile_step_trace_") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            times = [benchmark.timed(run, 1) for _ in range(steps)]  # one step, waited on
        finally:
            jax.profiler.stop_trace()
        events = []
        for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
            with open(path, "rb") as f:
                events += decode_xspace(f.read())
    out = summarise(events, hlo_text, steps, statistics.median(times))
    out["hlo_path"] = hlo_path
    return out


# ----------------------------------------------------------------------------- report

def _short(op_name: str, width: int = 60) -> str:
    s = re.sub(r"^jit\([^)]*\)/", "", op_name).replace("transpose(jvp(", "bwd(").replace("Transformer.", "")
    return s if len(s) <= width else "..." + s[-(width - 3):]


def report(r: dict, top: int) -> str:
    def gf(x):
        return f"{x:8.1f}" if x else "       -"
    out = [f"wall {r['wall_ms_per_step']:.1f} ms/step (median of {r['steps']} traced steps, blocking on each); "
           f"summed op time {r['op_ms_per_step']:.1f} ms/step (all threads); "
           f"some op running {r['busy_ms_per_step']:.1f} ms/step; "
           f"unmatched events {r['unmatched_ms_per_step']:.2f} ms/step; "
           f"dot FLOPs {r['train_step_flops'] / 1e9:.2f} GFLOP/step",
           "ms: summed op time; wall ms: each instant split among the ops running then; alone ms: no other "
           "op running",
           "", f"{'category':32s} {'ms/step':>8s} {'share':>6s} {'GFLOP/s':>8s} {'wall ms':>8s} {'GFLOP/s':>8s} "
               f"{'alone ms':>8s} {'ops':>5s}"]
    for k, a in r["categories"].items():
        out.append(f"{k:32s} {a['ms']:8.2f} {a['share']:6.1%} {gf(a['gflops'])} {a['wall_ms']:8.2f} "
                   f"{gf(a['wall_gflops'])} {a['alone_ms']:8.2f} {a['ops']:5d}")
    out += ["", f"{'component':32s} {'ms/step':>8s} {'share':>6s} {'fwd ms':>8s} {'bwd ms':>8s} {'GFLOP/s':>8s} "
                f"{'wall ms':>8s}"]
    for k, a in r["components"].items():
        out.append(f"{k:32s} {a['ms']:8.2f} {a['share']:6.1%} {a['fwd_ms']:8.2f} {a['bwd_ms']:8.2f} {gf(a['gflops'])} "
                   f"{a['wall_ms']:8.2f}")
    out += ["", f"top {top} ops:", f"{'ms/step':>8s} {'GFLOP/s':>8s}  {'kind':24s} {'shape':22s} op_name"]
    for row in r["ops"][:top]:
        kind = f"{row['kind']} {row['dtype']}" if row["flops"] else row["kind"]
        out.append(f"{row['ms']:8.2f} {gf(row['gflops'])}  {kind:24s} {row['shape']:22s} {_short(row['op_name'])}")
    return "\n".join(out)


def main(argv):
    del argv
    hostenv.tune_malloc()
    import benchmark
    config = FLAGS.config
    if FLAGS.gpt2:
        benchmark.gpt2_shape(config)
    try:
        r = profile(config, FLAGS.steps, num_tokens=FLAGS.num_tokens or None, warmup=FLAGS.warmup)
    finally:
        if FLAGS.keep_hlo:
            print(f"HLO dump kept in {_DUMP_DIR}", file=sys.stderr)
        else:
            shutil.rmtree(_DUMP_DIR, ignore_errors=True)
    print(json.dumps(r) if FLAGS.json else report(r, FLAGS.top))


def define_flags():
    """--config, --gpt2, --num_tokens, --warmup and --steps are scripts/benchmark.py's flags (not
    defined at import: a test process that imports train.py already has a --config)."""
    import benchmark
    benchmark.FLAGS.set_default("steps", 3)
    benchmark.FLAGS.set_default("warmup", 2)
    flags.DEFINE_integer("top", 25, "Number of ops in the top-ops table.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the tables.")
    flags.DEFINE_bool("keep_hlo", False, "Keep the HLO dump (path printed on stderr) to read an op's fusion.")


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'profile_step.py')
