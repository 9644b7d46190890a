"""The trained byte-level BPE tokenizer: exact round trip, reserved specials, save/load."""

import json

import numpy as np
import pytest

from data import sources, tokenizer

ODD = ["<eos> is text here", "\u2581 lower one eighth block", "tabs\tand\r\nCRLF", "emoji 🙂 e\u0301", "\x00nul", ""]


def test_bpe_round_trip_on_the_corpus(corpus_dir):
    docs, _ = sources.read_documents(corpus_dir)
    texts = [d.text for d in docs]
    tok = tokenizer.BPETokenizer.train(texts, vocab_size=600)
    assert tok.vocab_size == 600 and tok.base_size == 600 - len(tokenizer.SPECIALS)
    assert [tok.special_id(s) for s in tokenizer.SPECIALS] == list(range(tok.base_size, 600))
    encoded = tok.encode_batch(texts + ODD)
    for text, ids in zip(texts + ODD, encoded):
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(ids, tok.encode(text))
    assert sum(map(len, encoded[:len(texts)])) < 0.5 * sum(len(t.encode()) for t in texts)  # it compresses
    assert tok.eos_id not in tok.encode("<eos><pad><|user|>")  # specials never come from text
    assert tok.decode(list(tok.encode("ab")) + [tok.eos_id]) == "ab"
    back = tokenizer.tokenizer_from_json(json.loads(tokenizer.tokenizer_json_bytes(tok)))
    assert back.vocab_size == 600 and back.decode(back.encode(ODD[0])) == ODD[0]
    assert tokenizer.tokenizer_json_bytes(back) == tokenizer.tokenizer_json_bytes(tok)
    with pytest.raises(ValueError, match="at least 267"):
        tokenizer.BPETokenizer.train(texts, vocab_size=100)


def test_byte_lengths_count_utf8_bytes():
    text = "naïve café 日本語 🙂\n" * 3 + "plain ascii words"
    bpe = tokenizer.BPETokenizer.train([text] * 5, vocab_size=300)
    for tok in (bpe, tokenizer.ByteTokenizer(), tokenizer.CharTokenizer(text)):
        lengths = tok.byte_lengths()
        assert lengths.shape == (tok.vocab_size,) and (lengths[tok.base_size:] == 0).all()
        assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))
