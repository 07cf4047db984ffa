"""Typed YAML configs with `--dotted.field VALUE` overrides, for every job's config.

A config (a build recipe, a training config) is a YAML file validated by a pydantic
model; every leaf field gets a command-line option. Text fields are taken verbatim (a template like "{0} and {1}" is not YAML),
`null` unsets an optional one; other values are parsed as YAML (`--classes [dog, cat]`).
Every error is one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """A config file or command line that cannot be used; the message is one line."""


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


def one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_config(model: type[BaseModel], path: Path, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> BaseModel:
    """Read a YAML config, fill top-level `defaults` it leaves out, apply dotted overrides."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
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
        raise ConfigError(f"{path.name}: {one_line(exc)}") from None
