"""Reading JSON argument files strictly, and reporting every problem at once.

``parse_arguments`` is what every ``run_*.py`` calls::

    model_args, data_args, training_args = parse_arguments((ModelArgument, DataArgument, TrainingArguments))

It takes ``argv`` = ``<file.json> [--field value ...]`` (command-line values override the file)
or only ``--field value`` pairs, and, before any model is touched:

* reports a missing file or malformed JSON with the line and column;
* reports every unknown field with the closest known names (argparse would silently accept an
  abbreviation such as ``max_step`` for ``max_steps``: we do not);
* reports every value whose type does not fit its field (``"max_steps": "ten"``);
* then lets PaddleNLP's ``PdArgumentParser`` build the dataclasses as usual.

Stage-specific range checks collect their findings in a :class:`Problems` and raise one
:class:`ConfigError`; passed to ``parse_arguments(..., checks=[...])`` they run on the well-formed
fields even when others are unknown or ill-typed, and every problem is reported in one error.

:func:`run_entry_point` is how the ``run_*.py`` scripts call their ``main``: a user error prints its
message alone (exit code 2), ``--debug`` or ``ALIGNMENT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import sys
import typing
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "ConfigError",
    "Problems",
    "load_argument_file",
    "parse_arguments",
    "field_types",
    "looks_like_local_path",
    "run_entry_point",
    "DEBUG_ENV",
]


class ConfigError(ValueError):
    """One or more problems with the arguments; ``problems`` lists them."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class Problems:
    """Collects argument problems so they can be reported together."""

    def __init__(self, source: str | None = None) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(f"{field}: {message}")

    def check(self, condition: bool, field: str, message: str) -> bool:
        if not condition:
            self.add(field, message)
        return condition

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items, self.source)

    def __bool__(self) -> bool:
        return bool(self.items)


def looks_like_local_path(name: str) -> bool:
    """True for model names that can only be local paths: absolute, ``./``, ``../``, ``~``, or more
    than one ``/`` (hub names are ``owner/name`` or a bare name). Such a path must exist."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def load_argument_file(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; clear errors for a missing file, bad JSON or a non-object."""
    if not os.path.isfile(path):
        raise ConfigError([f"argument file {path!r} does not exist"])
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        line = text.splitlines()[error.lineno - 1] if 0 < error.lineno <= len(text.splitlines()) else ""
        raise ConfigError(
            [f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}\n      {line.strip()}"], path
        ) from None
    if not isinstance(data, dict):
        raise ConfigError([f"the file must hold one JSON object of arguments, got {type(data).__name__}"], path)
    return data


def field_types(dataclass_types: Iterable[type]) -> dict[str, tuple[Any, dataclasses.Field]]:
    """``{field name: (resolved type, field)}`` of every init field of the dataclasses."""
    fields: dict[str, tuple[Any, dataclasses.Field]] = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if field.init:
                fields[field.name] = (hints.get(field.name, field.type), field)
    return fields


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _type_problem(name: str, value: Any, annotation: Any, field: dataclasses.Field) -> str | None:
    """Why ``value`` cannot fill a field of type ``annotation``, or None if it can."""
    base, optional = _strip_optional(annotation)
    if value is None:
        return None if optional or field.default is None else f"null is not allowed (expected {_name(base)})"
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices and str(value) not in [str(c) for c in choices]:
        return f"{value!r} is not one of {list(choices)}"
    origin = typing.get_origin(base)
    if origin in (list, Sequence) or base is list:
        item_type = (typing.get_args(base) or (str,))[0]
        values = value if isinstance(value, list) else [value]
        for item in values:
            problem = _scalar_problem(item, item_type)
            if problem:
                return problem
        return None
    return _scalar_problem(value, base)


def _scalar_problem(value: Any, expected: Any) -> str | None:
    if expected is bool:
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_STRINGS):
            return None
        if isinstance(value, int) and value in (0, 1):
            return None
        return f"expected true/false, got {value!r}"
    if expected is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            return f"expected an integer, got {value!r}"
        return None
    if expected is float:
        if isinstance(value, bool) or not (isinstance(value, (int, float)) or (isinstance(value, str) and _is_float(value))):
            return f"expected a number, got {value!r}"
        return None
    if expected is str:
        if isinstance(value, (dict, list)):
            return f"expected a string, got {type(value).__name__}"
        return None
    if isinstance(expected, type) and issubclass(expected, enum.Enum):
        allowed = [member.value for member in expected]
        if value not in allowed:
            return f"{value!r} is not one of {allowed}"
    return None


_BOOL_STRINGS = {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _parse_cli_overrides(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``--key value`` / ``--key`` (true) / ``--key v1 v2`` pairs into a dict (values as strings)."""
    overrides: dict[str, Any] = {}
    problems: list[str] = []
    key: str | None = None
    for token in argv:
        if token.startswith("--"):
            key = token[2:].replace("-", "_") if "=" not in token else token[2:].split("=", 1)[0]
            if "=" in token:
                overrides[key] = token.split("=", 1)[1]
                key = None
            else:
                overrides[key] = True
        elif key is None:
            problems.append(f"unexpected command-line value {token!r} (values follow a --field)")
        elif overrides[key] is True:
            overrides[key] = token
        elif isinstance(overrides[key], list):
            overrides[key].append(token)
        else:
            overrides[key] = [overrides[key], token]
    return overrides, problems


def _to_cli(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"--{key}", *[str(item) for item in value]]
    return [f"--{key}", str(value)]


def parse_arguments(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    checks: Sequence[Callable[..., None]] = (),
) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    Raises one :class:`ConfigError` listing every unknown field, every ill-typed value and every
    problem found by ``checks``: each is called with the dataclass instances (built from the
    well-formed fields, so one bad field does not hide the others) and may raise a ``ConfigError``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # every field, its default and its help text
        _StrictParser(dataclass_types, allow_abbrev=False).print_help()
        raise SystemExit(0)
    source = None
    values: dict[str, Any] = {}
    if argv and not argv[0].startswith("--"):
        source = argv.pop(0)
        values.update(load_argument_file(source))
    overrides, problems = _parse_cli_overrides(argv)
    values.update(overrides)

    known = field_types(dataclass_types)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"{key}: unknown argument{hint}")
    usable: dict[str, Any] = {}
    for key, value in values.items():
        if key in known:
            problem = _type_problem(key, value, *known[key])
            if problem:
                problems.append(f"{key}: {problem}")
            else:
                usable[key] = value

    cli: list[str] = []
    for key, value in usable.items():
        if value is None:  # JSON null keeps the field's default (None for Optional fields)
            continue
        cli += _to_cli(key, value)

    parser = _StrictParser(dataclass_types, allow_abbrev=False)
    try:
        instances = parser.parse_args_into_dataclasses(args=cli, look_for_args_file=False)
    except _ParserError as error:
        raise ConfigError([*problems, str(error)], source) from None
    except ConfigError as error:  # a dataclass's own __post_init__ checks
        raise ConfigError([*problems, *error.problems], source) from None
    except ValueError as error:  # e.g. PaddleNLP's TrainingArguments checks: keep the problems found so far
        if not problems:
            raise
        raise ConfigError([*problems, str(error)], source) from error
    for check in checks:
        try:
            check(*instances)
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems, source)
    return instances


class _ParserError(ValueError):
    pass


def _strict_parser_base():
    from paddlenlp.trainer import PdArgumentParser

    return PdArgumentParser


class _StrictParser(_strict_parser_base()):
    """PdArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise _ParserError(message)


# ------------------------------------------------------------------------------ entry points
DEBUG_ENV = "ALIGNMENT_DEBUG"
"""Set to 1 (or pass ``--debug``) to see the traceback of a user error."""

EXIT_BAD_INPUT = 2  # bad arguments or data, like argparse
EXIT_FAILED = 1  # a reported runtime failure (damaged checkpoint, non-finite training)


def _error_exit_code(error: BaseException) -> int | None:
    """The exit code of an error reported without a traceback, or None for an unexpected error."""
    from alignment.data.base import DatasetError
    from alignment.utils.checkpoint import CheckpointError

    if isinstance(error, (ConfigError, DatasetError)):
        return EXIT_BAD_INPUT
    if isinstance(error, (CheckpointError, FloatingPointError)):
        return EXIT_FAILED
    return None


def run_entry_point(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Run an entry point's ``main(argv)`` the way the command line should see it.

    A user error (:class:`ConfigError`, ``DatasetError``: exit code 2) or a reported failure
    (``CheckpointError``, a non-finite training error: exit code 1) prints its message alone, without a
    traceback, on stderr. ``--debug`` anywhere in ``argv`` (it is removed) or ``ALIGNMENT_DEBUG=1``
    re-raises instead, traceback included. Any other exception propagates as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    argv = [token for token in argv if token != "--debug"]
    try:
        return main(argv)
    except Exception as error:
        code = _error_exit_code(error)
        if debug or code is None:
            raise
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "alignment"
        sys.stdout.flush()
        sys.stderr.write(
            f"{program}: error: {error}\n(set {DEBUG_ENV}=1 or pass --debug to see the traceback)\n"
        )
        sys.stderr.flush()
        raise SystemExit(code) from None
