"""The README routes and the docs site holds: the README stays short and keeps the quick start,
its links land, every page is in the site's nav, and no text a user reads (README, docs, recipes,
`--help`, dataset cards) cites an issue number or a file name of the papers instead of the papers
by authors, year and section. `mkdocs build --strict` (.ci/run) checks the site's own links and
anchors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250

# The quick start's two commands, exactly as a new user copies them (CI runs the second one).
QUICK_START = ['pip install -e ".[test]" && python jobs/build_dataset.py',
               'pip install -e ".[test]" && python -m pytest -n 2 --dist loadfile']

# "issue 13", "spec section 11", "(000, C.3)", "000's Table 3", "seeds/000": citations a reader cannot follow.
# A paper file's number stands alone (not in "1,000", "0.004" or an id) and is followed by what cites it.
UNFOLLOWABLE = re.compile(
    r"\bissues? #?\d+\b|\bspec(?:\.md)? section\b|seeds/\d{3}|"
    r"(?<![\w.,/-])00[0-4](?=[,;:')]|'s\b|\s+[A-C]\.\d|\s+(?:Table|Tab\.|section|Fig)|\.?$)",
    flags=re.IGNORECASE | re.MULTILINE)

# Where --help text and dataset-card text live: the library's packages and the entry points.
SOURCE_PACKAGES = ["factory", "grounding", "segmenter", "world", "jobs", "bench"]
HELP_KEYWORDS = {"help", "description", "epilog"}


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def strings(node: ast.AST) -> list[str]:
    """The literal text of a string expression (an f-string's constant parts)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp):
        return strings(node.left) + strings(node.right)
    return []


def user_facing_strings(path: Path) -> list[str]:
    """--help text (help=, description=, epilog= and the Field descriptions options turn into --help),
    the module docstring of an entry point (its --help description), and every string of a dataset-card
    module."""
    tree = ast.parse(path.read_text(), str(path))
    if "card" in path.stem:
        return [text for node in ast.walk(tree) for text in strings(node)]
    found = []
    if path.parts[len(REPO.parts)] in ("jobs", "bench") and (doc := ast.get_docstring(tree)):
        found.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in HELP_KEYWORDS:
            found += strings(node.value)
    return found


def test_readme_routes_in_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move content into docs/"


def test_readme_keeps_the_quick_start_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    for command in QUICK_START:
        assert f"{command}\n" in blocks, f"README's quick start lost `{command}`"


def test_readme_links_land():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        assert (REPO / target).exists(), f"README links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (REPO / target).read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"README links to {link}: no such heading"


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names a Python function for the mermaid fence: read the tag as its name.
    Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)  # noqa: S506


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = mkdocs_config()
    assert config["theme"]["name"] == "material" and config["docs_dir"] == "docs"
    listed = nav_pages(config["nav"])
    pages = [str(path.relative_to(DOCS)) for path in doc_pages()]
    assert sorted(listed) == sorted(pages)
    assert all(config["validation"][check] == "warn" for check in ("omitted_files", "unrecognized_links", "anchors"))


@pytest.mark.parametrize("path", [README, *doc_pages(), *sorted((REPO / "factory" / "recipes").rglob("*.y*ml"))],
                         ids=lambda path: str(path.relative_to(REPO)))
def test_pages_cite_papers_not_issues_or_paper_files(path):
    text = path.read_text()
    cited = [f"{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in UNFOLLOWABLE.finditer(text)]
    assert not cited, f"{path.relative_to(REPO)} cites what a reader cannot follow (cite authors, year, section): " \
        f"{cited}"


def test_help_and_cards_cite_papers_not_issues_or_paper_files():
    cited = []
    for package in SOURCE_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for text in user_facing_strings(path):
                cited += [f"{path.relative_to(REPO)}: {m.group(0)!r} in {text[:80]!r}"
                          for m in UNFOLLOWABLE.finditer(text)]
    assert not cited, "--help or card text cites what a reader cannot follow:\n" + "\n".join(cited)


@pytest.mark.parametrize("text", ["see issue 13", "issue #4 says", "(spec section 11)", "(000, C.3)", "000's Table 3",
                                  "as ODISE, 004)", "seeds/000 (B.1)", "000 C.3", "Table 3 of 000."])
def test_the_check_finds_unfollowable_citations(text):
    assert UNFOLLOWABLE.search(text)


@pytest.mark.parametrize("text", ["1,000 images", "0.004 s", "10,000 samples", "ray/issues/53727", "commit 4b3ae9e",
                                  "Li et al. 2023, supplementary material, C.3", "2026-12-07"])
def test_the_check_leaves_ordinary_text_alone(text):
    assert not UNFOLLOWABLE.search(text)


def test_ci_runs_the_quick_start_test_command_and_builds_the_site_strictly():
    ci = (REPO / ".ci" / "run").read_text()
    runs = re.findall(r"^python -m pytest (.*)$", ci, flags=re.M)
    # The README's test command, as CI runs it: whole, or as its two tiers (fast first).
    command = QUICK_START[1].split(" && ", 1)[1].removeprefix("python -m pytest ")
    assert runs and all(command in run for run in runs), runs
    assert len(runs) == 1 or ['-m "not slow"' in runs[0], "-m slow" in runs[-1]] == [True, True], runs
    assert re.search(r"^[^#\n]*mkdocs build --strict --site-dir \"\$scratch/", ci, flags=re.M)  # outside the repo


def test_the_generators_page_tries_a_family_as_it_shows(tmp_path, monkeypatch, capsys):
    """The page's Python saves a tiny random pipeline where its build command finds it, as that family (run
    with --estimate here: no Ray; tests/pipeline/test_generators.py builds each family)."""
    import shlex

    from jobs import build_dataset

    text = (DOCS / "generators.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    command = re.search(r"```bash\n(python jobs/build_dataset\.py .*?)\n```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})  # the page's own code
    assert build_dataset.main([*shlex.split(command)[2:], "--estimate", "--out", str(tmp_path / "out")]) == 0
    assert "generator SDXL (./tiny-sdxl)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
