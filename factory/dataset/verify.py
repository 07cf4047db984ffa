"""Check a finished dataset against its manifest (``jobs/verify_dataset.py``).

Checks that every Parquet file the manifest lists is there with its recorded size,
sha256 and row count, and no other; that each file holds the ids of its commit record;
that sample ids are unique across files; that each plan entry (the plan rebuilt from the
manifest's recipe) has exactly the attempts its outcomes call for: its first samples up to
the first one written, each before it recorded as dropped, or all its attempts dropped
("given up"); that the counts add up; that every image, label map and class mask decodes at the recorded size;
that a set of real images holds each source image once, in the row its plan gives it; and that the dataset card
(README.md) is there.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict

from factory.core.errors import FactoryError
from factory.core.options import positional
from factory.core.storage import Location, StorageError, first_line
from factory.dataset.layout import CARD_FILE, DATA_DIR
from factory.dataset.source import DatasetError, DatasetSource, Replan
from factory.dataset.write import Commit, read_commits


class VerifyOptions(BaseModel):
    """The options of ``jobs/verify_dataset.py``."""
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = positional(description="the dataset: a local folder or s3://bucket/prefix")


SHOWN = 5  # ids named per problem; the rest are counted
COLUMNS = ["sample_id", "classes", "image", "label", "masks", "width", "height"]


def some(ids, what: str) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return f"{len(ids)} {what}: {', '.join(ids[:SHOWN])}{more}"


class Verifier:
    """Collects what was checked and every problem found, file by file."""

    def __init__(self, uri: str, replan: Replan):
        self.uri, self.replan = uri, replan
        self.checked: list[str] = []
        self.problems: list[str] = []
        self.decoded: Counter[str] = Counter()
        self.sources: dict[str, str] = {}  # sample id -> source image, of a set of real images

    def report(self) -> str:
        lines = [f"verify_dataset: {self.uri}", *(f"  {line}" for line in self.checked)]
        if not self.problems:
            return "\n".join([*lines, "OK"])
        return "\n".join([*lines, f"FAILED: {len(self.problems)} problem(s)", *(f"  {p}" for p in self.problems)])

    def run(self) -> bool:
        try:
            source = DatasetSource.open(self.uri, allow_empty=True)
            self.dataset(source.location, source.manifest)
        except DatasetError as exc:  # no manifest: the build has not finished
            self.problems.append(f"{exc}; run the same build command again to resume it")
        except (StorageError, OSError) as exc:
            self.problems.append(f"cannot read {self.uri}: {first_line(exc)}")
        except (ValueError, KeyError, TypeError) as exc:  # JSON that is no manifest or commit record of ours
            self.problems.append(f"unreadable manifest or commit record: {type(exc).__name__}: {first_line(exc)}")
        return not self.problems

    def dataset(self, location: Location, manifest: dict) -> None:
        planned = self.planned_samples(manifest)
        commits = read_commits(location)
        committed = {c.file: c for c in commits if c.file}
        entries = {entry["path"]: entry for entry in manifest["files"]}
        present = set(location.list(DATA_DIR, ".parquet"))
        for path in sorted(entries.keys() - present):
            self.problems.append(f"{path}: missing")
        for path in sorted(present - entries.keys()):
            self.problems.append(f"{path}: not in the manifest (left by an unfinished run?), yet readers of "
                                 f"{DATA_DIR}/ see its rows")
        for path in sorted(entries.keys() ^ committed.keys()):
            has = "a commit record but no manifest entry" if path in committed else "no commit record"
            self.problems.append(f"{path}: has {has}")

        ids: Counter[str] = Counter()
        for path in sorted(entries.keys() & present):
            ids.update(self.parquet_file(location, entries[path], committed.get(path), manifest))
        duplicated = [i for i, n in ids.items() if n > 1]
        if duplicated:
            self.problems.append(some(duplicated, "sample ids in more than one row"))
        if self.sources:
            self.source_images(planned)
        dropped = {i: reason for c in commits for i, reason in c.dropped.items()}
        written = set(ids)
        plan_entries, given_up = manifest["counts"]["planned"], manifest["counts"]["given_up"]
        if planned is not None:
            plan_entries, given_up = self.attempts(planned, written, dropped)
        if written & dropped.keys():
            self.problems.append(some(written & dropped.keys(), "ids both written and recorded as dropped"))
        if not location.exists(CARD_FILE):
            self.problems.append(f"no {CARD_FILE} (the dataset card): run the same build command again to write it")
        reasons = dict(Counter(dropped.values()))
        found = {"planned": plan_entries, "attempted": len(written | dropped.keys()), "written": sum(ids.values()),
                 "dropped": reasons, "given_up": given_up}
        if manifest["counts"] != found:
            self.problems.append(f"manifest counts {json.dumps(manifest['counts'], sort_keys=True)} differ from "
                                 f"the files and commit records: {json.dumps(found, sort_keys=True)}")

        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
        self.checked += [
            f"dataset   {manifest['name']}: {found['planned']} planned, {found['written']} written, dropped: {drops}, "
            f"given up: {found['given_up']}",
            f"files     {len(present)} Parquet files, {len(entries)} in the manifest, {len(commits)} commit records",
            f"samples   {sum(ids.values())} rows, {len(written)} distinct ids",
            *([f"sources   {len(set(self.sources.values()))} distinct source images"] if self.sources else []),
            f"decoded   {self.decoded['image']} images, {self.decoded['label']} label maps, "
            f"{self.decoded['mask']} masks",
        ]

    def planned_samples(self, manifest: dict) -> Sequence | None:
        """Every sample the plan may make, rebuilt from the manifest's recipe; None (and a problem)
        when it cannot be."""
        try:
            return self.replan(manifest)
        except FactoryError as exc:
            self.problems.append(str(exc))
            return None

    def source_images(self, planned: Sequence | None) -> None:
        """Each source image in one row, the row its plan gives it (a real image's sample id comes
        from the image, so an image planned anew under another id would be labelled twice)."""
        shown = Counter(self.sources.values())
        twice = [ref for ref, n in shown.items() if n > 1]
        if twice:
            self.problems.append(some(twice, "source images in more than one row"))
        if planned is not None:
            meant = {sample.sample_id: sample.source_image for sample in planned}
            other = [i for i, ref in self.sources.items() if i in meant and meant[i] != ref]
            if other:
                self.problems.append(some(other, "ids whose row holds another source image than the plan's"))

    def attempts(self, planned: Sequence, written: set[str], dropped: dict[str, str]) -> tuple[int, int]:
        """Checks each plan entry's samples against its outcomes; returns (entries, given up)."""
        possible = {sample.sample_id for sample in planned}
        for wrong, what in ((written - possible, "written ids outside the plan"),
                            (dropped.keys() - possible, "dropped ids outside the plan")):
            if wrong:
                self.problems.append(some(wrong, what))
        entries: dict[int, list] = {}
        for sample in sorted(planned, key=lambda sample: sample.attempt):
            entries.setdefault(sample.index, []).append(sample.sample_id)
        missing, extra, given_up = [], [], 0
        for ids in entries.values():
            # Walk the attempts as the build made them: on past each dropped one, to the first written.
            due = next((k for k, i in enumerate(ids) if i not in dropped), None)
            if due is None:
                given_up += 1
                continue
            if ids[due] not in written:
                missing.append(ids[due])
            extra += [i for i in ids[due + 1:] if i in written or i in dropped]
        for wrong, what in ((missing, "planned ids neither written nor dropped"),
                            (extra, "ids of attempts made after their entry's sample was kept or missing")):
            if wrong:
                self.problems.append(some(wrong, what))
        return len(entries), given_up

    def parquet_file(self, location: Location, entry: dict, commit: Commit | None, manifest: dict) -> list[str]:
        """Size, checksum, rows, ids and images of one file; returns its sample ids."""
        path = entry["path"]
        data = location.read_bytes(path)
        if len(data) != entry["bytes"]:
            self.problems.append(f"{path}: {len(data)} bytes, the manifest says {entry['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            self.problems.append(f"{path}: sha256 {digest[:12]}... differs from the manifest's "
                                 f"{entry['sha256'][:12]}...")
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            table = parquet.read(columns=COLUMNS + [c for c in ("source_image",) if c in parquet.schema_arrow.names])
        except (pa.ArrowException, OSError) as exc:
            self.problems.append(f"{path}: not a readable Parquet file of samples: {first_line(exc)}")
            return []
        if table.num_rows != entry["rows"]:
            self.problems.append(f"{path}: {table.num_rows} rows, the manifest says {entry['rows']}")
        ids = table.column("sample_id").to_pylist()
        if "source_image" in table.column_names:
            self.sources.update(zip(ids, table.column("source_image").to_pylist()))
        if commit is not None and sorted(ids) != sorted(commit.written):
            self.problems.append(f"{path}: its ids differ from its commit record's "
                                 f"({len(ids)} rows, {len(commit.written)} ids recorded)")
        image_format = "JPEG" if manifest["recipe"]["writer"]["image_format"] == "jpeg" else "PNG"
        for row in table.to_pylist():
            size, sample = (row["width"], row["height"]), f"{path}: sample {row['sample_id']}"
            self.image("image", row["image"], f"{sample} image", image_format, None, size)
            self.image("label", row["label"], f"{sample} label", "PNG", "P", size)
            if len(row["masks"]) != len(row["classes"]):
                self.problems.append(f"{sample}: {len(row['masks'])} masks for {len(row['classes'])} classes")
            for k, mask in enumerate(row["masks"]):
                self.image("mask", mask, f"{sample} mask {k}", "PNG", "1", size)
        return ids

    def image(self, kind: str, struct: dict, what: str, image_format: str, mode: str | None,
              size: tuple[int, int]) -> None:
        """Decodes every pixel, and checks format, size and (for labels and masks) mode."""
        try:
            with Image.open(io.BytesIO(struct["bytes"] or b"")) as image:
                image.load()
                found = image.format, image.size, image.mode
        except Exception as exc:  # noqa: BLE001 - PIL reports corrupt data with many exception types
            self.problems.append(f"{what} does not decode: {first_line(exc)}")
            return
        if found[0] != image_format or found[1] != size or (mode and found[2] != mode):
            expected = f"{image_format} {size[0]}x{size[1]}" + (f" mode {mode}" if mode else "")
            self.problems.append(f"{what} is {found[0]} {found[1][0]}x{found[1][1]} mode {found[2]}, "
                                 f"expected {expected}")
            return
        self.decoded[kind] += 1
