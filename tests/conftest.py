"""Test setup: 8 fake CPU devices (set before jax is imported) and strict JAX modes."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hostenv  # noqa: E402
import jax  # noqa: E402

hostenv.tune_malloc()

jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same tiny programs (a straight run and its resumed twin, every mode's
# train/eval step): JAX's persistent compilation cache serves the repeats (README, Tests, says how much
# that saves). One directory per pytest session: the process that creates it removes it at exit, and
# pytest-xdist's workers, started by that process, inherit its path through the environment, so a
# program one worker compiled loads in the other. Subprocesses that tests start (CLI tests) do not use
# it: they run exactly as a user's command does.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_XLA_CACHE = os.environ.get("LMSTACK_TEST_XLA_CACHE", "")
if not _XLA_CACHE or not os.path.isdir(_XLA_CACHE):
    _XLA_CACHE = os.environ["LMSTACK_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="lmstack_test_xla_cache_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
hostenv.compile_cache(_XLA_CACHE)  # what train.compile_cache_dir does

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")

import sysconfig  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small real corpus: the stdlib `json` and `email` packages' sources (~60 documents)."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    for pkg in ("json", "email"):
        for dirpath, _, files in os.walk(os.path.join(stdlib, pkg)):
            if "__pycache__" in dirpath:
                continue
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), stdlib).replace(os.sep, "_")
                    shutil.copy(os.path.join(dirpath, f), out / rel)
    return str(out)


def tiny_config(corpus: str, config_module=None, **overrides):
    """The `tiny` variant of a config (default: pretrain_causal), on the test corpus; `a__b=v` sets a.b = v."""
    from configs import pretrain_causal
    c = (config_module or pretrain_causal).get_config("tiny")
    c.data.path = corpus
    c.data.val_fraction = 0.2
    c.train.async_checkpoint = False
    return set_overrides(c, overrides)


def set_overrides(c, overrides: dict):
    """`a__b=v` -> c.a.b = v (keyword-argument spelling of --config.a.b=v)."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _say_x(text, answer, finish, n_tokens):
    """A trivial reward dense enough for a random tiny model ('say letters'): the share of lowercase ASCII
    letters among the completion's characters (about 0.1 at init, 1 for a policy that only says letters)."""
    del answer, finish, n_tokens
    return sum("a" <= c <= "z" for c in text) / max(len(text), 1)


@pytest.fixture
def say_x(monkeypatch):
    """The RL tests' programmatic reward 'say_x' (`_say_x`), registered for the test."""
    from rl import rewards
    monkeypatch.setitem(rewards.PROGRAMMATIC, "say_x", _say_x)
