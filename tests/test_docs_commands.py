"""Every job and bench command the README and the docs show a user starts as written (the script
or module found, imported and parsed: `--help` appended), and every option it names is one that
command has. Commands that build, train or evaluate at full size are run by their own tests; this
keeps the docs from naming a flag, a script or a module form that no longer exists.

All the forms start in one fresh interpreter, each as `python` would run it (``runpy``, with its
own sys.argv), so that torch and Ray are imported once, not once per form."""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one fresh interpreter for every documented command form: about 20 s

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
START = re.compile(r"python (?:-m (?:jobs|bench)\.\w+|(?:jobs|bench)/\w+\.py)")


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every job or bench command in a page's code, continuation lines joined,
    comments and what follows a shell `&&`, `|` or `;` cut off."""
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            for match in START.finditer(line):
                command = " ".join(re.split(r"\s#|&&|\||;|`", line[match.start():])[0].split())
                if not re.match(r"python (-m )?(jobs|bench)[./][A-Z]+\b", command):  # not python jobs/NAME.py
                    found.append((page.name, command))
    return sorted(set(found))


# Runs each invocation (argv after "python") with --help as `python` would: a module by -m, else a script
# by its path; prints {invocation: [exit code, what it printed]} as JSON.
HELP_ALL = """
import contextlib, io, json, runpy, sys
texts = {}
for words in json.loads(sys.argv[1]):
    out = io.StringIO()
    target, *args = words[1:] if words[0] == "-m" else words
    sys.argv = [target, *args, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            (runpy.run_module(target, run_name="__main__", alter_sys=True) if words[0] == "-m"
             else runpy.run_path(target, run_name="__main__"))
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    texts[" ".join(words)] = [code, out.getvalue()]
print(json.dumps(texts))
"""


@functools.cache
def help_texts() -> dict[str, list]:
    """Every documented invocation's exit code and --help text, from one interpreter."""
    invocations = sorted({tuple(invocation(command)) for _, command in documented_commands()})
    done = subprocess.run([sys.executable, "-c", HELP_ALL, json.dumps(invocations)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def invocation(command: str) -> list[str]:
    """The words after "python" up to the first option: the script or module and its subcommands."""
    words = shlex.split(command.replace("...", ""))[1:]
    first_option = next((k for k, w in enumerate(words) if w.startswith("-") and w != "-m"), len(words))
    return words[:max(first_option, 2) if words[0] == "-m" else first_option]


# Past runs' commands, quoted with the options of their time beside the figures they made; the page
# says which options replaced them. Their scripts still start; their options are not checked.
HISTORICAL = {
    "python bench/scaling.py --nodes 2 4 8 --labeler-gpus 1",
    "python bench/gpu.py --small --compile both --stages unet,generate --batch-sizes 1 --repeats 1",
    "python bench/gpu.py --stages unet,vae,maskrcnn,generate --batch-sizes 1 --compile off --repeats 1 "
    "--ddim-steps 2 --dpm-steps 1 --out rates-cpu.json",
}


@pytest.mark.parametrize("page, command", documented_commands())
def test_a_documented_command_starts_and_names_only_its_options(page, command):
    words = shlex.split(command.replace("...", ""))[1:]
    start = invocation(command)  # subcommands and positionals before the options
    code, usage = help_texts()[" ".join(start)]
    assert code == 0, f"{page}: {' '.join(start)} --help: {usage[-1500:]}"
    for word in words[len(start):] if command not in HISTORICAL else []:
        option = word.split("=")[0]
        if option.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", usage), f"{page}: {command}: no {option}"


def test_the_docs_show_commands():
    assert len(documented_commands()) > 40
