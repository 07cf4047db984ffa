"""Every job and bench command the README and the docs show a user starts as written (the script
or module found, imported and parsed: `--help` appended), and every option it names is one that
command has. Commands that build, train or evaluate at full size are run by their own tests; this
keeps the docs from naming a flag, a script or a module form that no longer exists."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one fresh interpreter per documented command form: about a minute

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


@functools.cache
def help_text(invocation: tuple[str, ...]) -> str:
    done = subprocess.run([sys.executable, *invocation, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{' '.join(invocation)} --help: {done.stderr[-1500:]}"
    return done.stdout


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
    first_option = next((k for k, w in enumerate(words) if w.startswith("-") and w != "-m"), len(words))
    if words[0] == "-m":
        first_option = max(first_option, 2)
    usage = help_text(tuple(words[:first_option]))  # subcommands and positionals before the options
    for word in words[first_option:] if command not in HISTORICAL else []:
        option = word.split("=")[0]
        if option.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", usage), f"{page}: {command}: no {option}"


def test_the_docs_show_commands():
    assert len(documented_commands()) > 40
