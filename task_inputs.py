"""The task modes' inputs: classification ('classify'), extractive QA ('qa') and chat SFT ('sft'):
records of data.path (and a validation file, `<mode>.val_path`, or a content-hash share of data.path)
-> the run's tokenizer (inputs.run_tokenizer) -> a checkpointable train iterator and eval batches
(inputs.Inputs), with the decoded metrics (exact match, F1) as `extra_eval`. Built `eval_only`
(scripts/evaluate.py), a builder makes no train iterator and reads no training file when the validation
data is a file of its own. The shared pieces are in inputs.py; the post-training modes' builders in
feedback_inputs.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os

import jax

import checkpoint
import task_eval
from data import chat, classify as classify_data, formats, pipeline
from data import qa as qa_data
from data import sft as sft_data, sources
from data import tokenizer as tokenizer_lib
from inputs import Inputs, host_block, old_rows, run_tokenizer, warn_unknown

log = logging.getLogger("lmstack")


def warn_skipped(what: str, stats: sources.ReadStats) -> None:
    """Validation records left out of the scores, as a warning (scripts/evaluate.py shows warnings only)."""
    if stats.skipped:
        log.warning("%s: %d validation records not scored: %s", what, sum(stats.skipped.values()), stats.skipped)


def cut_note(stats: sources.ReadStats, seq_len: int) -> str:
    """What an error about too few records adds when the cut at data.seq_len emptied some: the setting to raise."""
    cut = any("truncation" in reason for reason in stats.skipped)
    return f"; data.seq_len={seq_len} cut them: raise --config.data.seq_len" if cut else ""


def too_few(what: str, stats: sources.ReadStats, seq_len: int) -> str:
    """`what` for pipeline.shuffled_batches' too-few-examples error: the training records left out, and why."""
    return f"{what} (left out: {stats.left_out()}{cut_note(stats, seq_len)})" if stats.skipped else what


def count_unknown(tok: tokenizer_lib.Tokenizer, what: str, train_texts: list[str], val_texts: list[str]) -> None:
    """warn_unknown on a task mode's texts (encoded here only for a char tokenizer: no other makes <unk>)."""
    if tok.kind == "char":
        warn_unknown(tok, {name: [tok.encode(t) for t in texts]
                           for name, texts in (("training", train_texts), ("validation", val_texts))}, what)


def train_val_records(config, section, fmt: str, eval_only: bool = False):
    """(train records, stats, validation records, stats) of a task mode: `section.val_path` is the
    validation file; without one, a content-hash share data.val_fraction of data.path is held out.
    eval_only: no train records (with a val_path, data.path is not read at all)."""
    if fmt == "classification":
        read = functools.partial(classify_data.read_configured, section=section)
    else:
        read = functools.partial(formats.read_split, fmt=fmt, strict=section.strict)
    if eval_only and section.val_path:
        val, val_stats = read(section.val_path)
        return [], sources.ReadStats(), val, val_stats
    train, stats = read(config.data.path)
    if section.val_path:
        val, val_stats = read(section.val_path)
        return train, stats, val, val_stats
    train, val = hash_held_out(train, lambda x: formats.record_text(x[1], fmt), config)
    return [] if eval_only else train, stats, val, sources.ReadStats()


def hash_held_out(items: list, key, config) -> tuple[list, list]:
    """(train, val): items whose hash_unit(key(item)) < data.val_fraction are validation; both non-empty."""
    held = [pipeline.hash_unit(key(x)) < config.data.val_fraction for x in items]
    val = [x for x, h in zip(items, held) if h]
    train = [x for x, h in zip(items, held) if not h]
    if not val or not train:
        raise sources.DataError(f"data.val_fraction={config.data.val_fraction} of {config.data.path!r} gave "
                                f"{len(train)} train and {len(val)} validation records")
    return train, val


def classify_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> Inputs:
    c = config.classify
    train_recs, stats, val_recs, val_stats = train_val_records(config, c, "classification", eval_only)
    labels_path = os.path.join(workdir, "labels.json")
    labels = None if eval_only else classify_data.build_labels(train_recs)
    if stats.skipped.get(classify_data.UNLABELLED):
        log.warning("classify: %d training records labelled -1 left out as unlabelled (Hugging Face's 'no label'); "
                    "--config.classify.minus_one_unlabelled=False trains -1 as a class",
                    stats.skipped[classify_data.UNLABELLED])
    if labels is not None and len(labels) < 2:
        raise sources.DataError(f"{config.data.path!r}: a classifier needs >= 2 labels, found {labels}")
    # a resumed (or evaluated) run's head rows are its saved labels' ids; a labels.json left by a start that failed
    # before any checkpoint is not a run's and is replaced
    if eval_only or checkpoint.has_checkpoint(workdir):
        if not os.path.exists(labels_path):
            raise checkpoint.IncompatibleCheckpointError(
                f"{labels_path} is missing: the checkpoint's classifier rows belong to the labels it listed, which "
                f"cannot be rebuilt safely from data.path (it may have changed)")
        saved = classify_data.load_labels(labels_path)
        if labels is None:  # evaluating: the run's labels are the ones its head was trained on
            labels = saved
        elif saved != labels:
            hint = ("; label -1 is now left out as unlabelled: --config.classify.minus_one_unlabelled=False reads it "
                    "as the run did" if {-1, "-1"} & set(saved) and stats.skipped.get(classify_data.UNLABELLED)
                    else "")
            raise checkpoint.IncompatibleCheckpointError(
                f"{labels_path} holds labels {saved} but the training split has {labels}{hint}")
    elif jax.process_index() == 0:
        classify_data.save_labels(labels, labels_path)
    train_texts = [formats.record_text(r, "classification") for _, r in train_recs]
    tok = run_tokenizer(config, workdir, train_texts)
    count_unknown(tok, "classify", train_texts, [formats.record_text(r, "classification") for _, r in val_recs])
    pool = "last" if config.model.causal else "first"
    make = functools.partial(classify_data.make_source, tok=tok, labels=labels, seq_len=config.data.seq_len,
                             pool=pool, strict=c.strict)
    train_src = None if eval_only else make(train_recs, stats=stats)
    try:
        val_src = make(val_recs, stats=val_stats)
    except sources.DataError as e:
        if c.val_path:
            raise
        raise sources.DataError(f"{e}: the record was held out of data.path for validation (data.val_fraction="
                                f"{config.data.val_fraction}) and no training record has its label; give "
                                f"classify.val_path, or classify.strict=False to skip such records") from None
    eval_data = classify_data.eval_batches(val_src, batch_size=micro_batch, max_batches=config.train.eval_batches)
    warn_skipped("classify", val_stats)
    if eval_only:
        log.info("classify: %d labels; validation %d examples (skipped: %s); %s", len(labels), len(val_src),
                 val_stats.left_out(), val_src.truncation.summary())
        return Inputs(tok, None, eval_data, num_classes=len(labels))
    log.info("classify: %d labels; train %d examples (skipped: %s); validation %d (skipped: %s)", len(labels),
             len(train_src), stats.left_out(), len(val_src), val_stats.left_out())
    log.info("classify: train: %s; validation: %s", train_src.truncation.summary(), val_src.truncation.summary())
    data_iter = pipeline.shuffled_batches(train_src, global_batch=micro_batch, seed=config.seed,
                                          what="classification examples", **host_block(config, micro_batch))
    return Inputs(tok, data_iter, eval_data, num_classes=len(labels))


def qa_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> Inputs:
    c = config.qa
    if not math.isfinite(float(c.null_threshold)):  # NaN: every comparison False, no question ever unanswered
        raise ValueError(f"qa.null_threshold={c.null_threshold!r} must be a finite number")
    if eval_only and c.val_path:  # the training file is not read
        train_exs, stats = [], sources.ReadStats()
    else:
        train_exs, stats = qa_data.read_split(config.data.path, strict=c.strict, unanswerable=c.unanswerable)
    if c.val_path:
        val_exs, val_stats = qa_data.read_split(c.val_path, strict=c.strict, unanswerable=c.unanswerable)
    else:  # by context, so questions about one passage stay on one side
        train_exs, val_exs = hash_held_out(train_exs, lambda ex: ex.context, config)
        train_exs = [] if eval_only else train_exs
        val_stats = sources.ReadStats()
    train_texts = [ex.context + "\n" + ex.question for ex in train_exs]
    tok = run_tokenizer(config, workdir, train_texts)
    count_unknown(tok, "qa", train_texts, [ex.context + "\n" + ex.question for ex in val_exs])
    make = functools.partial(qa_data.make_features, tok=tok, seq_len=config.data.seq_len,
                             max_query_len=c.max_query_len, doc_stride=c.doc_stride)
    train_src, val_src = None if eval_only else make(train_exs), make(val_exs)
    if eval_only:
        log.info("qa: validation %d examples -> %d windows (skipped: %s); %s", len(val_exs), len(val_src),
                 val_stats.left_out(), val_src.truncation.summary())
    else:
        log.info("qa: train %d examples -> %d windows (skipped: %s); validation %d -> %d windows (skipped: %s)",
                 len(train_exs), len(train_src), stats.left_out(), len(val_exs), len(val_src),
                 val_stats.left_out())
        log.info("qa: train: %s; validation: %s", train_src.truncation.summary(), val_src.truncation.summary())
    warn_skipped("qa", val_stats)
    for name, src in (("train", train_src), ("validation", val_src)):
        if src is None:
            continue
        unplaced, longer = src.unreachable(int(c.max_answer_len))
        if unplaced or longer:
            log.warning("qa: %s: %d of %d answers in no window (labelled 'no answer' in every window: longer than "
                        "a window's context room or cut off), %d longer than qa.max_answer_len=%d tokens (never an "
                        "exact match)", name, unplaced, sum(bool(ex.answers) for ex in src.examples), longer,
                        int(c.max_answer_len))
        if c.unanswerable:
            log.info("qa: %s: %d of %d questions unanswerable", name, sum(not ex.answers for ex in src.examples),
                     len(src.examples))
    data_iter = None if eval_only else pipeline.shuffled_batches(
        train_src, global_batch=micro_batch, seed=config.seed, what="QA windows", **host_block(config, micro_batch))
    eval_data = classify_data.eval_batches(val_src, batch_size=micro_batch, max_batches=config.train.eval_batches)
    spans = task_eval.span_qa_eval(val_src, micro_batch, c.max_answer_len,
                                   float(c.null_threshold) if c.unanswerable else None)
    return Inputs(tok, data_iter, eval_data, extra_eval=spans)


def chat_template(workdir: str) -> None:
    """WORKDIR/chat_template.json: written by a new run; a resumed run must render the same template."""
    path = os.path.join(workdir, "chat_template.json")
    if os.path.exists(path):
        with open(path) as f:
            chat.check_template_spec(json.load(f))
    elif jax.process_index() == 0:  # written whole, then renamed: another host may be reading the workdir
        with open(path + ".tmp", "w") as f:
            json.dump(chat.template_spec(), f, indent=1)
        os.replace(path + ".tmp", path)


def sft_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> Inputs:
    f = config.sft
    train_recs, stats, val_recs, val_stats = train_val_records(config, f, "chat", eval_only)
    train_texts = [formats.record_text(r, "chat") for _, r in train_recs]
    tok = run_tokenizer(config, workdir, train_texts)
    count_unknown(tok, "sft", train_texts, [formats.record_text(r, "chat") for _, r in val_recs])
    chat_template(workdir)
    seq_len = config.data.seq_len
    render = functools.partial(sft_data.render_split, tok=tok, seq_len=seq_len, too_long=f.too_long,
                               train_on=f.train_on, strict=f.strict)
    train_conv, val_conv = render(train_recs, stats=stats), render(val_recs, stats=val_stats)
    rows = functools.partial(sft_data.make_rows, seq_len=seq_len, pad_id=tok.pad_id, pack=f.pack, fit=f.fit)
    train_rows, val_rows = rows(train_conv), rows(val_conv)
    log.info("sft: %svalidation %d conversations in %d rows (not used whole: %s)",
             "" if eval_only else f"train {len(train_conv)} conversations in {len(train_rows)} rows (not used whole: "
                                  f"{stats.left_out()}); ", len(val_conv), len(val_rows), val_stats.left_out())
    if not val_rows:
        raise sources.DataError(f"sft: no validation conversation left to evaluate ({val_stats.summary()}"
                                f"{cut_note(val_stats, seq_len)})")
    warn_skipped("sft", val_stats)
    old, data_iter = None, None
    if not eval_only:
        old, replay = old_rows(config, lambda p: rows(render(formats.read_split(p, "chat", strict=f.strict)[0],
                                                              stats=sources.ReadStats())))
        data_iter = pipeline.shuffled_batches(train_rows, global_batch=micro_batch, seed=config.seed,
                                              what=too_few("packed SFT rows" if f.pack else "SFT conversations",
                                                           stats, seq_len),
                                              replay=replay, **host_block(config, micro_batch))
    eval_data = pipeline.padded_batches(val_rows, batch_size=micro_batch, max_batches=config.train.eval_batches)
    extra = None
    if f.eval_generate > 0:
        problems = sft_data.generation_problems(val_recs, tok, int(f.eval_generate))
        extra = task_eval.exact_match_eval(problems, tok, width=seq_len, max_new_tokens=int(f.max_new_tokens),
                                           batch_size=micro_batch, check=config.data.answer_check,
                                           limit_name="sft.max_new_tokens")
    return Inputs(tok, data_iter, eval_data, extra_eval=extra, old_rows=old)
