"""The job shell (factory/core/cli.py): exit codes and one-line errors."""

from __future__ import annotations

import pytest

from factory.core.cli import run_job
from factory.core.options import ConfigError


def failing(exc: BaseException):
    def job(argv):
        raise exc
    return job


def test_a_fixable_error_is_one_line_and_exit_2(capsys):
    assert run_job("some_job", failing(ConfigError("--seed: Input should be a valid integer"))) == 2
    assert capsys.readouterr().err == "some_job: error: --seed: Input should be a valid integer\n"


def test_storage_failing_midway(capsys):
    assert run_job("build", failing(OSError("Connection reset\nmore detail")), storage_failure="resume") == 2
    assert capsys.readouterr().err == "build: error: Connection reset (resume)\n"
    with pytest.raises(OSError):  # a job that names no recovery lets it surface
        run_job("export", failing(OSError("disk full")))


def test_success_passes_the_exit_code_and_the_arguments():
    assert run_job("job", lambda argv: len(argv), ["a", "b", "c"]) == 3


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert run_job("build", failing(KeyboardInterrupt("3 of 8 planned samples are committed to out; the same "
                                                      "command resumes"))) == 130
    assert capsys.readouterr().err == ("build: interrupted: 3 of 8 planned samples are committed to out; the same "
                                       "command resumes\n")
    assert run_job("export", failing(KeyboardInterrupt())) == 130  # before the job had anything to say
    assert capsys.readouterr().err == "export: interrupted\n"
