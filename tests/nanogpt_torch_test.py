"""scripts/nanogpt_torch.py: a short run on generated text, and a clear error for missing data."""
import os
import random
import re
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import nanogpt_torch  # noqa: E402


def _write_text(path) -> None:
    rng = random.Random(0)
    words = ["the", "king", "shall", "speak", "to", "thee", "my", "lord", "and", "queen"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(150)]
    path.write_text("\n".join(lines) + "\n")


def test_short_run_learns(tmp_path):
    data = tmp_path / "text.txt"
    _write_text(data)
    out = nanogpt_torch.run(nanogpt_torch.parse_args(
        ["--data", str(data), "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--threads=1"]))
    for key in ("wall_s", "wall_s_since_import", "first_val_below_target_iter", "first_val_below_target_s",
                "final_val", "final_train", "iters", "tokens_per_s_train"):
        assert key in out
    assert out["iters"] == 20
    assert [e["iter"] for e in out["evals"]] == [0, 10, 20]
    assert out["evals"][-1]["val"] < out["evals"][0]["val"]
    assert out["final_val"] == out["evals"][-1]["val"]
    assert out["tokens_per_s_train"] > 0 and out["wall_s_since_import"] >= out["wall_s"] > 0


def test_missing_data_names_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        nanogpt_torch.run(nanogpt_torch.parse_args(["--data", missing, "--max_iters=1"]))
