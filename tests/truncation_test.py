"""Truncation is counted, not silent: classification records cut to data.seq_len, QA questions cut to
qa.max_query_len, with their untruncated lengths."""

from data import classify as classify_data, qa as qa_data
from data.sources import ReadStats
from data.tokenizer import ByteTokenizer
from data.truncation import Truncation

TOK = ByteTokenizer()


def test_summary_names_counts_limit_median_and_max():
    t = Truncation("records", 128)
    for n in (100, 480, 2100, 128, 300):
        t.add(n)
    assert (t.total, t.truncated) == (5, 3)
    assert t.summary() == "3 of 5 records truncated to 128 tokens (median 480 tokens, max 2,100)"
    assert Truncation("questions", 8).summary() == "none of 0 questions truncated (limit 8 tokens)"


def test_classify_source_counts_records_longer_than_seq_len():
    records = [("f:1", {"text": "x" * 50, "label": "a"}),  # 50 + <cls> <sep> = 52 tokens
               ("f:2", {"text": "xy", "label": "b"}),  # fits
               ("f:3", {"text": "x" * 20, "text_pair": "y" * 9, "label": "a"}),  # 20 + 9 + 3 = 32
               ("f:4", {"text": "x" * 14, "label": "a"})]  # exactly 16: not truncated
    src = classify_data.make_source(records, TOK, ["a", "b"], 16, "first", strict=True, stats=ReadStats())
    assert (src.truncation.total, src.truncation.truncated, src.truncation.lengths) == (4, 2, [52, 32])
    assert src.truncation.summary() == "2 of 4 records truncated to 16 tokens (median 42 tokens, max 52)"
    dec = classify_data.make_source(records, TOK, ["a", "b"], 16, "last", strict=True, stats=ReadStats())
    assert dec.truncation.lengths == [51, 31]  # decoders: text <eos> / text <sep> pair <eos>
    for i, (_, r) in enumerate(records):  # the examples are the ones encode_example makes
        want = classify_data.encode_example(TOK, r["text"], r.get("text_pair"), 16, "first")
        assert all((src[i][k] == want[k]).all() for k in want)


def test_qa_features_count_questions_longer_than_max_query_len():
    ctx = "the cat sat on the mat"
    examples = [qa_data.QAExample("1", "who?", ctx, (("cat", 4),)),
                qa_data.QAExample("2", "which animal sat down on the mat?", ctx, (("cat", 4),))]
    features = qa_data.make_features(examples, TOK, seq_len=48, max_query_len=8, doc_stride=4)
    assert (features.truncation.total, features.truncation.lengths) == (2, [33])
    assert features.truncation.summary() == "1 of 2 questions truncated to 8 tokens (median 33 tokens, max 33)"
