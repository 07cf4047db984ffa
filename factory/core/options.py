"""One typed config per job: a pydantic model whose every field is a command-line option.

Two forms. A job with a config file (a build recipe, a training config: ``parse_config``)
reads YAML validated by the model, and each leaf field can be overridden as
`--dotted.field VALUE`. A job without one (``parse_options``) takes its fields as options
alone (a field marked ``positional()`` is a positional argument). Text fields are taken
verbatim (a template like "{0} and {1}" is not YAML), `null` unsets an optional one; other
values are parsed as YAML (`--classes [dog, cat]`, `--splits 1 2`). `--help` lists every
field with its default. Every error, of the file, a field or the command line, is one
ConfigError line naming the file's field or the option.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from factory.core.errors import FactoryError

M = TypeVar("M", bound=BaseModel)


class ConfigError(FactoryError, ValueError):
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


def positional(**kwargs: Any) -> Any:
    """A pydantic Field that the command line takes as a positional argument."""
    return Field(json_schema_extra={"positional": True}, **kwargs)


def _is_list(annotation: Any) -> bool:
    """list[...] or list[...] | None; not a union with other members (`classes: 'all' | list`)."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    return len(members) == 1 and typing.get_origin(members[0]) in (list, tuple)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel],
                         title: str = "config fields (override the config file)") -> None:
    """One --dotted.field option per leaf field (dashes or underscores); a list field takes
    several values (`--splits 1 2`), a bool field may stand alone (`--overwrite`)."""
    group = parser.add_argument_group(title)
    for dotted, field in leaf_fields(model):
        default = "required" if field.default is PydanticUndefined else repr(field.default)
        help_text = f"{field.description or ''} (default: {default})".replace("%", "%%")
        if (field.json_schema_extra or {}).get("positional"):
            group.add_argument(f"field:{dotted}", metavar=dotted.upper(), help=help_text)
            continue
        flags = [f"--{dotted.replace('_', '-')}"] + ([f"--{dotted}"] if "_" in dotted else [])
        shape = {"nargs": "+"} if _is_list(field.annotation) else (
            {"nargs": "?", "const": "true"} if _is_bool(field.annotation) else {})
        group.add_argument(*flags, dest=f"field:{dotted}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=help_text, **shape)


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
        elif isinstance(value, list):  # `--splits 1 2`, or one YAML list: `--crop-scale [0.25, 1.0]`
            items = [_yaml(item) for item in value]
            value = items[0] if len(items) == 1 and isinstance(items[0], list) else items
        else:
            value = _yaml(value)
        overrides[dotted] = value
    return overrides


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # left as text: validation says what is wrong with it


def check_template(name: str, template: str, n: int) -> None:
    """A text template must name each of its `n` classes as {0}..{n-1} (ValueError otherwise)."""
    markers = [f"@@{i}@@" for i in range(n)]
    try:
        rendered = template.format(*markers)
    except (IndexError, KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"template {name!r} must use {n} positional placeholder(s) {{0}}..: {exc}") from None
    # str.format ignores unused arguments: every class must actually be named.
    unused = [f"{{{i}}}" for i, marker in enumerate(markers) if marker not in rendered]
    if unused:
        raise ValueError(f"template {name!r} must use {n} positional placeholder(s) {{0}}..: {', '.join(unused)} missing")


def fill_template(one: str, two: str, words: list[str] | tuple[str, ...]) -> str:
    """A text naming `words`: the one-class template for one, the two-class template for two, and
    for more the two-class one with all but the last joined ("a cat, a dog and a bus" from
    "a {0} and a {1}"), so every word appears as written."""
    if len(words) == 1:
        return one.format(*words)
    if len(words) == 2:
        return two.format(*words)
    head = two.split("{0}")[0]  # what precedes each word: "a photograph of a " -> ", a "
    article = head.split()[-1] + " " if head.strip() else ""
    return two.format(f", {article}".join(words[:-1]), words[-1])


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


def _problems(error: ValidationError, model: type[BaseModel] | None) -> dict[str, list[str]]:
    """Messages per dotted field path. A union's member tags (`literal[...]`, `list[str]`) are
    left out of the path; an unknown field gets a suggestion."""
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
    return messages


def _joined(texts: list[str]) -> str:
    """The alternatives of one field joined by 'or'."""
    return texts[0] + "".join(f", or {t.removeprefix('Input should be ')}" for t in texts[1:])


def one_line(error: ValidationError, model: type[BaseModel] | None = None,
             flags: set[str] = frozenset(), source: str | None = None) -> str:
    """Every problem as `field.path: message`, joined by '; '. A field set on the command line
    (in `flags`) is named as its option, `--field-path`; the others are prefixed with `source`
    (the config file) when given."""
    parts = []
    for where, texts in _problems(error, model).items():
        flag = max((f for f in flags if where == f or where.startswith(f + ".")), key=len, default=None)
        if flag:  # a list item keeps its position: --splits.1
            parts.append(f"--{flag.replace('_', '-')}{where[len(flag):]}: {_joined(texts)}")
        elif where:
            parts.append(f"{source + ': ' if source else ''}{where}: {_joined(texts)}")
        else:
            parts.append(f"{source + ': ' if source else ''}{_joined(texts)}")
    return "; ".join(parts)


def validate(model: type[M], data: dict[str, Any], overrides: dict[str, Any] | None = None,
             source: str | None = None) -> M:
    """The model from `data` (the config file `source`, if any) with dotted `overrides`
    (command-line options) applied. Without a config file every field is an option."""
    data = dict(data)
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
        flags = set(overrides or {}) if source else {dotted for dotted, _ in leaf_fields(model)}
        raise ConfigError(one_line(exc, model, flags, source)) from None


def load_config(model: type[M], path: Path, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> M:
    """Read a YAML config, fill top-level `defaults` it leaves out, apply dotted overrides."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of fields, got {type(data).__name__}")
    return validate(model, {**(defaults or {}), **data}, overrides, source=path.name)


def job_parser(description: str | None) -> ArgumentParser:
    """The parser of a job: its module docstring as the description, one-line errors."""
    return ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_options(model: type[M], argv: list[str] | None, description: str | None) -> M:
    """A job's options, every field of `model` on the command line."""
    parser = job_parser(description)
    add_config_arguments(parser, model, title="options")
    return validate(model, {}, overrides_from_args(parser.parse_args(argv), model))


def parse_config(model: type[M], argv: list[str] | None, description: str | None, *, folder: Path,
                 default: str) -> M:
    """A job's config: --config NAME (a YAML file in `folder`, or a path) and field overrides."""
    parser = job_parser(description)
    parser.add_argument("--config", default=default,
                        help=f"config name (a YAML file in {folder.name}/) or a YAML path (default: {default})")
    add_config_arguments(parser, model)
    args = parser.parse_args(argv)
    return load_config(model, resolve_config_path(args.config, folder), overrides_from_args(args, model))
