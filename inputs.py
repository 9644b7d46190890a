"""Each mode's inputs: documents or task records -> the run's tokenizer -> a checkpointable train
iterator and eval batches (`Inputs`), and how other data replaces a mode's validation split
(scripts/evaluate.py --data). modes.py names, per mode, which builders it uses: the text modes' (causal,
mlm) are here, the task modes' (classify, qa, sft) in task_inputs.py, the post-training modes'
(preference pairs, RL prompts) in feedback_inputs.py.

The run's tokenizer is saved in WORKDIR/tokenizer.json: a resumed run reuses it (one left in a workdir
without a checkpoint, by a start that failed, is replaced), a warm start
(`init_from`) takes the source run's (its embedding rows are indexed by that tokenizer's ids),
and only a new run from scratch builds one from its training data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import jax
import numpy as np

import checkpoint
import sharding
from data import mixture, mlm as mlm_data, pipeline, prepared, sources
from data import tokenizer as tokenizer_lib

log = logging.getLogger("lmstack")


def _describe(tok: tokenizer_lib.Tokenizer) -> str:
    return f"{tok.kind!r} ({tok.vocab_size} ids)"


def _source_tokenizer(config, data_tok: tokenizer_lib.Tokenizer | None) -> tokenizer_lib.Tokenizer:
    """A warm start's tokenizer: the init_from run's. Its embedding rows are indexed by those ids, so a
    config (data.tokenizer) or prepared dataset asking for another tokenizer is refused, naming both."""
    path = os.path.join(config.init_from, "tokenizer.json")
    if not os.path.exists(path):
        raise checkpoint.IncompatibleCheckpointError(
            f"init_from={config.init_from!r} has no tokenizer.json: cannot tell which token ids its embedding "
            f"rows belong to")
    tok = tokenizer_lib.load_tokenizer(path)
    if data_tok is not None and data_tok.to_json() != tok.to_json():
        raise checkpoint.IncompatibleCheckpointError(
            f"data.path={config.data.path!r} is a prepared dataset tokenized with a {_describe(data_tok)} "
            f"tokenizer, but init_from={config.init_from!r} was trained with a different {_describe(tok)} "
            f"tokenizer: its embeddings would be read for the wrong tokens. Prepare the data with the source "
            f"run's tokenizer, or train from scratch (init_from='').")
    if data_tok is None and config.data.tokenizer != tok.kind:
        raise checkpoint.IncompatibleCheckpointError(
            f"data.tokenizer={config.data.tokenizer!r} but init_from={config.init_from!r} was trained with a "
            f"{_describe(tok)} tokenizer: a warm start keeps the source run's tokenizer (its embedding rows are "
            f"indexed by its ids). Set --config.data.tokenizer={tok.kind}, or train from scratch (init_from='').")
    log.info("tokenizer: init_from's %s, as its embedding rows require (not rebuilt from this run's data)",
             _describe(tok))
    return tok


def run_tokenizer(config, workdir: str, texts: list[str] | None = None,
                  data_tok: tokenizer_lib.Tokenizer | None = None) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer, saved as WORKDIR/tokenizer.json. A resumed run: the saved one (refused if the
    config or prepared dataset now names another). A warm start: init_from's (_source_tokenizer). A new
    run: the prepared dataset's (`data_tok`), or one built from the training `texts` by data.tokenizer."""
    tok_path = os.path.join(workdir, "tokenizer.json")
    saved = os.path.exists(tok_path)
    if saved and not checkpoint.has_checkpoint(workdir):
        # left by a start that failed or stopped before its first checkpoint: not this run's; rebuilt below
        log.warning("workdir %r has a tokenizer.json but no checkpoint (a start that stopped before saving "
                    "one): replaced by this run's tokenizer", workdir)
        saved = False
    if saved:
        if data_tok is not None:  # refused unless it is the prepared dataset's tokenizer the run trained with
            prepared.use_tokenizer_in_workdir(data_tok, workdir, write=False)
            return data_tok
        tok = tokenizer_lib.load_tokenizer(tok_path)
        if tok.kind != config.data.tokenizer:
            raise checkpoint.IncompatibleCheckpointError(
                f"workdir {workdir!r} has a {tok.kind!r} tokenizer but data.tokenizer={config.data.tokenizer!r}")
        return tok
    if config.init_from:
        tok = _source_tokenizer(config, data_tok)
    elif data_tok is not None:
        tok = data_tok
    else:
        tok = tokenizer_lib.build_tokenizer(config.data.tokenizer, texts)
    if jax.process_index() == 0:  # written whole, then renamed: another host may be reading the workdir
        tmp = f"{tok_path}.tmp-{os.getpid()}"
        tokenizer_lib.save_tokenizer(tok, tmp)
        os.replace(tmp, tok_path)
    return tok


def warn_unknown(tok: tokenizer_lib.Tokenizer, splits: dict, what: str = "") -> None:
    """Log, per split ({name: [token id arrays]}), how many tokens are <unk>. Only a char vocabulary makes any
    (built from a training split, or a warm start's source run's): text it lacks is otherwise trained on and
    scored as <unk> silently."""
    unk = tok.special_id("<unk>")
    for name, ids in splits.items():
        unknown, total = sum(int(np.count_nonzero(x == unk)) for x in ids), sum(len(x) for x in ids)
        if unknown:
            log.warning("%s%d of %d %s tokens (%.2f%%) are <unk>: characters the %s tokenizer does not have",
                        f"{what}: " if what else "", unknown, total, name, 100 * unknown / max(total, 1), tok.kind)


def prepare_data(config, workdir: str):
    """Documents -> split -> the run's tokenizer (run_tokenizer) -> token streams."""
    if prepared.is_prepared(config.data.path):  # a scripts/prepare_data.py directory: its tokenizer + shards
        data_tok, train, val = prepared.load_prepared(config.data.path)
        tok = run_tokenizer(config, workdir, data_tok=data_tok)
        log.info("prepared data: %d train, %d val tokens (%s tokenizer, %d ids)", len(train), len(val), tok.kind,
                 tok.vocab_size)
        return tok, train, val
    docs, stats = sources.read_documents(config.data.path, config.data.text_field)
    log.info("data: %s", stats.summary())
    train_texts, val_texts = pipeline.split_documents([d.text for d in docs], config.data.split,
                                                      config.data.val_fraction)
    tok = run_tokenizer(config, workdir, train_texts)
    train = pipeline.tokenize_stream(train_texts, tok)
    val = pipeline.tokenize_stream(val_texts, tok)
    log.info("tokens: %d train, %d val (%s tokenizer, %d ids)", len(train), len(val), tok.kind, tok.vocab_size)
    warn_unknown(tok, {"training": [train.tokens], "validation": [val.tokens]})
    return tok, train, val


@dataclasses.dataclass
class Inputs:
    tokenizer: tokenizer_lib.Tokenizer
    train_iter: object  # grain iterator of this process's batches (checkpointed); None when built eval_only
    eval_batches: list
    num_classes: int = 0  # mode='classify'
    # Metrics that need decoding, not just summed losses (QA exact match/F1, SFT generation accuracy):
    # (model, params) -> {"eval/...": float}; train.py calls it under the mesh at every eval.
    extra_eval: Callable | None = None
    prompts: list | None = None  # modes 'grpo' / 'ppo': the training prompts (data/sft.Problem) the iterator indexes
    old_rows: object = None  # continual.replay_path's rows (replay, EWC's Fisher), built like the mode's own rows
    ptx_rows: dict | None = None  # modes 'grpo' / 'ppo' with rl.ptx_coef: the SFT rows [M, seq_len] of the ptx term


def old_rows(config, make_rows: Callable):
    """continual.replay_path's training rows (`make_rows(path)`, the mode's own row builder) when replay or EWC
    reads them, else None; and the Replay that mixes them into the train iterator (None at ratio 0)."""
    n = config.continual
    if not n.replay_path or not (float(n.replay_ratio) > 0 or float(n.ewc) > 0):
        return None, None
    rows = make_rows(os.path.expanduser(n.replay_path))
    log.info("continual: %d old-domain rows from %s; replay ratio %s", len(rows), n.replay_path, n.replay_ratio)
    replay = mixture.Replay(rows, float(n.replay_ratio), config.seed) if float(n.replay_ratio) > 0 else None
    return rows, replay


def _old_stream(config, tok):
    return lambda path: mixture.old_text_stream(path, tok, text_field=config.data.text_field, split=config.data.split,
                                                val_fraction=config.data.val_fraction)


def host_block(config, micro_batch: int) -> dict:
    """{process_index, process_count} for a train iterator: the block of every global micro-batch this process
    feeds (sharding.host_rows over the run's mesh). One process: the whole batch."""
    if jax.process_count() == 1:
        return dict(process_index=0, process_count=1)
    block, blocks = sharding.host_rows(sharding.make_mesh(config.mesh), micro_batch)
    return dict(process_index=block, process_count=blocks)


def causal_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> Inputs:
    tok, train_stream, val_stream = prepare_data(config, workdir)
    if eval_only:  # the held-out share is cut from the same text: read, but no iterator or replay rows
        return Inputs(tok, None, causal_eval_batches(config, tok, val_stream, micro_batch))
    old, replay = old_rows(config, lambda p: pipeline.WindowSource(_old_stream(config, tok)(p), config.data.seq_len))
    data_iter = pipeline.train_iterator(train_stream, seq_len=config.data.seq_len, global_batch=micro_batch,
                                        seed=config.seed, replay=replay, **host_block(config, micro_batch))
    return Inputs(tok, data_iter, causal_eval_batches(config, tok, val_stream, micro_batch), old_rows=old)


def causal_eval_batches(config, tok, stream: pipeline.TokenStream, micro_batch: int) -> list[dict]:
    """Eval batches of a token stream: the validation split, or any text scripts/evaluate.py is given."""
    del tok
    return pipeline.eval_batches(stream, seq_len=config.data.seq_len, batch_size=micro_batch,
                                 max_batches=config.train.eval_batches)


def _documents(stream: pipeline.TokenStream, eos_id: int) -> list[np.ndarray]:
    """A packed token stream back into its documents (each without its trailing <eos>)."""
    cuts = np.flatnonzero(np.diff(stream.segments)) + 1
    return [d[:-1] if len(d) and d[-1] == eos_id else d for d in np.split(stream.tokens, cuts)]


def mlm_source(config, tok, stream: pipeline.TokenStream, seed: int) -> mlm_data.MlmSource:
    m = config.mlm
    return mlm_data.MlmSource(_documents(stream, tok.eos_id), config.data.seq_len, seed=seed,
                              base_size=tok.base_size, cls_id=tok.special_id("<cls>"),
                              sep_id=tok.special_id("<sep>"), mask_id=tok.special_id("<mask>"),
                              pad_id=tok.pad_id, nsp=m.nsp, mask_prob=m.mask_prob,
                              mask_token_frac=m.mask_token_frac, random_token_frac=m.random_token_frac)


def mlm_eval_batches(config, tok, stream: pipeline.TokenStream, micro_batch: int) -> list[dict]:
    """Eval batches of a token stream: the validation split, or any text scripts/evaluate.py is given."""
    try:
        source = mlm_source(config, tok, stream, config.seed + 1)
    except sources.DataError as e:  # e.g. NSP's two documents: say it is the validation text that has too few
        raise sources.DataError(f"the validation text: {e} (with data.split='hash' a larger data.val_fraction holds "
                                f"out more documents; data.split='tail' holds out part of every one; or "
                                f"mlm.nsp=False)") from None
    return mlm_data.eval_batches(source, batch_size=micro_batch, max_batches=config.train.eval_batches)


def mlm_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> Inputs:
    tok, train_stream, val_stream = prepare_data(config, workdir)
    eval_data = mlm_eval_batches(config, tok, val_stream, micro_batch)
    if eval_only:
        return Inputs(tok, None, eval_data)
    train_src = mlm_source(config, tok, train_stream, config.seed)
    log.info("mlm: %d train examples, %d val batches (nsp=%s)", len(train_src), len(eval_data), config.mlm.nsp)
    old, replay = old_rows(config, lambda p: mlm_source(config, tok, _old_stream(config, tok)(p), config.seed))
    data_iter = mlm_data.train_iterator(train_src, global_batch=micro_batch, seed=config.seed, replay=replay,
                                        **host_block(config, micro_batch))
    return Inputs(tok, data_iter, eval_data, old_rows=old)


# ---- Other data in place of a mode's validation split (scripts/evaluate.py --data) ------------------

def _text_stream(path: str, split: str, config, tok) -> pipeline.TokenStream:
    """All of a text file/dir (data.val_fraction does not apply: the given data is all held out), or a prepared
    dataset directory's `split`, tokenized with the run's tokenizer."""
    if prepared.is_prepared(path):
        data_tok = prepared.load_tokenizer_checked(path)
        if data_tok.to_json() != tok.to_json():
            raise sources.DataError(f"prepared dataset {path!r} has a different tokenizer ({data_tok.kind!r}, "
                                    f"{data_tok.vocab_size} ids) than the run ({tok.kind!r}, {tok.vocab_size} ids)")
        stream = prepared.split_stream(path, split, tok.eos_id)
        if not len(stream):
            raise sources.DataError(f"prepared dataset {path!r} has no {split!r} documents")
        return stream
    docs, _ = sources.read_documents(path, config.data.text_field)
    return pipeline.tokenize_stream([d.text for d in docs], tok)


def whole_text(eval_batches):
    """Text modes: every document of the given data (or a prepared dataset's split) is the eval set."""
    def inputs(config, workdir: str, micro_batch: int, path: str, split: str) -> Inputs:
        tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
        stream = _text_stream(path, split, config, tok)
        return Inputs(tok, None, eval_batches(config, tok, stream, micro_batch))
    return inputs


def as_val_path(section: str, build):
    """Task modes: the file stands in for `<section>.val_path` and the mode's own builder does the rest
    (on a copy of the config: the caller's is not changed)."""
    def inputs(config, workdir: str, micro_batch: int, path: str, split: str) -> Inputs:
        del split
        config = config.copy_and_resolve_references()
        config[section].val_path = path
        return build(config, workdir, micro_batch, eval_only=True)  # the training file is not read
    return inputs
