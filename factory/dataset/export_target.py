"""Where an export is written, and what the files of every format share: the split names, the
image suffix, the class names.

A local export is written into a hidden sibling folder and renamed into place by ``commit`` (a
reader sees all of it or none); an S3 export uploads file by file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from factory.core.errors import FactoryError
from factory.core.storage import Location, StorageError, check_reachable, first_line
from factory.dataset.source import DatasetSource

SPLITS = ("train", "val")


class ExportError(FactoryError, RuntimeError):
    """A dataset or target that cannot be used as asked; the message is one line."""


def image_suffix(source: DatasetSource) -> str:
    return ".jpg" if source.manifest["recipe"]["writer"]["image_format"] == "jpeg" else ".png"


def class_names(source: DatasetSource) -> list[str]:
    """Name of each label index from 0 (background) to K."""
    return ["background", *source.vocabulary.names]


def _same_or_nested(a: Location, b: Location) -> bool:
    if type(a.fs) is not type(b.fs):
        return False
    return a.root == b.root or a.root.startswith(b.root + "/") or b.root.startswith(a.root + "/")


class Target:
    """Where an export goes. Local: a hidden sibling folder renamed into place by ``commit``."""

    def __init__(self, uri: str, *, overwrite: bool, source: Location):
        try:
            self.final = check_reachable(uri)  # a writable local parent, or a bucket that answers
            if _same_or_nested(self.final, source):
                raise ExportError(f"the export target {uri} overlaps the dataset {source.uri}")
            existing = self.final.fs.get_file_info(pafs.FileSelector(self.final.root, recursive=True,
                                                                     allow_not_found=True))
            self.replace = any(info.type == pafs.FileType.File for info in existing)
            if self.replace and not overwrite:
                raise ExportError(f"{uri} is not empty: pass --overwrite to replace it")
            self.local = isinstance(self.final.fs, pafs.LocalFileSystem)
            if self.local:
                final = Path(self.final.root)
                final.parent.mkdir(parents=True, exist_ok=True)
                self.staging = final.parent / f".{final.name}.export-{uuid.uuid4().hex[:8]}.tmp"
                self.staging.mkdir()
            elif self.replace:  # S3 has no rename: clear the prefix, then upload file by file
                self.final.fs.delete_dir_contents(self.final.root, missing_dir_ok=True)
        except (StorageError, OSError) as exc:
            raise ExportError(f"cannot use {uri}: {first_line(exc)}") from None
        self.files = 0
        self.bytes = 0

    def put(self, relative: str, data: bytes) -> None:
        if self.local:
            path = self.staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.final.write_bytes(relative, data)
        self.files += 1
        self.bytes += len(data)

    def commit(self) -> None:
        if not self.local:
            return
        final = Path(self.final.root)
        old = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}.tmp"
        if final.exists():
            os.replace(final, old)
        os.replace(self.staging, final)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.local:
            shutil.rmtree(self.staging, ignore_errors=True)
