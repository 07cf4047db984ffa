"""The layers of the code base import one way (factory/__init__.py): a test over every import
statement of the library, the jobs and the benches, including imports inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = {  # package -> rank; a module imports only packages of a lower rank, or its own package
    "factory.core": 0,
    "factory.diffusion": 1, "factory.dataset": 1, "factory.detection": 1,
    "grounding": 2, "segmenter": 2,
    "world": 2,  # the mini world's drawings and the training of its models: a peer of the two methods
    "factory.pipeline": 3,
    "jobs": 4, "bench": 4,
}


def layer(module: str) -> str | None:
    """The layer package a dotted module name belongs to (None: not ours)."""
    matches = [package for package in LAYERS if module == package or module.startswith(package + ".")]
    return max(matches, key=len, default=None)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from factory.pipeline import labelers` imports the module factory.pipeline.labelers
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importing layer, imported layer) of every import between two layers."""
    out = []
    for folder in ("factory", "grounding", "segmenter", "world", "jobs", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            source = layer(module)
            for line, imported in imports(path):
                target = layer(imported)
                if target is not None and target != source:
                    out.append((str(path.relative_to(REPO)), line, source, target))
    return out


def test_every_module_is_in_a_layer():
    for folder in ("factory", "grounding", "segmenter", "world", "jobs", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            assert layer(module) or module == "factory.__init__", f"{module} is in no layer"


def test_imports_point_one_way():
    wrong = [f"{file}:{line}: {source} imports {target}" for file, line, source, target in edges()
             if source is not None and LAYERS[target] >= LAYERS[source]]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_edge(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from factory.pipeline import pipeline\n")
    assert imports(bad) == [(2, "factory.pipeline.pipeline")]
    assert layer("factory.pipeline.pipeline") == "factory.pipeline" and LAYERS["factory.pipeline"] > LAYERS["grounding"]
    assert layer("factory.dataset.source") == "factory.dataset" and layer("numpy") is None


def loaded_after(statement: str) -> set[str]:
    """Modules in sys.modules after running `statement` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.slow  # fresh interpreters importing the stacks: seconds each
@pytest.mark.parametrize("statement,absent", [
    # --help and every check before a model: no torch, no model library, no trainer
    ("import jobs.build_dataset", {"torch", "diffusers", "transformers", "torchvision", "ray.train", "grounding.train"}),
    ("import jobs.export_dataset, jobs.inspect_dataset, jobs.verify_dataset, jobs.derive_pairs",
     {"torch", "ray.train"}),
    # annotating or evaluating never loads a trainer
    ("import jobs.eval_grounding, jobs.eval_zs3, factory.pipeline.annotate",
     {"ray.train", "grounding.train", "segmenter.train"}),
])
def test_light_imports(statement, absent):
    assert not absent & loaded_after(statement)


def test_the_registries_are_imports_the_walk_sees():
    """Labelers and model stages are plug-ins registered by import, so the walk above checks their edges."""
    from factory.pipeline import stages
    from factory.pipeline.labelers import DAAM_MAPS, GROUNDING, LABELERS, MASKS

    registry = {module for _, module in imports(REPO / "factory/pipeline/labelers/__init__.py")}
    labelers = (*LABELERS.values(), GROUNDING, DAAM_MAPS, MASKS)
    assert {f"{type(labeler).__module__}.{type(labeler).__name__}" for labeler in labelers} <= registry
    imported = {module for _, module in imports(REPO / "factory/pipeline/stages.py")}
    loaders = (stages.generate_stage, stages.label_stage, stages.annotate_stage, stages.image_stage,
               stages.agreement_stage, stages.quality_stage)
    assert {f"{stage.__module__}.{stage.__name__}" for stage in map(stages.resolve_stage, loaders)} <= imported
