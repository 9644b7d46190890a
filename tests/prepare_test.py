"""Data preparation end to end: outputs, byte-identical re-runs, the ArrayRecord shards, bad input
counted by name, task records, and training on a prepared dataset."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import set_overrides, tiny_config

import train
from configs.data import common
from data import clean, prepare, prepared, sources, tokenizer
from data.sources import DataError


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(path, **overrides):
    """A small-corpus variant of the data config; `a__b=v` sets a.b = v."""
    c = common.base()
    c.sources.corpus = common.source(path=str(path))
    c.clean.min_chars = 20
    c.clean.min_words = 3
    c.clean.max_dup_ngram_fraction = (0.6,) * 6
    c.clean.max_top_ngram_fraction = (0.3, 0.25, 0.2)
    c.clean.max_dup_line_fraction = c.clean.max_dup_line_char_fraction = 0.5
    c.split.ratios = (0.7, 0.2, 0.1)
    c.tokenizer.vocab_size = 512
    return set_overrides(c, overrides)


def quiet(_):
    pass


# ---------------------------------------------------------------- end to end

def _files(d):
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(corpus_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    manifest = prepare.prepare(data_config(corpus_dir), out, log=quiet)
    return out, manifest


def test_prepare_outputs_and_reruns_byte_identical(dataset, corpus_dir, tmp_path):
    out, m = dataset
    files = _files(out)
    assert {"manifest.json", "report.md", "tokenizer.json"} <= set(files)
    assert m["documents"]["collected"] == m["documents"]["kept"] + m["documents"]["removed"]
    assert all(m["splits"][s]["documents"] > 0 for s in prepared.SPLITS)
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 512
    assert json.loads(files["manifest.json"])["config"]["tokenizer"]["vocab_size"] == 512
    assert "## Splits" in files["report.md"].decode()
    again = str(tmp_path / "again")
    prepare.prepare(data_config(corpus_dir), again, log=quiet)
    assert _files(again) == files


def test_shards_random_access_and_round_trip(dataset, corpus_dir):
    out, m = dataset
    tok = prepared.load_tokenizer_checked(out)
    kept = {}
    for d in sources.read_documents(corpus_dir)[0]:
        text, _, _ = clean.clean_document(d.text, data_config(corpus_dir).clean)
        if text:
            kept[text] = d.source
    for split in prepared.SPLITS:
        src = prepared.DocumentSource(out, split)
        assert len(src) == m["splits"][split]["documents"]
        docs = src.read_all()
        assert sum(map(len, docs)) == m["splits"][split]["tokens"]
        for i in (0, len(src) - 1):
            np.testing.assert_array_equal(src[i], docs[i])
        for ids in docs:
            assert tok.decode(ids) in kept  # every document decodes back to a cleaned input exactly
    import grain
    ds = grain.MapDataset.source(prepared.DocumentSource(out, "train")).shuffle(seed=0)
    assert len(ds) == m["splits"]["train"]["documents"] and ds[0].dtype == np.int32


def test_train_on_prepared_dataset(dataset, tmp_path):
    out, m = dataset
    tok, train_stream, val_stream = prepared.load_prepared(out)
    assert len(train_stream) == m["splits"]["train"]["tokens"] + m["splits"]["train"]["documents"]  # + <eos>
    assert (train_stream.tokens == tok.eos_id).sum() == m["splits"]["train"]["documents"]
    assert train_stream.segments[-1] == m["splits"]["train"]["documents"]
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(tiny_config(out, train__steps=4, train__eval_every=4,
                                                  train__eval_batches=1000), workdir)  # the whole val split
    assert result["step"] == 4 and np.isfinite(result["eval/loss"])
    assert result["eval/loss"] < np.log(512) + 0.5
    with open(os.path.join(workdir, "tokenizer.json"), "rb") as f, open(os.path.join(out, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()
    # bits per byte, comparable across tokenizers (scripts/bits_per_byte.py)
    out_text = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bits_per_byte.py"),
                               f"--workdir={workdir}"], capture_output=True, text=True, check=True).stdout
    bpb = float(out_text.rsplit(": ", 1)[1].split()[0])
    assert "bpe (512 ids)" in out_text and "100% of the val split" in out_text
    assert bpb == pytest.approx(result["eval/loss"] * m["splits"]["val"]["tokens"] / m["splits"]["val"]["bytes"]
                                / np.log(2), rel=0.1)
    # a workdir whose tokenizer differs from the dataset's is refused; the same one is accepted
    prepared.use_tokenizer_in_workdir(tok, workdir, write=True)
    with pytest.raises(DataError, match="different tokenizer"):
        prepared.use_tokenizer_in_workdir(tokenizer.ByteTokenizer(), workdir, write=True)


def test_bad_input_end_to_end(tmp_path, corpus_dir):
    """Every kind of bad input is counted under its name in the manifest; nothing crashes."""
    src = tmp_path / "in"
    src.mkdir()
    for name in sorted(os.listdir(corpus_dir))[:12]:
        shutil.copy(os.path.join(corpus_dir, name), src / name)
    (src / "binary.txt").write_bytes(bytes(range(256)))
    (src / "bad_utf8.txt").write_bytes(b"ok \xc3\x28 bad")
    (src / "empty.md").write_text("")
    (src / "one_line.txt").write_text("w" * 20_000_000)  # 20 MB stands in for 100 MB: same code path, faster
    good = gzip.compress(b"some gzip text " * 2000)
    (src / "cut.txt.gz").write_bytes(good[:100])
    (src / "data.jsonl").write_text('{"text": "a valid record with enough words in it to pass"}\n[1]\n{"te\n')
    out = str(tmp_path / "out")
    m = prepare.prepare(data_config(src, split__ratios=(0.5, 0.5, 0.0), tokenizer__kind="byte"), out, log=quiet)
    skipped = m["sources"]["corpus"]["skipped"]
    assert skipped == {"binary": 1, "not utf-8": 1, "empty": 1, "truncated gzip": 1, "malformed json": 1,
                       "no 'text' string": 1}
    assert m["cleaning"]["removed"]["too long"] == 1
    assert m["documents"]["collected"] == 12 + 2 and m["documents"]["kept"] + m["documents"]["removed"] == 14
    with pytest.raises(DataError, match=r"data\.jsonl:3: malformed JSON"):
        prepare.prepare(data_config(src), str(tmp_path / "strict"), strict=True, log=quiet)


def test_bad_settings_and_outputs_are_refused_by_name(tmp_path, corpus_dir):
    """Thresholds that would silently switch a filter off, an output directory that is not new or empty
    (a rerun into it would mix datasets; one inside a source would be collected next time), and
    cleaning that removes everything: errors naming the value, nothing written."""
    for key, value, match in (("clean__max_top_ngram_fraction", (0.5,), "max_top_ngram_fraction=\\(0.5,\\)"),
                              ("clean__max_dup_ngram_fraction", (), "max_dup_ngram_fraction=\\(\\)"),
                              ("clean__min_chars", -1, "min_chars=-1"), ("dedup__threshold", 1.5, "threshold=1.5"),
                              ("dedup__ngram", 0, "ngram=0"), ("output__shard_mb", 0.0, "shard_mb=0.0")):
        out = tmp_path / f"out_{key}"
        with pytest.raises(DataError, match=match):
            prepare.prepare(data_config(corpus_dir, **{key: value}), str(out), log=quiet)
        assert not out.exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty"):
        prepare.prepare(data_config(corpus_dir), str(used), log=quiet)
    assert os.listdir(used) == ["notes.txt"]
    src = tmp_path / "zh"
    src.mkdir()
    for i in range(4):  # no spaces: 6 whitespace-separated "words" (lines) a document
        (src / f"{i}.txt").write_text("".join(f"机器学习是人工智能的一个分支{i}{k}" * 4 + "\n" for k in range(6)))
    with pytest.raises(DataError, match=r"cleaning removed all 4 documents .*too few words.*min_words"):
        prepare.prepare(data_config(src, clean__min_words=50), str(tmp_path / "zh_out"), log=quiet)  # the default
    with pytest.raises(DataError, match=r"data\.jsonl:3: malformed JSON"):  # --strict, mid-collection
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "data.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"te\n')
        prepare.prepare(data_config(bad), str(tmp_path / "strict_out"), strict=True, log=quiet)
    # a failure after collection leaves nothing: no --out, no scratch directory beside it
    assert not (tmp_path / "zh_out").exists() and not (tmp_path / "strict_out").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_sources_and_splits_are_checked_by_name(tmp_path):
    """configs/data/files.py takes the path as its argument; a missing or empty path names the source's
    field, and a corpus whose documents all land in train (one big file) is refused before --out exists
    (train.py needs a val split), with the way out."""
    from configs.data import files
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"sources\.files\.path is empty.*configs/data/files\.py:PATH"):
        prepare.prepare(files.get_config(), str(out), log=quiet)
    with pytest.raises(DataError, match=r"sources\.files\.path='nothere\.jsonl' does not exist in /"):
        prepare.prepare(files.get_config("nothere.jsonl"), str(out), log=quiet)
    with pytest.raises(DataError, match=r"--out='.*/inside' is inside sources\.files\.path="):
        prepare.prepare(files.get_config(str(tmp_path)), str(tmp_path / "inside"), log=quiet)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(3000)]
    one = tmp_path / "one.txt"  # prose-like lines of varied words, one document
    one.write_text("".join(" ".join(words[i:i + 12]) + "\n" for i in range(0, len(words), 12)))
    with pytest.raises(DataError, match=r"none of the 1 kept documents in val.*data\.split=tail"):
        prepare.prepare(files.get_config(str(one)), str(out), log=quiet)
    assert not out.exists() and os.listdir(tmp_path) == ["one.txt"]
    # the same file as JSONL records of prose paragraphs: prepared with files.py's defaults
    with open(tmp_path / "paras.jsonl", "w") as f:
        for i in range(60):  # one-line paragraphs of ~1,500 characters (a mean line length over 1,000)
            f.write(json.dumps({"text": " ".join(words[i * 50:i * 50 + 250])}) + "\n")
    m = prepare.prepare(files.get_config(str(tmp_path / "paras.jsonl")), str(out), log=quiet)
    assert m["documents"]["collected"] == 60 and m["cleaning"]["removed"].get("long lines", 0) == 0
    assert m["splits"]["val"]["documents"] > 0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir makes it, not mkdtemp's 0700


def test_characters_a_char_vocabulary_lacks_are_counted(tmp_path):
    """The char tokenizer's vocabulary comes from the train split: a val document's other characters
    become <unk>, counted per split in the manifest (and logged), not silently."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.txt").write_text(" ".join(f"word{i}x{j}" for j in range(60)) + "\n")
    (src / "greek.txt").write_text(" ".join(f"αβγ{j}δε" for j in range(60)) + "\n")
    lines = []
    m = prepare.prepare(data_config(src, tokenizer__kind="char", split__ratios=(0.5, 0.5, 0.0), split__salt="a"),
                        str(tmp_path / "out"), log=lines.append)  # this salt puts the Greek document in val
    assert m["splits"]["train"]["unknown_tokens"] == 0
    assert m["splits"]["val"]["unknown_tokens"] == 5 * 60  # its Greek letters; digits and spaces are known
    assert any("<unk>" in line and "val" in line for line in lines)


def test_task_dataset_records_are_aligned(tmp_path):
    lines = [json.dumps({"text": f"review number {i} says " + " ".join(f"w{i}x{j}" for j in range(30)),
                         "label": i % 3}) for i in range(40)]
    lines += [json.dumps({"text": "no label"}), "not json"]
    (tmp_path / "cls.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    m = prepare.prepare(data_config(tmp_path / "cls.jsonl", format="classification", tokenizer__kind="char"),
                        out, log=quiet)
    assert m["sources"]["corpus"]["skipped"] == {"classification: missing field": 1, "malformed json": 1}
    tok = prepared.load_tokenizer_checked(out)
    for split in prepared.SPLITS:
        ids = prepared.DocumentSource(out, split)
        recs = prepared.DocumentSource(out, split, records=True)
        assert len(ids) == len(recs) == m["splits"][split]["documents"]
        for i in range(len(ids)):
            assert tok.decode(ids[i]) == recs[i]["text"] and recs[i]["label"] in (0, 1, 2)
    with pytest.raises(DataError, match="no task records"):
        prepared.DocumentSource(prepared_text_dir(tmp_path), "train", records=True)


def prepared_text_dir(tmp_path):
    d = tmp_path / "text_src"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.txt").write_text(" ".join(f"token{i}_{j}" for j in range(40)) + "\n")
    out = str(tmp_path / "text_out")
    prepare.prepare(data_config(d, tokenizer__kind="byte", split__ratios=(0.5, 0.5, 0.0)), out, log=quiet)
    return out
