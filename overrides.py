"""`field=value` text -> a typed config value: the `--config.x.y=...` spelling outside config_flags;
and the command line around it: `flags_parser` / `run` turn bad flags, config files and values into
one `prog: error: ...` line.

scripts/evaluate.py applies overrides to a run's saved config (known only after --workdir is
parsed); scripts/sweep.py parses its grid values. A value takes the type of the field's current
value; an unknown field or a value that does not parse raises naming both.
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap

import ml_collections

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _locate(config: ml_collections.ConfigDict, field: str):
    """(parent ConfigDict, leaf name) of a dotted field, or an error naming it and the keys that exist."""
    node, names = config, field.split(".")
    for i, name in enumerate(names):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join(names[:i]) or "the config"
            keys = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "no fields"
            raise ValueError(f"config field {field!r} does not exist ({where} has: {keys})")
        if i < len(names) - 1:
            node = node[name]
    return node, names[-1]


def parse(config: ml_collections.ConfigDict, field: str, text: str):
    """`text` as the type of config's `field` (bool, int, float, str, tuple/list)."""
    node, leaf = _locate(config, field)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"config field {field!r} is a section ({', '.join(sorted(current.keys()))}), not a value")
    try:
        if isinstance(current, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError("expected true or false")
            return text.lower() in _TRUE
        if isinstance(current, int):
            number = float(text)  # accepts 1e3 for an int field when it is whole
            if number != int(number):
                raise ValueError("not a whole number")
            return int(number)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError("expected a tuple or list literal")
            return type(current)(value)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"config field {field!r} ({type(current).__name__}, now {current!r}): "
                         f"cannot use {text!r}: {e}") from None
    raise ValueError(f"config field {field!r} holds a {type(current).__name__}; it cannot be set from text")


def apply(config: ml_collections.ConfigDict, assignments: dict) -> ml_collections.ConfigDict:
    """Sets each `field: value` in place (text values parsed with the field's type); returns config."""
    for field, value in assignments.items():
        node, leaf = _locate(config, field)
        node[leaf] = parse(config, field, value) if isinstance(value, str) else value
    return config


def split_argv(argv: list[str], prefix: str = "--config.") -> tuple[dict, list[str]]:
    """({field: text} for each `--config.field=text`, the other arguments)."""
    fields, rest = {}, []
    for arg in argv:
        if arg.startswith(prefix):
            field, sep, text = arg[len(prefix):].partition("=")
            if not sep or not field:
                raise ValueError(f"{arg!r}: expected {prefix}FIELD=VALUE")
            fields[field] = text
        else:
            rest.append(arg)
    return fields, rest


def config_file_problem(argv: list[str]) -> str | None:
    """Why a `--config=FILE.py[:arg]` argument cannot load, when its file does not exist (ml_collections
    defers that error to the first use of the config: two tracebacks), else None."""
    for value in _config_values(argv):
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
            return f"--config={value}: no config file {path!r}{where}"
    return None


def _config_values(argv: list[str]) -> list[str]:
    """The values of the `--config=FILE.py[:arg]` (or `--config FILE.py`) arguments."""
    values = []
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            values.append(arg.partition("=")[2])
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


def _config_arg_reason(message: str) -> str | None:
    """A config file's own 'config arg ...' ValueError (an unknown `FILE.py:arg`), from the traceback that
    ml_collections wraps into the flag error; None for any other error (a bug in a config file keeps it)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines and lines[-1].startswith("ValueError: config arg "):
        return lines[-1][len("ValueError: "):]
    return None


def flags_parser(prog: str):
    """An `app.run(main, flags_parser=...)` parser: absl's, except that these print one line and exit 1
    (LMSTACK_TRACEBACK=1 keeps the traceback): a `--config=` file that does not exist (ml_collections would
    fail at the config's first use, with two tracebacks), a config argument the file refuses
    (`pretrain_causal.py:huge`), a file without get_config() (a helper module), and a `--config.x.y=` override
    naming a field that does not exist (ml_collections raises AttributeError / KeyError while the flags are
    parsed)."""
    from absl import flags

    def parse(argv):
        trace = bool(os.environ.get("LMSTACK_TRACEBACK"))
        problem = config_file_problem(argv[1:])
        if problem:
            sys.exit(f"{prog}: error: {problem}")
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # absl's own report (app.parse_flags_with_usage), one line for a config arg
            reason = _config_arg_reason(str(e))
            if reason and not trace:
                sys.exit(f"{prog}: error: {reason}")
            message = str(e)
            sys.stderr.write(f"FATAL Flags parsing error:\n{textwrap.indent(message, '  ')}\n" if "\n" in message
                             else f"FATAL Flags parsing error: {message}\n")
            sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
            sys.exit(1)
        except (AttributeError, KeyError) as e:
            if trace:
                raise
            detail = e
            while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError("'x'\nDid you ..."))
                detail = detail.args[0]
            detail = " ".join(str(detail).split())
            if isinstance(e, AttributeError) and "no attribute 'get_config'" in detail:  # a helper module
                value = (_config_values(argv[1:]) or ["?"])[-1]
                sys.exit(f"{prog}: error: --config={value}: the file has no get_config() function, so it is not "
                         f"a config (common.py, presets.py and rl_common.py are helpers the configs import)")
            sys.exit(f"{prog}: error: a --config.* override names a field that does not exist: {detail}")
    return parse


TRACEBACK_HINT = "(LMSTACK_TRACEBACK=1 shows the traceback)"  # the line after a script's one-line error


def guarded(main, prog: str, errors: tuple = (ValueError, OSError)):
    """`main` with `errors` (a bad value, a missing workdir or checkpoint: their messages name it) printed as
    one `prog: error:` line and exit status 1 instead of a traceback; LMSTACK_TRACEBACK=1 re-raises them."""
    def wrapped(argv):
        try:
            return main(argv)
        except errors as e:
            if os.environ.get("LMSTACK_TRACEBACK"):
                raise
            print(f"{prog}: error: {e}\n{TRACEBACK_HINT}", file=sys.stderr)
            return 1
    return wrapped


def run(main, prog: str, errors: tuple = (ValueError, OSError), parser=None) -> None:
    """`app.run(main)` for a script: flags parsed by `parser` (default flags_parser(prog)), `errors` out of
    `main` (default a ValueError or OSError) one `prog: error:` line (`guarded`). Every script's entry."""
    from absl import app
    app.run(guarded(main, prog, errors), flags_parser=parser or flags_parser(prog))
