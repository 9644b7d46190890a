"""How many items of a split were cut to fit a token limit, and how long they were before the cut.

Classification records longer than data.seq_len (data/classify.py) and QA questions longer than
qa.max_query_len (data/qa.py) are truncated; the builders log `summary()` per split, e.g.
"412 of 500 records truncated to 128 tokens (median 480 tokens, max 2,100)".
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Truncation:
    what: str  # the items counted: "records", "questions"
    limit: int  # tokens an item keeps at most
    total: int = 0  # items seen
    lengths: list[int] = dataclasses.field(default_factory=list)  # full lengths of the truncated ones

    def add(self, length: int) -> None:
        """Count one item of `length` tokens before truncation."""
        self.total += 1
        if length > self.limit:
            self.lengths.append(int(length))

    @property
    def truncated(self) -> int:
        return len(self.lengths)

    def summary(self) -> str:
        if not self.lengths:
            return f"none of {self.total:,} {self.what} truncated (limit {self.limit:,} tokens)"
        return (f"{self.truncated:,} of {self.total:,} {self.what} truncated to {self.limit:,} tokens "
                f"(median {int(np.median(self.lengths)):,} tokens, max {max(self.lengths):,})")
