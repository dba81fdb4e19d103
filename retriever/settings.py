"""Settings declared once: typed dataclass fields with their help, read the same way from the CLI, YAML and Python.

Each stage declares its settings as a dataclass whose fields are made with :func:`setting` (type from the
annotation; default, help, choices and range in the field). From that one declaration come

* the command-line flags (:func:`add_arguments`: ``--name-with-dashes``, documented aliases, every default
  shown in ``--help``) and the settings object they give (:func:`from_arguments`);
* the YAML section of a config (:func:`from_mapping`): unknown keys and wrong types are refused with the
  file, line and key (``configs/x.yaml:12: field 'train.epochs': expected a whole number, got 'two'``);
* the checks a Python caller gets (:func:`check_fields`), so a bad value is refused before any work
  whichever way it came in.

This is the tevatron shape (arguments as dataclasses with help metadata, parsed by one parser) with the
house's located errors. Cross-field rules (a cache chunk no larger than the batch) stay in each
dataclass's ``check()``, which calls :func:`check_fields` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from retriever.io import DataError, HardnegError

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit; a negative one is a traceback in both


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a setting's field says beyond its type and default."""

    help: str
    aliases: tuple[str, ...] = ()      # older or shorter flag spellings, kept working and shown in --help
    choices: tuple | None = None
    ge: float | None = None            # inclusive lower bound
    gt: float | None = None            # exclusive lower bound
    le: float | None = None            # inclusive upper bound
    lt: float | None = None            # exclusive upper bound
    cli: bool = True                   # False: a config/Python setting with no flag
    argparse_choices: bool = True      # False: the choice is refused by check() with its own message
    empty: bool = False                # True: "" is a value of its own (no prefix); else blank text is refused,
                                       # since `--teacher ""` meaning "no teacher" silently is a surprise


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field that is a user setting (see :class:`Meta` for the options)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"setting": Meta(help, **meta)})
    return dataclasses.field(default=default, metadata={"setting": Meta(help, **meta)})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One declared setting: its name, type (``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``), whether
    ``None`` is allowed, its default and its :class:`Meta`."""

    name: str
    kind: type
    optional: bool
    default: Any
    meta: Meta

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def settings_of(cls: type) -> list[Setting]:
    """The declared settings of a settings dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        meta = field.metadata.get("setting")
        if meta is None:
            continue
        kind, optional = _kind(hints[field.name])
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        found.append(Setting(field.name, kind, optional, default, meta))
    return found


def _kind(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a setting has one type (or that type | None), got {hint}")
        return _kind(rest[0])[0], True
    origin = typing.get_origin(hint) or hint
    return origin, False


# ------------------------------------------------------------------------------------------- values

def coerce(item: Setting, value: Any) -> Any:
    """``value`` as the setting's type, or a :class:`HardnegError` saying what was expected.

    Strict on purpose: ``"100"`` for a whole number is refused rather than guessed, except that a
    comma-separated string is accepted for a list (the CLI form, ``nDCG@10,Recall@100``).
    """
    if value is None:
        if item.optional:
            return None
        if item.kind is dict:  # a config section (`train:`) whose keys are all commented out
            return {}
        raise HardnegError("must be set (it has no 'unset' value)")
    kind = item.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise HardnegError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = " (a string: remove the quotes)" if isinstance(value, str) and _is_number(value) else ""
        raise HardnegError(f"expected a whole number, got {value!r}{hint}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        hint = " (a string: remove the quotes)" if isinstance(value, str) and _is_number(value) else ""
        raise HardnegError(f"expected a number, got {value!r}{hint}")
    if kind is str:
        if isinstance(value, str) and (value.strip() or item.meta.empty):
            return value
        if isinstance(value, str):
            raise HardnegError("is empty: leave it out (or null) for none" if item.optional else "must not be empty")
        raise HardnegError(f"expected text, got {value!r}")
    if kind is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
            return list(value)
        raise HardnegError(f"expected a list of names, e.g. [a, b], got {value!r}")
    if kind is dict:
        if isinstance(value, dict):
            return dict(value)
        raise HardnegError(f"expected a mapping, e.g. {{key: value}}, got {value!r}")
    raise TypeError(f"setting {item.name}: unsupported type {kind}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_value(item: Setting, value: Any) -> Any:
    """Coerce and range-check one value; the error message does not name the setting (the caller does)."""
    value = coerce(item, value)
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):  # inf/nan pass every bound check below
        raise HardnegError(f"must be a finite number, got {value!r}")
    meta = item.meta
    if meta.choices is not None:
        values = value if isinstance(value, list) else [value]
        for one in values:
            if one not in meta.choices:
                raise HardnegError(f"unknown {item.name} {one!r}; choose one of {', '.join(map(str, meta.choices))}")
    bounds = [(meta.ge, ">=", lambda v, b: v >= b), (meta.gt, ">", lambda v, b: v > b),
              (meta.le, "<=", lambda v, b: v <= b), (meta.lt, "<", lambda v, b: v < b)]
    for bound, sign, holds in bounds:
        if bound is not None and not holds(value, bound):
            raise HardnegError(f"must be {sign} {bound:g}, got {value!r}")
    return value


def check_fields(settings: Any, section: str) -> None:
    """Check (and coerce in place) every declared field of a settings object; errors name ``section.field``."""
    for item in settings_of(type(settings)):
        try:
            value = check_value(item, getattr(settings, item.name))
        except HardnegError as err:
            message = str(err)
            if message.startswith("unknown "):  # the choice message already names the setting
                raise HardnegError(f"{section}: {message}") from None
            raise HardnegError(f"{section}: {item.name}: {message}") from None
        object.__setattr__(settings, item.name, value)


# ------------------------------------------------------------------------------------------- CLI

class HelpFormatter(argparse.HelpFormatter):
    """Shows every default that is not already written into the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})".strip()


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                  skip: tuple[str, ...] = (), prefix: str = "",
                  aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Add one flag per declared setting of ``cls`` (``skip``: settings the command sets itself).

    ``prefix`` names a section's flags and destinations (``encode`` -> ``--encode-batch-size``, ``encode_batch_size``)
    so two sections can share a command; ``aliases`` adds spellings for one command. :func:`from_arguments`
    with the same prefix reads them back.
    """
    aliases = aliases or {}
    for item in settings_of(cls):
        if not item.meta.cli or item.name in skip:
            continue
        flag = f"--{prefix}-{item.name.replace('_', '-')}" if prefix else item.flag
        names = [flag, *item.meta.aliases, *aliases.get(item.name, ())]
        options: dict[str, Any] = {"dest": _dest(item, prefix), "help": item.meta.help}
        if item.kind is bool:
            optional = item.default or item.optional
            options |= {"action": argparse.BooleanOptionalAction if optional else "store_true",
                        "default": item.default}
        else:
            options["default"] = item.default
            options["type"] = {int: _cli_int, float: _cli_float}.get(item.kind, str)
            if item.meta.choices is not None and item.meta.argparse_choices:
                options["choices"] = item.meta.choices
            elif item.meta.choices is not None:
                options["metavar"] = "{" + ",".join(map(str, item.meta.choices)) + "}"
            if item.kind is list:
                options |= {"type": str, "action": "append", "default": None}
                default = ",".join(item.default) if item.default else "none"
                options["help"] = f"{item.meta.help} (repeatable or comma-separated; default: {default})"
        parser.add_argument(*dict.fromkeys(names), **options)


def _dest(item: Setting, prefix: str) -> str:
    return f"{prefix}_{item.name}" if prefix else item.name


def _cli_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _cli_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def from_arguments(cls: type, args: argparse.Namespace, *, prefix: str = "", **given: Any) -> Any:
    """The settings object of a parsed command line; ``given`` sets what the command decides itself."""
    values = {}
    for item in settings_of(cls):
        if item.name in given:
            continue
        value = getattr(args, _dest(item, prefix), item.default)
        if item.kind is list:  # --metrics a,b --metrics c, or the default
            entries = value if isinstance(value, list) else [value] if value is not None else None
            value = item.default if entries is None else [part.strip() for entry in entries
                                                          for part in entry.split(",") if part.strip()]
        values[item.name] = value
    return cls(**values, **given)


# ------------------------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: ``3e-5`` is a float (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML with 1.2 numbers (``3e-5`` is a float); used for config files and ``--set`` values alike."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


BASE_KEY = "base"  # a config's `base: other.yaml` builds on that file (path relative to the config's folder)


class ConfigSource:
    """A YAML file with the line of every key, so errors can point at the line to fix.

    ``base: other.yaml`` at the top level builds this config on another one: its keys are read first, and this
    file's keys replace them, mapping by mapping (a recipe and the demo built on it share every setting they do
    not change). Each key keeps the file and line it came from.
    """

    def __init__(self, path: str | Path, *, _seen: tuple[Path, ...] = ()) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "config file not found")
        text = self.path.read_text(encoding="utf-8")
        try:
            self.data = parse_yaml(text) or {}
            root = yaml.compose(text, Loader=_Loader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise DataError(self.path, f"not valid YAML ({getattr(err, 'problem', err)})",
                            line=mark.line + 1 if mark else None) from None
        if not isinstance(self.data, dict):
            raise DataError(self.path, "expected a mapping of settings at the top level", line=1)
        self.lines: dict[str, tuple[Path, int]] = {}
        self.overrides: dict[str, str] = {}  # key -> the command-line flag that set it, which errors name instead
        self._index(root, "")
        if BASE_KEY in self.data:
            self._build_on(self.data.pop(BASE_KEY), _seen + (self.path.resolve(),))

    def _index(self, node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                self.lines[name] = (self.path, key.start_mark.line + 1)
                self._index(value, name + ".")

    def _build_on(self, base: object, seen: tuple[Path, ...]) -> None:
        if not isinstance(base, str):
            raise self.error(BASE_KEY, f"expected the path of another config, got {base!r}")
        path = (self.path.parent / base).resolve()
        if path in seen:
            raise self.error(BASE_KEY, f"{base} builds on this config again (a cycle)")
        parent = ConfigSource(path, _seen=seen)
        self.data = _merged(parent.data, self.data)
        self.lines = parent.lines | {key: where for key, where in self.lines.items() if key != BASE_KEY}

    def override(self, key: str, flag: str | None = None) -> None:
        """Note that ``key`` was set on the command line (by ``flag``, default ``--set key``): an error about it
        names the flag, not a line of the file."""
        self.overrides[key] = flag or f"--set {key}"

    def error(self, field: str, message: str, hint: str | None = None) -> DataError:
        given = [flag for key, flag in self.overrides.items() if key == field or field.startswith(key + ".")]
        if given:
            return DataError(given[0], message, field=field, hint=hint)
        parts = field.split(".")
        where = next((self.lines[".".join(parts[:n])] for n in range(len(parts), 0, -1)
                      if ".".join(parts[:n]) in self.lines), None)
        path, line = where if where is not None else (self.path, None)
        return DataError(path, message, line=line, field=field, hint=hint)


def _merged(base: dict, given: dict) -> dict:
    """``given`` over ``base``: a section (``train:``) merges key by key; a setting, a mapping-valued one like
    ``filter_params`` included, is replaced whole (half of one filter's parameters and half of another's would
    be neither)."""
    merged = dict(base)
    for key, value in given.items():
        if value is None and isinstance(base.get(key), dict):  # a section whose keys are all commented out
            continue
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = {**base[key], **value} if both else value
    return merged


def from_mapping(cls: type, given: dict, *, section: str, source: ConfigSource | None = None,
                 skip: tuple[str, ...] = (), **fixed: Any) -> Any:
    """The settings object of one config section: unknown keys and bad values are refused with their line.

    ``skip`` names settings this section does not hold (set elsewhere in the config, passed in ``fixed``).
    """
    known = [item for item in settings_of(cls) if item.name not in skip and item.name not in fixed]
    by_name = {item.name: item for item in known}
    values = {}
    for key, value in (given or {}).items():
        where = f"{section}.{key}" if section else str(key)
        if key not in by_name:
            message = f"unknown setting '{where}'; known: {', '.join(by_name)}"
            raise source.error(where, message) if source else HardnegError(message)
        try:
            values[key] = check_value(by_name[key], value)
        except HardnegError as err:
            raise source.error(where, str(err)) if source else HardnegError(f"{where}: {err}") from None
    return cls(**values, **fixed)


def resolve_sections(top: Any, sections: dict[str, type], source: ConfigSource,
                     shared: dict[str, tuple[str, ...]] | None = None) -> dict:
    """A whole config as plain dicts: the top-level settings object ``top`` and each section read through its
    settings class (defaults filled, types and ranges checked, then the class's ``check()``), every error with
    the file, line and key. ``shared`` names the top-level settings a section takes instead of holding them
    (the run config's ``seed`` for mining, training and evaluation)."""
    shared = shared or {}
    config = dataclasses.asdict(top)
    for section, cls in sections.items():
        fixed = {key: getattr(top, key) for key in shared.get(section, ())}
        settings = from_mapping(cls, getattr(top, section), section=section, source=source, **fixed)
        if hasattr(settings, "check"):
            try:
                settings.check()
            except DataError:
                raise
            except HardnegError as err:  # a rule between settings: blame the command-line flag it names, if any
                named = [key for key in source.overrides if key.startswith(section + ".")
                         and re.search(rf"\b{re.escape(key.split('.', 1)[1])}\b", str(err))]
                raise source.error(named[0] if named else section, str(err)) from None
        config[section] = {key: value for key, value in dataclasses.asdict(settings).items() if key not in fixed}
    return config
