"""Typed run configurations: one way to declare settings, read YAML files and build command lines.

A configuration is a dataclass whose fields are declared with `setting` (a default plus one line of help).
Fields that hold another such dataclass are sections (``optim``, ``data``, ...). Every leaf has a flag of its
own name (``batch_size`` -> ``--batch-size``; leaf names are unique across sections), so the command line stays
flat while YAML files may be nested by section or flat. The help text of each field is its ``--help``.

Values are merged as defaults <- YAML file <- flags. Every value is checked against the field's type when it
is read, and an unknown key or a value of the wrong type fails at once, naming the file (or flag) and the key.
A number written ``1e-5`` (which YAML 1.1 reads as text) is taken as the number.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["ConfigError", "add_flags", "as_dict", "from_flags", "load", "section_of", "setting"]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the file or flag and the key."""


def setting(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A configuration field: its default (a list default is copied per instance) and its help text."""
    metadata = {"help": help, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------ types
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls, prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """leaf name -> (path of sections, field, type), for every leaf of ``cls`` and its sections."""
    hints = _hints(cls)
    found: dict[str, tuple[tuple[str, ...], dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            for name, entry in _leaves(hints[f.name], prefix + (f.name,)).items():
                if name in found:
                    raise TypeError(f"{cls.__name__}: setting {name!r} is declared twice")
                found[name] = entry
        else:
            if f.name in found:
                raise TypeError(f"{cls.__name__}: setting {f.name!r} is declared twice")
            found[f.name] = (prefix, f, hints[f.name])
    return found


def _options(tp) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _options(tp)
    if typing.get_origin(inner) is Literal:
        name = " | ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is list:
        name = f"list of {typing.get_args(inner)[0].__name__}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def coerce(value: Any, tp, where: str) -> Any:
    """``value`` checked (and, for numbers written as text, converted) against the type ``tp``."""
    inner, optional = _options(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got null")
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value in typing.get_args(inner):
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, typing.get_args(inner)))}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(inner)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one item given where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif inner is str:
        if isinstance(value, (str, Path)):
            return str(value)
    else:
        raise TypeError(f"{where}: unsupported setting type {tp}")
    raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# ------------------------------------------------------------------------------------------------ building
def _build(cls, values: Mapping[str, Any]):
    """An instance of ``cls`` from flat leaf values (missing leaves keep their defaults)."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _flatten(cls, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Flat, checked leaf values from a YAML mapping that may be nested by section or flat."""
    leaves = _leaves(cls)
    hints = _hints(cls)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in hints and _is_section(hints[name]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping of settings, got {value!r}")
            inner = _flatten(hints[name], value, where)
            flat.update(inner)
            continue
        if name not in leaves:
            sections = [n for n in hints if _is_section(hints[n])]
            raise ConfigError(f"{where}: unknown key {key!r} (settings: {', '.join(sorted(leaves))}"
                              + (f"; sections: {', '.join(sections)}" if sections else "") + ")")
        flat[name] = coerce(value, leaves[name][2], f"{where}: {key}")
    return flat


def load(cls, path: str | Path | None = None, flags: Mapping[str, Any] | None = None):
    """``cls`` from defaults <- the YAML file at ``path`` <- ``flags`` (leaf name -> value; None = not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        values.update(_flatten(cls, data, str(path)))
    leaves = _leaves(cls)
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in leaves:
            raise ConfigError(f"unknown setting {name!r}")
        value = None if value is EXPLICIT_NONE else value
        values[name] = coerce(value, leaves[name][2], _flag(name, leaves[name][1]))
    return _build(cls, values)


def as_dict(config) -> dict[str, Any]:
    """The configuration as plain nested data (for YAML / JSON)."""
    return dataclasses.asdict(config)


def _leaf_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        flat.update(_leaf_values(value) if isinstance(value, Mapping) else {key: value})
    return flat


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """``"--name saved -> now"`` for each leaf setting that differs between two configurations saved as nested
    plain data (`as_dict`; leaf names are unique across sections), leaving out the names in ``ignore``. A setting
    one side lacks reads "(not set)". Compare like with like: both as written to, and read from, the same file
    format."""
    saved, now = _leaf_values(saved), _leaf_values(now)
    missing = object()
    return [f"--{key.replace('_', '-')} {saved.get(key, '(not set)')!s} -> {now.get(key, '(not set)')!s}"
            for key in sorted(set(saved) | set(now))
            if key not in ignore and saved.get(key, missing) != now.get(key, missing)]


def read_saved_settings(path: Path, remedy: str) -> dict[str, Any]:
    """The settings a run saved at ``path`` (JSON, or YAML for other suffixes); an unreadable file is a ValueError
    naming it, followed by ``remedy``."""
    import json

    import yaml

    try:
        text = path.read_text()
        saved = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(saved, dict):
            raise ValueError("not a mapping of settings")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the saved settings ({type(err).__name__}: {err}); {remedy}") from None
    return saved


def refuse_changed_settings(out: Path, saved_path: Path, diffs: Sequence[str], *, resume: bool,
                            output_flag: str) -> None:
    """The one error for a run whose settings differ (``diffs``, `changed_settings`) from those of the run in its
    output folder ``out``, saved at ``saved_path``: nothing when they are the same."""
    if not diffs:
        return
    if resume:
        raise ValueError(f"--resume continues the run in {out} with its saved settings ({saved_path}), but these "
                         f"differ: {'; '.join(diffs)}. Drop the changes to resume, or start over with --overwrite "
                         f"(without --resume) or another {output_flag}")
    raise ValueError(f"{out} already holds a run with other settings ({saved_path}): {'; '.join(diffs)}. A run folder "
                     f"is not reused with changed settings: pass --overwrite to delete its run files and start over, "
                     f"or choose another {output_flag}")


def section_of(cls, name: str) -> tuple[str, ...]:
    """The sections that hold the leaf ``name``."""
    return _leaves(cls)[name][0]


# ------------------------------------------------------------------------------------------------ flags
def _flag(name: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


class _ExplicitNone:
    """``none`` given on the command line: unlike a flag left out (None), it sets the value to None."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _parse_none(parse):
    def parser(text: str):
        return EXPLICIT_NONE if text.lower() in ("none", "null") else parse(text)
    parser.__name__ = getattr(parse, "__name__", "value")
    return parser


def add_flags(parser: argparse.ArgumentParser, cls, *, skip: Sequence[str] = ()) -> None:
    """One flag per leaf of ``cls`` (an argument group per section); their default is None = "not given", and
    the help shows the field's help text with its default."""
    hints = _hints(cls)
    groups = {(): parser}
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            groups[(f.name,)] = parser.add_argument_group(f.metadata.get("help") or f.name)
    defaults = cls()
    for name, (path, f, tp) in _leaves(cls).items():
        if name in skip:
            continue
        target = groups.get(path[:1], parser)
        default = defaults
        for section in path:
            default = getattr(default, section)
        default = getattr(default, name)
        help_text = f"{f.metadata.get('help', '')} [{default if default not in (None, []) else 'none'}]"
        inner, optional = _options(tp)
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": name}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is Literal:
            kwargs["choices"] = typing.get_args(inner)
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(inner) is list:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = _parse_none(inner) if optional else inner
            if optional:
                kwargs["help"] += " (none: unset)"
        target.add_argument(_flag(name, f), **kwargs)


def from_flags(args: argparse.Namespace, cls, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The leaf values the user gave on the command line (flags left out are not in the result)."""
    given = {}
    for name in _leaves(cls):
        if name in skip:
            continue
        value = getattr(args, name, None)
        if value is not None:
            given[name] = value
    return given
