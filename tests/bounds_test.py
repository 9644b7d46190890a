"""bounds.py: the range check every config number goes through."""

import math

import pytest

import bounds


def test_values_in_range_pass_and_come_back_as_floats():
    assert bounds.check("a.b", 0) == 0.0 and bounds.check("a.b", 3) == 3.0
    assert bounds.check("rl.gamma", 1, 0, 1) == 1.0 and bounds.check("rl.gamma", 0, 0, 1) == 0.0  # both ends kept


@pytest.mark.parametrize("value,kw,message", [
    (-1e-3, {}, r"optim.lr=-0.001 must be a finite value >= 0"),
    (float("nan"), {}, r"optim.lr=nan must be a finite value >= 0"),  # NaN compares false: refused, not passed
    (math.inf, {}, r"optim.lr=inf must be a finite value >= 0"),
    (0.0, {"low_ok": False}, r"optim.lr=0.0 must be a finite value > 0"),
    (1.5, {"high": 1}, r"optim.lr=1.5 must be in \[0, 1\]"),
    (float("nan"), {"high": 1}, r"optim.lr=nan must be in \[0, 1\]")])
def test_out_of_range_values_are_named(value, kw, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        bounds.check("optim.lr", value, **kw)
