import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.core.storage import open_location
from factory.dataset.codec import PALETTE, decode_png, encode_image, encode_label, encode_mask, voc_palette
from factory.dataset.layout import COMMIT_DIR, DATA_DIR
from factory.dataset.schema import SCHEMA, huggingface_metadata
from factory.dataset.write import Commit, encode_batch, part_name, read_commits, write_part

EXTRA = ["capture_shapes", "drop_reason", "generate_seconds", "label_seconds", "encode_seconds"]
CLASS_INDICES = {"dog": 12, "cat": 8, "bus": 6}


def rng_image(seed=0, size=(16, 24)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


# --------------------------------------------------------------------- encoding

def test_encode_image_png_is_lossless():
    image = rng_image()
    data = encode_image(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_png(data), image)


def test_encode_image_jpeg():
    image = np.full((16, 24, 3), 120, np.uint8)
    image[:, 12:] = 200
    data = encode_image(image, "jpeg", quality=90)
    assert data[:2] == b"\xff\xd8"
    decoded = np.array(Image.open(io.BytesIO(data)))
    assert decoded.shape == (16, 24, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image).mean() < 8  # lossy, but close
    assert len(encode_image(rng_image(), "jpeg", quality=10)) < len(encode_image(rng_image(), "jpeg", quality=95))


def test_encode_label_is_a_palette_png_of_indices():
    label = np.zeros((10, 12), np.uint8)
    label[2:5, 3:7] = 12
    label[6:, :4] = 8
    label[0, :] = 255
    data = encode_label(label)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P"
        assert image.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        indices = np.array(image)
    assert indices.dtype == np.uint8 and indices.shape == (10, 12)
    assert np.array_equal(indices, label)  # indices, not colours
    assert np.array_equal(decode_png(data), label)
    # Every value survives.
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(decode_png(encode_label(every)), every)


def test_encode_mask_round_trip():
    mask = np.random.default_rng(1).random((9, 13)) > 0.5
    data = encode_mask(mask)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "1"
    assert np.array_equal(decode_png(data).astype(bool), mask)
    assert np.array_equal(decode_png(encode_mask(mask.astype(np.uint8))).astype(bool), mask)


def test_voc_palette():
    assert PALETTE == voc_palette() and len(PALETTE) == 768
    colours = np.array(PALETTE).reshape(256, 3)
    assert tuple(colours[0]) == (0, 0, 0)
    assert tuple(colours[1]) == (128, 0, 0)  # aeroplane
    assert tuple(colours[2]) == (0, 128, 0)
    assert tuple(colours[3]) == (128, 128, 0)
    assert tuple(colours[8]) == (64, 0, 0)  # cat
    assert tuple(colours[12]) == (64, 0, 128)  # dog
    assert tuple(colours[15]) == (192, 128, 128)  # person
    assert tuple(colours[255]) == (224, 224, 192)  # void


# ------------------------------------------------------------------ encode_batch

def object_array(values):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def make_batch(n=3, size=8, drop=None):
    """A batch as LabelStage hands it on."""
    rng = np.random.default_rng(n)
    classes = [["dog"], ["cat", "dog"], ["bus"], ["dog", "bus"]] * n
    classes = classes[:n]
    labels = np.zeros((n, size, size), np.uint8)
    bits = np.zeros((n, size, size), np.uint8)
    for i, names in enumerate(classes):
        for k, name in enumerate(names):
            labels[i, k:k + 2, :] = CLASS_INDICES[name]
            bits[i, k:k + 2, :] |= 1 << k
        labels[i, -1, -1] = 255
    return {
        "sample_id": np.array([f"{i:07d}-0123abcd" for i in range(n)], dtype=object),
        "index": np.arange(n, dtype=np.int64),
        "classes": object_array(classes),
        "class_words": object_array([[name.upper() for name in c] for c in classes]),
        "prompt": np.array([f"a photograph of a {' and a '.join(c)}" for c in classes], dtype=object),
        "seed": np.arange(n, dtype=np.int64) * 1_000_003 + 2**62,
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "generate_seconds": np.full(n, 0.5),
        "label": labels,
        "class_bits": bits,
        "scores": object_array([np.linspace(0.9, 0.6, len(c)).astype(np.float32) for c in classes]),
        "instances": object_array([np.ones(len(c), np.int16) for c in classes]),
        "found": object_array([np.ones(len(c), bool) for c in classes]),
        "drop_reason": np.array(drop or [""] * n, dtype=object),
        "label_seconds": np.full(n, 0.25),
    }


def encode(batch, image_format="png"):
    return encode_batch(batch, image_format=image_format, jpeg_quality=95, class_indices=CLASS_INDICES,
                        generator="tiny", labeler="tiny")


def test_encode_batch_table():
    batch = make_batch(4)
    table = encode(batch)
    assert isinstance(table, pa.Table) and table.num_rows == 4
    assert table.column_names == SCHEMA.names + EXTRA
    assert table.select(SCHEMA.names).schema.equals(SCHEMA)
    rows = table.to_pylist()
    row = rows[1]
    assert row["sample_id"] == "0000001-0123abcd" and row["index"] == 1
    assert row["classes"] == ["cat", "dog"] and row["class_words"] == ["CAT", "DOG"]
    assert row["class_indices"] == [8, 12]
    assert row["prompt"] == "a photograph of a cat and a dog"
    assert row["seed"] == 1_000_003 + 2**62
    assert (row["width"], row["height"]) == (8, 8)
    assert row["generator"] == "tiny" and row["labeler"] == "tiny"
    assert row["scores"] == pytest.approx([0.9, 0.6]) and row["instances"] == [1, 1]
    assert row["found"] == [True, True]
    assert row["drop_reason"] == "" and row["generate_seconds"] == 0.5 and row["label_seconds"] == 0.25
    assert row["encode_seconds"] >= 0
    for i, row in enumerate(rows):
        assert np.array_equal(decode_png(row["image"]["bytes"]), batch["image"][i])
        assert row["image"]["path"] is None
        assert np.array_equal(decode_png(row["label"]["bytes"]), batch["label"][i])
        assert len(row["masks"]) == len(row["classes"])
        for k, mask in enumerate(row["masks"]):
            expected = ((batch["class_bits"][i] >> k) & 1).astype(bool)
            assert np.array_equal(decode_png(mask["bytes"]).astype(bool), expected)


def test_encode_batch_jpeg():
    table = encode(make_batch(2), image_format="jpeg")
    data = table.column("image")[0].as_py()["bytes"]
    assert data[:2] == b"\xff\xd8"
    # Labels stay lossless whatever the image format.
    assert table.column("label")[0].as_py()["bytes"][:4] == b"\x89PNG"


# -------------------------------------------------------------------- write_part

def commits_in(out):
    return read_commits(open_location(str(out)))


def test_write_part(tmp_path):
    out = tmp_path / "dataset"
    batch = make_batch(4, drop=["", "class_not_found", "", ""])
    table = encode(batch)
    metadata = {b"dataset-factory": b'{"recipe": "test"}'}
    result = write_part(table, out=str(out), metadata=metadata)

    ids = list(batch["sample_id"])
    name = part_name(ids)
    parquet = out / DATA_DIR / f"{name}.parquet"
    commit_file = out / COMMIT_DIR / f"{name}.json"
    assert sorted(p.name for p in (out / DATA_DIR).iterdir()) == [parquet.name]
    assert sorted(p.name for p in (out / COMMIT_DIR).iterdir()) == [commit_file.name]

    commit = json.loads(commit_file.read_bytes())
    data = parquet.read_bytes()
    assert commit["name"] == name
    assert commit["file"] == f"{DATA_DIR}/{name}.parquet"
    assert commit["bytes"] == len(data)
    assert commit["sha256"] == hashlib.sha256(data).hexdigest()
    assert commit["rows"] == 3
    assert commit["written"] == [ids[0], ids[2], ids[3]]
    assert commit["dropped"] == {ids[1]: "class_not_found"}
    assert commit["seconds"]["generate"] == pytest.approx(2.0)
    assert commit["seconds"]["label"] == pytest.approx(1.0)
    assert set(commit["seconds"]) == {"generate", "label", "encode", "write"}

    # The returned row is the commit.
    assert result.column_names == ["commit"] and result.num_rows == 1
    assert Commit.from_json(result.column("commit")[0].as_py().encode()) == Commit(**commit)

    stored = pq.read_table(parquet)
    assert stored.column_names == SCHEMA.names  # bookkeeping columns are not stored
    assert stored.column("sample_id").to_pylist() == [ids[0], ids[2], ids[3]]
    assert stored.schema.metadata == {**metadata, **huggingface_metadata(SCHEMA)}  # the caller's and `datasets`'
    assert pq.read_schema(parquet).metadata[b"dataset-factory"] == b'{"recipe": "test"}'
    assert stored.schema.remove_metadata().equals(SCHEMA)
    row = stored.to_pylist()[1]
    assert np.array_equal(decode_png(row["image"]["bytes"]), batch["image"][2])


def test_per_class_columns_are_summed_into_the_commit_under_its_own_name(tmp_path):
    """Presence scores and label agreement, one value per class, go into the commit record per class,
    dropped samples too; the record keeps the part's name (a class's name would hide it from a resume)."""
    batch = make_batch(3, drop=["", "class_not_found", ""])
    batch["presence"] = object_array([np.full(len(c), 0.25 * (i + 1), np.float32)
                                      for i, c in enumerate(batch["classes"])])
    batch["agreement"] = object_array([np.full(len(c), 0.5, np.float32) for c in batch["classes"]])
    write_part(encode(batch), out=str(tmp_path))
    name = part_name(list(batch["sample_id"]))
    assert [p.name for p in (tmp_path / COMMIT_DIR).iterdir()] == [f"{name}.json"]
    (commit,) = commits_in(tmp_path)
    assert commit.presence == {"dog": [0.25, 0.5], "cat": [0.5], "bus": [0.75]}
    assert commit.agreement == {"dog": [0.5, 0.5], "cat": [0.5], "bus": [0.5]}


def test_write_part_without_metadata(tmp_path):
    write_part(encode(make_batch(2)), out=str(tmp_path))
    (parquet,) = (tmp_path / DATA_DIR).iterdir()
    assert pq.read_schema(parquet).metadata == huggingface_metadata(SCHEMA)  # only the Hugging Face features
    assert pq.read_table(parquet).num_rows == 2


def test_all_dropped_batch_writes_only_a_commit(tmp_path):
    batch = make_batch(2, drop=["class_not_found", "class_not_found"])
    write_part(encode(batch), out=str(tmp_path))
    assert not (tmp_path / DATA_DIR).exists() or not list((tmp_path / DATA_DIR).iterdir())
    (commit,) = commits_in(tmp_path)
    assert commit.file is None and commit.sha256 is None
    assert commit.rows == 0 and commit.bytes == 0 and commit.written == []
    assert commit.dropped == {i: "class_not_found" for i in batch["sample_id"]}


def test_writing_twice_is_retry_safe(tmp_path):
    table = encode(make_batch(3))
    first = write_part(table, out=str(tmp_path)).column("commit")[0].as_py()
    second = write_part(table, out=str(tmp_path)).column("commit")[0].as_py()
    c1, c2 = Commit.from_json(first.encode()), Commit.from_json(second.encode())
    assert c1.name == c2.name and c1.file == c2.file and c1.sha256 == c2.sha256
    assert len(list((tmp_path / DATA_DIR).iterdir())) == 1
    assert len(list((tmp_path / COMMIT_DIR).iterdir())) == 1
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries left behind
    (commit,) = commits_in(tmp_path)
    assert commit.written == c1.written and commit.sha256 == c1.sha256


def test_part_name_depends_on_the_ids_only():
    ids = ["0000001-aa", "0000000-bb", "0000002-cc"]
    assert part_name(ids) == part_name(sorted(ids))
    assert part_name(ids) != part_name(ids[:2])
    assert part_name(ids).startswith("part-") and len(part_name(ids)) == len("part-") + 20


def test_read_commits(tmp_path):
    assert commits_in(tmp_path / "empty") == []
    first, second = make_batch(2), make_batch(3)
    second["sample_id"] = np.array([f"{i:07d}-fedc4321" for i in range(3)], dtype=object)
    second["drop_reason"][0] = "class_not_found"
    write_part(encode(first), out=str(tmp_path))
    write_part(encode(second), out=str(tmp_path))
    commits = commits_in(tmp_path)
    assert sorted(c.name for c in commits) == sorted([part_name(list(first["sample_id"])),
                                                      part_name(list(second["sample_id"]))])
    assert all(isinstance(c, Commit) for c in commits)
    assert sorted(i for c in commits for i in c.written) == sorted(
        list(first["sample_id"]) + list(second["sample_id"][1:]))
    assert [reason for c in commits for reason in c.dropped.values()] == ["class_not_found"]
    for c in commits:
        data = (tmp_path / c.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == c.sha256 and len(data) == c.bytes
