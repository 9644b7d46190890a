"""Generate text from an exported decoder (scripts/export.py) without lmstack's model code.

    python scripts/run_exported.py --artifact=exported/default --prompt="def " --max_new_tokens=200 \
        [--temperature=0.8] [--top_k=40] [--top_p=1] [--min_p=0] [--seed=0] [--num_samples=1]

Reads only the artifact directory: the two StableHLO modules (`jax.export.deserialize`), params.npz
and manifest.json, and its tokenizer.json for text <-> ids (data/tokenizer.py: numpy and
`tokenizers`). No model/ import, no Flax: what another runtime would do with the same files
(manifest.json names every input and output in call order), here through jax's XLA. The tokens are
model/decode.Decoder.generate's for the same prompts, settings and seeds (tests/export_test.py).
Samples i = 0.. use seed + i, as Decoder.generate does; an empty prompt starts from <eos>.

An artifact lowered only for CPU runs only on CPU (jax says which platforms it has): export with
--platforms for others. Stop strings and chat templates are not applied here (stop ids are: <eos>).

Runtime (2 CPU cores): about 10 s for a tiny model: start-up, then one compile of each module per
batch size and prompt length, then the decoding itself at the in-process decoder's speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax import export  # noqa: E402

FLAGS = flags.FLAGS
FORMAT = "lmstack-decoder-export/1"


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's sampling settings: the prefill inputs '<field>_B' (model/sampling.Sampling's meaning,
    restated here on purpose: this runner must not import lmstack's model code)."""
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        checks = {"temperature": self.temperature >= 0, "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1,
                  "min_p": 0 <= self.min_p <= 1, "repetition_penalty": self.repetition_penalty > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling {name}={getattr(self, name)!r} is out of range")


@dataclasses.dataclass
class Output:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # 'stop' | 'length'
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class Artifact:
    path: str
    manifest: dict
    prefill: object  # jitted Exported.call
    step: object
    params: list  # device arrays, in manifest['params']['names'] order

    @property
    def state_names(self) -> list[str]:
        return self.manifest["state"]


def _read(path: str, what: str) -> bytes:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} not found: export one with scripts/export.py")
    with open(path, "rb") as f:
        return f.read()


def load(path: str) -> Artifact:
    """An artifact directory -> callable modules and the params on the default device."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"artifact directory {path!r} not found: export one with scripts/export.py")
    manifest = json.loads(_read(os.path.join(path, "manifest.json"), "manifest"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path!r}: manifest format {manifest.get('format')!r}, this runner reads {FORMAT!r}")
    fns = {k: export.deserialize(bytearray(_read(os.path.join(path, manifest[k]["file"]), f"{k} module")))
           for k in ("prefill", "step")}
    spec = manifest["params"]
    with np.load(os.path.join(path, spec["file"])) as z:
        missing = [n for n in spec["names"] if n not in z.files]
        if missing:
            raise ValueError(f"{path!r}: params.npz lacks {len(missing)} arrays the manifest names, "
                             f"e.g. {missing[0]!r}")
        # bfloat16 is stored as raw 2-byte values; the manifest says what to view them as.
        arrays = [z[n] if str(z[n].dtype) == d else z[n].view(jnp.dtype(d))
                  for n, d in zip(spec["names"], spec["dtypes"])]
    return Artifact(path, manifest, jax.jit(fns["prefill"].call), jax.jit(fns["step"].call),
                    [jax.device_put(a) for a in arrays])


def load_tokenizer(art: Artifact):
    """The artifact's tokenizer (imported here: token-id callers need no `tokenizers` package)."""
    from data import tokenizer as tokenizer_lib
    if not art.manifest.get("tokenizer"):
        raise FileNotFoundError(f"{art.path!r} has no tokenizer.json: pass token ids to generate() instead of text")
    return tokenizer_lib.load_tokenizer(os.path.join(art.path, art.manifest["tokenizer"]))


def _check(art: Artifact, prompts, max_new_tokens: int, stop_ids) -> None:
    context, k = art.manifest["context"], art.manifest["max_stop_ids"]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if len(stop_ids) > k:
        raise ValueError(f"{len(stop_ids)} stop token ids; the artifact takes at most {k}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. <eos> to start from nothing)")
        if len(p) >= context:
            raise ValueError(f"prompt {i} has {len(p)} tokens: no room in the artifact's context of {context} "
                             f"(export with a larger --context)")
        bad = [int(x) for x in p if not 0 <= int(x) < art.manifest["vocab_size"]]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {art.manifest['vocab_size']}): {bad[:5]}")


def generate(art: Artifact, prompts, *, max_new_tokens: int, settings: Settings | list[Settings] | None = None,
             seeds: int | list[int] = 0, stop_ids=None, batch: int | None = None) -> list[Output]:
    """Complete every prompt (token-id sequences), `batch` at a time (default: all in one batch).
    Seeds: a list, or an int s giving prompt i seed s + i. Stop ids default to the manifest's (<eos>)."""
    stop_ids = list(dict.fromkeys(int(x) for x in (art.manifest["stop_ids"] if stop_ids is None else stop_ids)))
    settings = list(settings) if isinstance(settings, (list, tuple)) else [settings or Settings()] * len(prompts)
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [int(seeds) + i for i in range(len(prompts))]
    if len(settings) != len(prompts) or len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(settings)} sampling settings and {len(seeds)} seeds")
    _check(art, prompts, max_new_tokens, stop_ids)
    batch = batch or max(len(prompts), 1)
    out = []
    for lo in range(0, len(prompts), batch):
        out += _generate_group(art, prompts[lo:lo + batch], settings[lo:lo + batch], seeds[lo:lo + batch],
                               max_new_tokens, stop_ids)
    return out


def _tops(top, i, j=None):
    lp, ids = top
    lp, ids = (lp[i], ids[i]) if j is None else (lp[i, j], ids[i, j])
    return [(int(a), float(b)) for a, b in zip(ids, lp)]


def _generate_group(art: Artifact, prompts, settings, seeds, max_new_tokens, stop_ids) -> list[Output]:
    b, t = len(prompts), max(len(p) for p in prompts)
    inputs = {"tokens_BxT": np.zeros((b, t), np.int32), "lengths_B": np.array([len(p) for p in prompts], np.int32),
              "seed_B": np.array(seeds, np.uint32), "max_new_B": np.full((b,), max_new_tokens, np.int32),
              "stop_BxK": np.full((b, art.manifest["max_stop_ids"]), -1, np.int32)}
    inputs["stop_BxK"][:, :len(stop_ids)] = stop_ids
    for i, p in enumerate(prompts):
        inputs["tokens_BxT"][i, :len(p)] = p
    for f in dataclasses.fields(Settings):
        inputs[f"{f.name}_B"] = [getattr(s, f.name) for s in settings]
    specs = art.manifest["prefill"]["inputs"][len(art.params):]
    unknown = [x["name"] for x in specs if x["name"] not in inputs]
    if unknown:
        raise ValueError(f"{art.path!r}: prefill inputs {unknown} are unknown to this runner")
    args = [np.asarray(inputs[x["name"]], np.dtype(x["dtype"])) for x in specs]
    n_state, n_top = len(art.state_names), art.manifest["n_top"]
    finish_at = art.state_names.index("finish_B")

    out = art.prefill(*art.params, *args)
    state = out[:n_state]
    token, logp, finish, *top = jax.device_get(out[n_state:])
    rows = [Output([int(token[i])], [float(logp[i])], "", [_tops(top, i)] if n_top else None) for i in range(b)]
    fin = np.asarray(finish)
    while not np.all(fin > 0):
        out = art.step(*art.params, *state, np.int32(max_new_tokens))
        state = out[:n_state]
        tokens, logps, *tops = jax.device_get(out[n_state:])
        new_fin = np.asarray(jax.device_get(state[finish_at]))
        for i, r in enumerate(rows):
            if fin[i] == 0:
                for j in np.nonzero(tokens[i] >= 0)[0]:
                    r.tokens.append(int(tokens[i, j]))
                    r.logprobs.append(float(logps[i, j]))
                    if n_top:
                        r.top_logprobs.append(_tops(tops, i, j))
        fin = np.where(fin > 0, fin, new_fin)
    codes = art.manifest["finish_codes"]
    for r, f in zip(rows, fin):
        r.finish_reason = codes[str(int(f))]
    return rows


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:  # a missing artifact, bad sampling values, a prompt longer than the context: one line, no traceback
        if not FLAGS.artifact:
            raise ValueError("--artifact is required")
        art = load(FLAGS.artifact)
        tok = load_tokenizer(art)
        prompt = [int(x) for x in tok.encode(FLAGS.prompt)] if FLAGS.prompt else [tok.eos_id]
        settings = Settings(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
                            repetition_penalty=FLAGS.repetition_penalty)
        print(f"# {FLAGS.artifact} (context {art.manifest['context']}), prompt {FLAGS.prompt!r}", file=sys.stderr)
        outs = generate(art, [prompt] * FLAGS.num_samples, max_new_tokens=FLAGS.max_new_tokens, settings=settings,
                        seeds=FLAGS.seed)
    except (ValueError, FileNotFoundError, OverflowError) as e:  # its own handler: no lmstack import but the tokenizer
        raise SystemExit(f"run_exported.py: error: {e}") from None
    for i, o in enumerate(outs):
        print(FLAGS.prompt + tok.decode(o.tokens))
        if i + 1 < len(outs):
            print("-" * 40)


if __name__ == "__main__":
    flags.DEFINE_string("artifact", None, "Directory written by scripts/export.py.")
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Most tokens to generate (fewer at <eos> or the context's end).")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with this much probability.")
    flags.DEFINE_float("min_p", 0.0, "Keep tokens at least min_p x as likely as the most likely one.")
    flags.DEFINE_float("repetition_penalty", 1.0, "> 1 discourages tokens already in the prompt or output.")
    flags.DEFINE_integer("num_samples", 1, "Independent samples (seeds seed, seed + 1, ...), decoded as one batch.",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    app.run(main)
