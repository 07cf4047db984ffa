"""Typed YAML configs with `--dotted.field VALUE` overrides, for every job's config.

A config (a build recipe, a training config) is a YAML file validated by a pydantic
model; every leaf field gets a command-line option. Text fields are taken verbatim (a
template like "{0} and {1}" is not YAML), `null` unsets an optional one; other values are
parsed as YAML (`--classes [dog, cat]`). Every error, of the file, a field or the command
line (`ArgumentParser`), is one ConfigError line that names the field.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """A config file or command line that cannot be used; the message is one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown option, missing value) raise a one-line ConfigError
    instead of printing the whole usage text: jobs report it like any other bad input."""

    def error(self, message: str) -> NoReturn:
        hint = "see --help"
        if message.startswith("unrecognized arguments:"):  # a typo of a long option gets its correction
            known = [option for action in self._actions for option in action.option_strings]
            typed = [word.split("=")[0] for word in message.split()[2:] if word.startswith("--")]
            close = [match for word in typed for match in difflib.get_close_matches(word, known, n=1, cutoff=0.8)]
            if close:
                hint = f"did you mean {', '.join(close)}?"
        raise ConfigError(f"{message} ({hint})")


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) of every leaf field, sections recursed."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One --dotted.field option per leaf field (dashes or underscores)."""
    group = parser.add_argument_group("config fields (override the config file)")
    for dotted, field in leaf_fields(model):
        flags = [f"--{dotted.replace('_', '-')}"] + ([f"--{dotted}"] if "_" in dotted else [])
        default = "required" if field.default is PydanticUndefined else repr(field.default)
        help_text = f"{field.description or ''} (default: {default})"
        group.add_argument(*flags, dest=f"field:{dotted}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=help_text.replace("%", "%%"))


def overrides_from_args(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    text_fields = {dotted: field.annotation for dotted, field in leaf_fields(model)
                   if field.annotation in (str, str | None)}
    overrides = {}
    for key, value in vars(args).items():
        if not key.startswith("field:"):
            continue
        dotted = key.removeprefix("field:")
        if dotted in text_fields:
            value = None if text_fields[dotted] == str | None and value == "null" else value
        else:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass  # left as text: validation says what is wrong with it
        overrides[dotted] = value
    return overrides


def resolve_config_path(name_or_path: str, folder: Path, kind: str = "config") -> Path:
    """A YAML path, or a name in `folder`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{kind} file not found: {name_or_path}")
        return path
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"unknown {kind} {name_or_path!r} (known: {known})")
    return path


def _union_tag(part: str | int) -> bool:
    # pydantic names a union's members by type: literal['a','b'], list[str], bool, a section's class name
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none")
                                      or part[:1].isupper())


def _section(model: type[BaseModel] | None, path: list) -> type[BaseModel] | None:
    """The config section (a pydantic model) at a dotted path, if it is one."""
    for key in path:
        field = model.model_fields.get(key) if model and isinstance(key, str) else None
        annotation = field and field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def one_line(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """Every problem as `field.path: message`, joined by '; '.

    A union's member tags (`literal[...]`, `list[str]`) are left out of the path and the
    alternatives of one field are joined by 'or'; an unknown field gets a suggestion.
    """
    messages: dict[str, list[str]] = {}
    for item in error.errors():
        loc = item["loc"]
        if item["type"] == "extra_forbidden":  # the last part is the unknown key, whatever it looks like
            path = [p for p in loc[:-1] if not _union_tag(p)] + [loc[-1]]
            section = _section(model, path[:-1])
            close = difflib.get_close_matches(str(loc[-1]), section.model_fields, n=1) if section else []
            message = "unknown field" + (f" (did you mean {close[0]}?)" if close else "")
        else:
            path = [p for p in loc if not _union_tag(p)]
            message = item["msg"].removeprefix("Value error, ")
        messages.setdefault(".".join(map(str, path)), []).append(message)
    parts = []
    for where, texts in messages.items():
        text = texts[0] + "".join(f", or {t.removeprefix('Input should be ')}" for t in texts[1:])
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts)


def load_config(model: type[BaseModel], path: Path, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> BaseModel:
    """Read a YAML config, fill top-level `defaults` it leaves out, apply dotted overrides."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of fields, got {type(data).__name__}")
    data = {**(defaults or {}), **data}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {key} is not a section")
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path.name}: {one_line(exc, model)}") from None
