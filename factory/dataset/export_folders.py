"""The plain export: ``images/<id>.<ext>``, ``masks/<id>.png`` index maps and ``classes.txt``."""

from __future__ import annotations

from factory.dataset.export_target import Target, class_names, image_suffix
from factory.dataset.source import DatasetSource


class FoldersExport:
    """images/<id>.<ext>, masks/<id>.png (the label maps) and classes.txt (line i: index i)."""

    def __init__(self, source: DatasetSource, target: Target):
        self.source, self.target = source, target

    def add(self, row: dict, split: str) -> None:
        self.target.put(f"images/{row['sample_id']}{image_suffix(self.source)}", row["image"]["bytes"])
        self.target.put(f"masks/{row['sample_id']}.png", row["label"]["bytes"])

    def finish(self, val_fraction: float) -> int:
        self.target.put("classes.txt", "".join(f"{name}\n" for name in class_names(self.source)).encode())
        return 0
