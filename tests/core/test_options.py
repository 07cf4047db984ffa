"""Typed options of the jobs without a config file (factory/core/options.py's parse_options)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from factory.core.options import ConfigError, parse_options, positional


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = positional(description="a dataset")
    format: Literal["a", "b"] = Field(description="the format")
    splits: list[int] = Field([1, 2, 3], description="splits")
    workers: int | None = Field(None, ge=1, description="workers")
    overwrite: bool = Field(False, description="replace")
    note: str | None = Field(None, description="free text")


def test_positional_lists_flags_and_text():
    options = parse_options(Options, ["ds", "--format", "b", "--splits", "1", "3", "--overwrite",
                                      "--note", "{0} and {1}"], None)
    assert options == Options(dataset="ds", format="b", splits=[1, 3], workers=None, overwrite=True,
                              note="{0} and {1}")
    assert parse_options(Options, ["ds", "--format", "a", "--overwrite", "false", "--note", "null"], None).overwrite \
        is False
    assert parse_options(Options, ["ds", "--format", "a", "--splits", "[2, 3]"], None).splits == [2, 3]  # YAML too


@pytest.mark.parametrize("argv,message", [
    (["ds"], "--format: Field required"),
    (["ds", "--format", "c"], "--format: Input should be 'a' or 'b'"),
    (["ds", "--format", "a", "--workers", "0"], "--workers: Input should be greater than or equal to 1"),
    (["ds", "--format", "a", "--splits", "x"], "--splits.0: Input should be a valid integer"),
    (["ds", "--format", "a", "--workrs", "2"], "unrecognized arguments: --workrs 2 (did you mean --workers?)"),
])
def test_errors_are_one_line_naming_the_option(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_options(Options, argv, None)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_options(Options, ["--help"], "Doc.")
    printed = capsys.readouterr().out
    for text in ("DATASET", "--format", "(default: required)", "--splits", "(default: [1, 2, 3])", "--overwrite"):
        assert text in printed
