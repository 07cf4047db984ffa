"""Vocabulary files: a user-defined vocabulary read from YAML or TSV, local or s3://, into its
definition (``factory.core.vocab.define_vocabulary``), an error naming the file and its line."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

import yaml

from factory.core.storage import first_line, open_location, split_file_uri
from factory.core.vocab import DEFINITION_SUFFIXES, Vocabulary, VocabularyError, define_vocabulary, get_vocabulary


def read_vocabulary(name_or_file: str) -> Vocabulary:
    """A built-in vocabulary by name, or a vocabulary file by path (local or s3://)."""
    if not name_or_file.endswith(DEFINITION_SUFFIXES):
        return get_vocabulary(name_or_file)
    folder, file_name = split_file_uri(name_or_file)
    try:
        data = open_location(folder).read_bytes(file_name)
    except OSError as exc:
        raise ValueError(f"cannot read the vocabulary file {name_or_file}: {str(exc).splitlines()[0]}") from None
    return define_vocabulary(read_vocabulary_file(name_or_file, data))


def read_vocabulary_file(name: str, data: bytes) -> dict[str, Any]:
    """A vocabulary file's definition, checked: YAML (the layout of ``Vocabulary.definition``, most
    keys optional) or TSV (a header naming the columns name, natural, synonyms, index, detector,
    unseen; list cells comma-separated; the vocabulary is named after the file; lines before the
    header that start with # are comments, and `# detector: shapes` names the detector's classes).
    An error is one line naming the file, and the line where it has one."""
    text = data.decode()
    definition, line_of = _read_tsv(name, text) if name.endswith(".tsv") else _read_yaml(name, text)
    try:
        define_vocabulary(definition)
    except VocabularyError as exc:
        line = line_of(exc.at)
        raise VocabularyError(f"{name}:{line}: {exc}" if line else f"{name}: {exc}") from None
    return definition


def _read_tsv(name: str, text: str) -> tuple[dict[str, Any], Callable[[tuple], int | None]]:
    lines = text.splitlines()
    definition: dict[str, Any] = {"name": Path(name).stem}
    comments = 0
    while comments < len(lines) and lines[comments].startswith("#"):
        key, colon, value = lines[comments].lstrip("# ").partition(":")
        if colon and key.strip() == "detector":
            definition["detector"] = value.strip()
        comments += 1
    reader = csv.DictReader(io.StringIO("\n".join(lines[comments:])), delimiter="\t")
    unknown = sorted(set(reader.fieldnames or []) - {"name", "natural", "synonyms", "index", "detector", "unseen"})
    if unknown:
        raise VocabularyError(f"{name}:{comments + 1}: unknown columns {unknown} (name, natural, synonyms, index, "
                              f"detector, unseen)")
    classes, rows, unseen = [], [], {}
    for row in reader:
        line = comments + reader.line_num
        if None in row:
            raise VocabularyError(f"{name}:{line}: more cells than the header's {len(reader.fieldnames)} columns "
                                  f"(cells are separated by tabs)")
        entry = {key: value.strip() for key, value in row.items() if value and value.strip()}
        for field in ("synonyms", "unseen"):
            entry[field] = [v.strip() for v in entry.get(field, "").split(",") if v.strip()]
        for split in entry.pop("unseen"):
            if not split.isdigit() or int(split) < 1:
                raise VocabularyError(f"{name}:{line}: unseen split {split!r} of class {entry.get('name')} is not "
                                      f"1, 2, ...")
            unseen.setdefault(int(split), []).append(entry.get("name"))
        if "index" in entry:
            entry["index"] = int(entry["index"]) if entry["index"].isdigit() else entry["index"]
        classes.append(entry)
        rows.append(line)
    definition.update(classes=classes, unseen=[unseen.get(k, []) for k in range(1, max(unseen, default=0) + 1)])

    def line_of(at: tuple) -> int | None:  # a class's row; the splits are the rows' unseen cells
        return rows[at[1]] if at[:1] == ("classes",) and len(at) > 1 and at[1] < len(rows) else None

    return definition, line_of


def _read_yaml(name: str, text: str) -> tuple[dict[str, Any], Callable[[tuple], int | None]]:
    try:
        definition = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise VocabularyError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or first_line(exc)}") from None
    if not isinstance(definition, dict):
        raise VocabularyError(f"{name}: a vocabulary file is a mapping with name and classes")

    def line_of(at: tuple) -> int | None:
        """The line of the deepest node on the path ``at`` (keys and list positions)."""
        node, line = yaml.compose(text), None
        for step in at:
            if isinstance(node, yaml.MappingNode):
                found = [(key, value) for key, value in node.value if key.value == step]
                node = found[0][1] if found else None
                line = found[0][0].start_mark.line + 1 if found else line
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                node = node.value[step]
                line = node.start_mark.line + 1
            else:
                break
        return line

    return definition, line_of
