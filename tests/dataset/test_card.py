"""The dataset card: its YAML header as `datasets` and the Hub read it, its sections, and the
build writing it beside the manifest (where jobs/verify_dataset.py expects it)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory.dataset.card import dataset_card
from factory.dataset.layout import CARD_FILE

REPO = Path(__file__).resolve().parents[2]


def header_and_body(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.fixture(scope="module")
def manifest(tiny_dataset) -> dict:
    return json.loads((tiny_dataset / "manifest.json").read_text())


@pytest.mark.slow
def test_build_writes_card_with_counts_features_and_versions(tiny_dataset, manifest):
    import datasets

    header, body = header_and_body((tiny_dataset / CARD_FILE).read_text())
    info = header["dataset_info"]
    written = sum(entry["rows"] for entry in manifest["files"])
    assert info["splits"] == [{"name": "train", "num_examples": written,
                               "num_bytes": sum(entry["bytes"] for entry in manifest["files"])}]
    # The features are the ones the Parquet files carry, in the Hub's YAML form.
    schema = pq.read_schema(tiny_dataset / manifest["files"][0]["path"])
    assert datasets.Features._from_yaml_list(info["features"]) == datasets.Features.from_arrow_schema(schema)
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    for package, version in manifest["versions"].items():
        assert f"| {package} | {version} |" in body
    recipe = manifest["recipe"]
    assert f"scoring at least {recipe['labeler']['score_threshold']}" in body
    assert f"DDIM {recipe['generator']['steps']} steps" in body and f"plan seed {recipe['seed']}" in body
    assert recipe["prompts"]["two"] in body and "## Limitations and biases" in body
    assert "](preview.png)" in body and (tiny_dataset / "preview.png").exists()


@pytest.mark.slow
def test_huggingface_loads_the_folder_through_the_card(tiny_dataset, manifest, tmp_path):
    """`load_dataset(folder)` takes its files and features from the card's header alone."""
    import datasets

    ds = datasets.load_dataset(str(tiny_dataset), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == manifest["counts"]["written"]
    assert isinstance(ds.features["label"], datasets.Image) and ds[0]["label"].mode == "P"


@pytest.mark.slow
def test_verify_dataset_expects_the_card(tiny_dataset, tmp_path, capsys):
    from jobs import verify_dataset

    assert verify_dataset.main([str(tiny_dataset)]) == 0, capsys.readouterr().out
    copy_ = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy_)
    (copy_ / CARD_FILE).unlink()
    assert verify_dataset.main([str(copy_)]) == 1
    assert "no README.md (the dataset card)" in capsys.readouterr().out


def fake_manifest(**recipe_changes) -> dict:
    """A manifest as build_manifest writes it, without building."""
    from factory.core.vocab import VOC
    from factory.pipeline.recipe import load_recipe

    recipe = load_recipe("tiny").model_dump(mode="json")
    for section, values in recipe_changes.items():
        recipe[section].update(values)
    return {"name": "fake", "created": "2026-01-01T00:00:00+00:00", "recipe": recipe, "content_key": "k",
            "plan": {"samples": 1500, "digest": "d"},
            "vocabulary": {"name": "voc", "classes": [{"index": c.index, "name": c.name, "natural": c.natural}
                                                     for c in VOC.classes]},
            "models": {"generator": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                       "labeler": "grounding:s3://b/g/best" if recipe["annotator"]["checkpoint"] else "maskrcnn"},
            "versions": {"torch": "2.14.1"},
            "counts": {"planned": 1500, "attempted": 1600, "written": 1400, "dropped": {"class_not_found": 200},
                       "given_up": 100},
            "per_class": {"cow": {"planned": 75, "attempted": 90, "kept": 70, "given_up": 5}},
            "labels": {"labeler": "grounding:s3://b/g/best", "kind": "annotator", "trained_split": 1,
                       "trained": {c.name: c.name != "cow" for c in VOC.classes}, "class_lists": "prompt"},
            "files": [{"path": "data/part-a.parquet", "rows": 700, "bytes": 1000},
                      {"path": "data/part-b.parquet", "rows": 700, "bytes": 2000}]}


def test_card_of_an_annotated_build():
    manifest = fake_manifest(annotator={"checkpoint": "s3://b/g/best", "threshold": 0.4, "ignore_below": 0.2})
    header, body = header_and_body(dataset_card(copy.deepcopy(manifest)))
    assert header["dataset_info"]["splits"][0] == {"name": "train", "num_bytes": 3000, "num_examples": 1400}
    assert header["size_categories"] == ["1K<n<10K"]
    assert "**Annotator**" in body and "s3://b/g/best" in body and "score 0.4" in body and "0.2" in body
    assert "**Labeler**" not in body and "Tiny models" not in body
    assert "| 1500 | 1600 | 1400 | 200 class_not_found | 100 | 2 |" in body
    assert "| cow | 75 | 90 | 70 | 5 |" in body and "up to 4 seeds" in body
    assert "trained on 19 of this dataset's classes (the seen classes of split 1)" in body and "other classes (cow)" in body
    assert "](preview.png)" in body  # the recipe asked for a preview


def test_card_of_a_daam_labelled_build():
    manifest = fake_manifest(annotator={"daam": True, "threshold": 0.4})
    manifest["labels"] = {"labeler": "daam", "kind": "daam", "trained_split": None,
                          "trained": {name: False for name in manifest["labels"]["trained"]}, "class_lists": "prompt"}
    _, body = header_and_body(dataset_card(manifest))
    assert "**Annotator** (DAAM" in body and "score 0.4" in body and "**Labeler**" not in body
    assert "Labelled by DAAM, which trains on no class: zero-shot for every class" in body
    assert "Each image's class list (the classes it is labelled for) is its prompt's classes." in body


def test_card_of_a_follower_names_the_set_whose_images_it_shares():
    manifest = fake_manifest(labeler={"on_missing": "ignore"})
    manifest["recipe"]["follow"] = "outputs/mini-mission/synthetic-mixture"
    manifest["follows"] = {"dataset": "outputs/mini-mission/synthetic-mixture", "name": "shapes-synthetic-mixture",
                           "content_key": "0123abcd"}
    manifest["counts"] = {"planned": 1400, "attempted": 1400, "written": 1400, "dropped": {}, "given_up": 0}
    _, body = header_and_body(dataset_card(manifest))
    assert "Same images as `outputs/mini-mission/synthetic-mixture`: only the labels differ." in body
    assert "(`shapes-synthetic-mixture`, recipe key `0123abcd`)" in body and "a join on `sample_id` pairs" in body
    assert "Each sample of the followed set was made once, never replaced." in body and "up to 4 seeds" not in body
    assert "with every unclaimed pixel 255 (`on_missing: ignore`)" in body
    assert "Same images as" not in dataset_card(fake_manifest())


def test_card_says_where_the_class_lists_came_from():
    manifest = fake_manifest(annotator={"checkpoint": "s3://b/g/best"}, source={"images": "/voc", "format": "voc"})
    manifest["labels"]["class_lists"] = "ground_truth"
    _, body = header_and_body(dataset_card(manifest))
    assert ("Each image's class list (the classes it is labelled for) comes from the source's ground truth, its masks "
            "or tags, which say which images show each class: not for zero-shot training") in body
    manifest["labels"]["class_lists"] = "user"
    assert "was given by the user: the source's `classes_file`" in dataset_card(manifest)


def test_card_of_annotated_real_images_says_what_was_done():
    """Source, the class lists as given, the prompt, the route and the resizing, and limits of its own."""
    manifest = fake_manifest(annotator={"checkpoint": "s3://b/g/best", "on_missing": "absent"},
                             source={"images": "/photos", "classes_file": "/photos.json", "route": "noised",
                                     "resize": "crop"})
    manifest["labels"]["class_lists"] = "user"
    _, body = header_and_body(dataset_card(manifest))
    assert "- **Images**: real, from `/photos` (folder)" in body
    assert "scaled to cover 64x64 and cut to it around its centre" in body and "`source_height`" in body
    assert "**Classes asked**: each image's own list, from `/photos.json`" in body
    assert "classes `all`" not in body  # the recipe's classes did not apply
    assert ("`a photograph of a {0}` for one class, `a photograph of a {0} and a {1}` for two, "
            "`a photograph of a {0}, a {1} and a {2}` and so on for more") in body
    assert "one U-Net" not in body and "noised to the capture step and passed once through the U-Net" in body
    assert "- **Resized.** Each image was scaled to cover 64x64" in body and "**Only the classes asked.**" in body
    # Nothing of generated images: no generator drew them, and an image is never replaced.
    assert "Synthetic images" not in body and "another seed" not in body and "up to 4 seeds" not in body
    assert "Each image of the source was planned once, never replaced." in body
    one_list = fake_manifest(annotator={"checkpoint": "s3://b/g/best"}, source={"images": "/photos"})
    one_list["recipe"]["classes"] = ["cow", "dog"]
    _, body = header_and_body(dataset_card(one_list))
    assert "**Classes asked**: one list for every image, `['cow', 'dog']`" in body
    assert "resized whole to 64x64, stretched where its aspect ratio is not the generator's (`source.resize: " \
           "squash`, the default)" in body


def test_card_without_preview_or_with_capture_columns():
    import pyarrow as pa

    from factory.dataset.schema import SCHEMA

    manifest = fake_manifest(writer={"preview_samples": 0}, capture={"features": "latent"})
    schema = SCHEMA.append(pa.field("timestep", pa.int64())).append(pa.field("latent", pa.binary()))
    header, body = header_and_body(dataset_card(manifest, schema))
    assert "preview.png" not in body and "**Capture**: U-Net `latent`" in body
    assert {"name": "latent", "dtype": "binary"} in header["dataset_info"]["features"]
    assert {"name": "masks", "list": "image"} in header["dataset_info"]["features"]


@pytest.mark.slow
def test_write_card_on_s3(tiny_dataset, tiny_dataset_on_s3, manifest, bucket):
    """On S3 the card reads the schema and the preview's presence from the bucket: the same card."""
    from factory.core.storage import open_location
    from factory.dataset.card import write_card

    location = open_location(tiny_dataset_on_s3)
    location.delete(CARD_FILE)
    assert write_card(location, manifest) == f"s3://{bucket}/datasets/tiny/{CARD_FILE}"
    assert location.read_bytes(CARD_FILE).decode() == (tiny_dataset / CARD_FILE).read_text()
