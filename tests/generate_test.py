"""scripts/generate.py: a trained run's text streams out of the KV-cache decoder, from an argument or stdin."""

import io
import os
import sys

from absl import flags
import pytest
from conftest import tiny_config

import train
from data import tokenizer as tokenizer_lib
from model import decode, sampling

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import generate  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "abc.txt"
    corpus.write_text("abcdefgh" * 400)
    config = tiny_config(str(corpus), data__tokenizer="char", data__split="tail", train__steps=60,
                         optim__lr=1e-2, train__eval_every=60, train__checkpoint_every=60)
    train.train_and_evaluate(config, str(tmp / "run"))
    return str(tmp / "run")


def test_greedy_decoding_continues_a_memorised_pattern(run):
    config, model, params, tok, step = generate.load(run)
    assert step == 60
    out = decode.Decoder(model, batch=1, cache_len=64).generate(params, [tok.encode("cdef")], max_new_tokens=40,
                                                               sampling=sampling.GREEDY, detokenize=tok.decode)[0]
    assert out.text == "ghabcdef" * 5 and out.finish_reason == "length"


def _main(run, capsys, monkeypatch, stdin=None, **flag_values):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    fv = flags.FlagValues()
    generate.define_flags(fv)
    fv(["generate.py", f"--workdir={run}"] + [f"--{k}={v}" for k, v in flag_values.items()])
    monkeypatch.setattr(generate, "FLAGS", fv)
    generate.main([])
    return capsys.readouterr()


def test_the_script_streams_the_text_and_honours_stop_strings(run, capsys, monkeypatch):
    printed = []
    original = generate.Printer._show

    def spy(self, text):
        printed.append(text[self.shown:])
        original(self, text)
    monkeypatch.setattr(generate.Printer, "_show", spy)
    out = _main(run, capsys, monkeypatch, prompt="cdef", temperature=0, max_new_tokens=40)
    assert out.out == "cdef" + "ghabcdef" * 5 + "\n"
    assert len([p for p in printed if p]) > 1, "the text came out in one piece, not streamed"
    assert "finish: length" in out.err
    cut = _main(run, capsys, monkeypatch, prompt="-", stdin="cdef", temperature=0, max_new_tokens=40, stop="bcd")
    assert cut.out == "cdef" + "gha" + "\n"  # the stop string and what follows are never printed


def test_same_seed_same_sample(run, capsys, monkeypatch):
    a = _main(run, capsys, monkeypatch, prompt="ab", temperature=1.5, top_k=0, seed=3, max_new_tokens=30).out
    b = _main(run, capsys, monkeypatch, prompt="ab", temperature=1.5, top_k=0, seed=3, max_new_tokens=30).out
    c = _main(run, capsys, monkeypatch, prompt="ab", temperature=1.5, top_k=0, seed=4, max_new_tokens=30).out
    assert a == b and a != c and a.startswith("ab")


def test_bad_flags_are_named(run, capsys, monkeypatch, tmp_path):
    """Each raises an error naming the flag (overrides.run prints it as one `generate.py: error: ...` line, not
    absl's help text or a traceback)."""
    for flag_values, match in ((dict(top_p=1.5), "top_p=1.5"), (dict(chat=True), "chat_template.json not found"),
                               (dict(prompt="ab" * 40, context=50), "no room in a context of 50"),
                               (dict(seed=-1), "seed=-1"), (dict(frequency_penalty=float("inf")), "frequency_penalty"),
                               (dict(top_k=2**40), "top_k"), (dict(max_new_tokens=10**8), "--context to set it"),
                               (dict(chat=True, prompt=""), "chat_template.json")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            _main(run, capsys, monkeypatch, **{"prompt": "ab", **flag_values})
    with pytest.raises(ValueError, match="no such directory"):
        _main(run + "-missing", capsys, monkeypatch, prompt="ab")
    with pytest.raises((ValueError, FileNotFoundError), match="a training run's workdir"):
        _main(str(tmp_path), capsys, monkeypatch, prompt="ab")  # a directory, not a run


def test_prompt_characters_the_vocabulary_lacks_are_named(run, capsys, monkeypatch):
    out = _main(run, capsys, monkeypatch, prompt="abZé", temperature=0, max_new_tokens=2)
    assert "2 of the prompt's 4 tokens are <unk>" in out.err  # the run's char vocabulary is a-h


def test_tokenizer_round_trip_is_what_the_printer_shows():
    tok = tokenizer_lib.ByteTokenizer()
    buf = io.StringIO()
    printer = generate.Printer(tok, [tok.eos_id], out=buf)
    ids = list(tok.encode("héllo"))
    for i in ids:  # 'é' is two byte tokens: nothing half-printed
        printer(0, [i])
        assert "\ufffd" not in buf.getvalue()
    assert buf.getvalue() == "héllo"


def test_a_chat_run_without_chat_gets_a_note(run, capsys, monkeypatch, tmp_path):
    """An SFT run (it has chat_template.json) prompted without --chat is continued as plain text, which is
    rarely what was meant: stderr says so; a plain run gets no note."""
    import json
    import shutil

    from data import chat
    chat_run = tmp_path / "chat_run"
    shutil.copytree(run, chat_run)
    (chat_run / "chat_template.json").write_text(json.dumps(chat.template_spec()))
    noted = _main(str(chat_run), capsys, monkeypatch, prompt="ab", temperature=0, max_new_tokens=2)
    assert "add --chat to send the prompt as a user turn" in noted.err
    plain = _main(run, capsys, monkeypatch, prompt="ab", temperature=0, max_new_tokens=2)
    assert "--chat" not in plain.err
