"""Real images as a build's source (factory/pipeline/images.py) and their plan (factory/pipeline/plan.py):
listings, each image's classes, what is left out, and the reader the model actor uses."""

import hashlib
import json
import logging

import numpy as np
import pytest
from PIL import Image

from factory.core.options import fill_template
from factory.core.vocab import SHAPES
from factory.pipeline.images import ImageReader, class_masks, fit_image
from factory.pipeline.plan import all_attempts, build_plan, image_index
from factory.pipeline.recipe import Recipe, RecipeError
from world.benchmark import write_benchmark

ANNOTATOR = {"checkpoint": "unused/best"}  # planning never reads it


def recipe(source: dict, **fields) -> Recipe:
    return Recipe.model_validate({"name": "real", "vocabulary": "shapes",
                                  "generator": {"height": 64, "width": 64}, "source": source, **fields})


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("voc"), val=6, train=0)


def write_images(folder, names, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(folder / name)


def test_a_folder_plans_one_sample_per_image_asking_the_recipes_classes(tmp_path):
    write_images(tmp_path / "photos", ["b.jpg", "a.png", "c.jpeg"])
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    r = recipe({"images": str(tmp_path / "photos")}, classes=["blue cross", "red disc"], annotator=ANNOTATOR)
    plan = build_plan(r)
    assert [s.source_image for s in plan] == ["a.png", "b.jpg", "c.jpeg"]  # sorted, images only
    # each index is the image's own: a hash of its name and content
    assert [s.index for s in plan] == [
        image_index(f"{name}:{hashlib.sha256((tmp_path / 'photos' / name).read_bytes()).hexdigest()}")
        for name in ("a.png", "b.jpg", "c.jpeg")]
    assert all(s.classes == ("red_disc", "blue_cross") for s in plan)  # vocabulary order
    assert plan[0].prompt == "a photograph of a red disc and a blue cross"
    assert plan == build_plan(r)  # ids and seeds are a function of the recipe
    assert all_attempts(plan, r) == plan  # a real image is never replaced by another attempt
    assert plan[0].row()["source_image"] == "a.png"


def test_a_classes_file_names_each_images_classes(tmp_path):
    write_images(tmp_path / "photos", ["a.png", "b.png"])
    (tmp_path / "classes.json").write_text(json.dumps({"a.png": ["red disc"], "b.png": ["white square",
                                                                                       "green triangle", "red disc"]}))
    plan = build_plan(recipe({"images": str(tmp_path / "photos"), "classes_file": str(tmp_path / "classes.json")},
                             annotator=ANNOTATOR))
    assert [s.classes for s in plan] == [("red_disc",), ("red_disc", "green_triangle", "white_square")]
    assert plan[1].prompt == "a photograph of a red disc, a green triangle and a white square"


def test_voc_images_are_asked_the_classes_their_masks_show(voc):
    r = recipe({"images": str(voc), "format": "voc", "split": "val"}, capture={"features": "latent"})
    plan = build_plan(r)
    reader = ImageReader(r.source, "shapes")
    images, labels, original = reader.load([s.source_image for s in plan], (32, 32))  # bilinear / nearest
    assert images.shape == (6, 32, 32, 3) and labels.shape == (6, 32, 32)
    assert original.tolist() == [[64, 64]] * 6  # the drawn benchmark's size, before
    for sample, label in zip(plan, labels):
        shown = {SHAPES.by_index(int(v)).name for v in np.unique(label) if v}
        assert set(sample.classes) == shown
        masks = class_masks(label, [SHAPES.lookup(name).index for name in sample.classes])
        assert masks.any(axis=(1, 2)).all()


def test_voc_images_outside_the_selection_are_left_out(voc):
    full = build_plan(recipe({"images": str(voc), "format": "voc", "split": "val"}, capture={"features": "latent"}))
    seen = build_plan(recipe({"images": str(voc), "format": "voc", "split": "val"}, capture={"features": "latent"},
                             classes="seen", split=1))
    allowed = set(SHAPES.seen(1))
    assert [s.source_image for s in seen] == [s.source_image for s in full if set(s.classes) <= allowed]
    assert 0 < len(seen) < len(full)


def test_a_source_that_holds_no_usable_image_is_one_line(voc):
    source = {"images": str(voc), "format": "voc", "split": "val"}
    shown = {name for s in build_plan(recipe(source, capture={"features": "latent"})) for name in s.classes}
    absent = next(name for name in SHAPES.names if name not in shown)
    with pytest.raises(RecipeError, match=r"has no image to plan \(6 listed; left out: 6 with a class outside"):
        build_plan(recipe(source, capture={"features": "latent"}, classes=[absent]))
    with pytest.raises(RecipeError, match="VOC split 'test' has no image list"):
        build_plan(recipe({"images": str(voc), "format": "voc", "split": "test"}, capture={"features": "latent"}))


def test_fill_template_names_any_number_of_classes():
    one, two = "a photograph of a {0}", "a photograph of a {0} and a {1}"
    assert fill_template(one, two, ["cat"]) == "a photograph of a cat"
    assert fill_template(one, two, ["cat", "dog"]) == "a photograph of a cat and a dog"
    assert fill_template(one, two, ["cat", "dog", "bus"]) == "a photograph of a cat, a dog and a bus"
    assert fill_template("{0}", "{0} and {1}", ["cat", "dog", "bus"]) == "cat, dog and bus"


def ids(plan) -> dict[str, tuple[str, int]]:
    return {s.source_image: (s.sample_id, s.seed) for s in plan}


def test_an_images_sample_is_keyed_by_its_name_and_content_not_its_place(tmp_path):
    """Adding, removing, renaming or changing a file changes only its own sample: every other image
    keeps its id and seed, so a rerun resumes to exactly the images there are."""
    photos = tmp_path / "photos"
    write_images(photos, ["b.png", "c.png", "d.png"])
    r = recipe({"images": str(photos)}, classes=["red disc"], annotator=ANNOTATOR)
    before = ids(build_plan(r))
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(photos / "a.png")  # sorts first
    added = ids(build_plan(r))
    assert set(added) == {"a.png", *before} and {k: added[k] for k in before} == before
    assert added["a.png"] not in before.values()
    (photos / "c.png").rename(photos / "e.png")
    (photos / "b.png").unlink()
    Image.fromarray(np.full((30, 40, 3), 9, np.uint8)).save(photos / "d.png")  # same name, new pixels
    changed = ids(build_plan(r))
    assert set(changed) == {"a.png", "d.png", "e.png"} and changed["a.png"] == added["a.png"]
    assert changed["e.png"] not in before.values() and changed["d.png"] != before["d.png"]


def test_an_output_in_the_images_folder_is_refused_unless_it_is_this_recipes_build(tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png"])
    source = {"images": str(photos)}
    with pytest.raises(RecipeError, match=f"^output {photos} is source.images {photos}: write the dataset to "
                                          f"another folder"):
        build_plan(recipe(source, classes=["red disc"], annotator=ANNOTATOR, out=str(photos)))
    with pytest.raises(RecipeError, match=f"^output {photos}/ds is inside source.images {photos}"):
        build_plan(recipe(source, classes=["red disc"], annotator=ANNOTATOR, out=str(photos / "ds")))
    # Already a build of this recipe (its build.json): resumed, and its own preview is no source image.
    r = recipe(source, classes=["red disc"], annotator=ANNOTATOR, out=str(photos))
    (photos / "build.json").write_text(json.dumps({"content_key": r.content_key()}))
    write_images(photos, ["preview.png"])
    assert [s.source_image for s in build_plan(r)] == ["a.png"]
    other = recipe(source, classes=["blue cross"], annotator=ANNOTATOR, out=str(photos))
    with pytest.raises(RecipeError, match="is source.images"):
        build_plan(other)
    assert build_plan(recipe(source, classes=["red disc"], annotator=ANNOTATOR, out=str(tmp_path / "ds")))


def test_a_missing_images_folder_is_not_found(tmp_path):
    with pytest.raises(RecipeError, match=f"^source.images {tmp_path}/none not found$"):
        build_plan(recipe({"images": str(tmp_path / "none")}, classes=["red disc"], annotator=ANNOTATOR))
    write_images(tmp_path, ["a.png"])
    with pytest.raises(RecipeError, match=f"^source.images {tmp_path}/a.png is a file; name the folder"):
        build_plan(recipe({"images": str(tmp_path / "a.png")}, classes=["red disc"], annotator=ANNOTATOR))


def test_files_that_are_not_read_are_named_in_one_warning(tmp_path, caplog):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.gif", "c.webp", "d.GIF"])
    (photos / ".hidden").write_text("")
    r = recipe({"images": str(photos)}, classes=["red disc"], annotator=ANNOTATOR)
    with caplog.at_level(logging.WARNING, logger="factory.pipeline.plan"):
        assert [s.source_image for s in build_plan(r)] == ["a.png"]
    assert [record.getMessage() for record in caplog.records] == [
        f"{photos}: skipped 3 files not read as images (2 .gif, 1 .webp; only .png, .jpg, .jpeg are): "
        f"b.gif, c.webp, d.GIF"]
    (photos / "a.png").unlink()
    with pytest.raises(RecipeError, match=r"no images in .*; skipped 3 files not read as images \(2 .gif"):
        build_plan(r)


@pytest.mark.parametrize("text, error", [
    ('{"a.png": ["red disc"],\n "b.png": ["red disc",]}', "{file}:2: not JSON: Expecting value"),
    ('{"a.png": ["red disc"],\n\n "b.png": "blue cross"}',
     '{file}:3: b.png: expected a list of class names, found "blue cross"'),
    ('{"a.png": ["red disc"],\n "b.png": ["unicorn"]}', "{file}:2: b.png: unknown class 'unicorn' in vocabulary"),
    ('{"a.png": ["red disc"],\n "b.png": []}', "{file}:2: b.png names no class"),
    ('["red disc"]', "{file}: expected a JSON object {image file name: [class names]}, found a list"),
    (None, "classes file {file} not found"),
])
def test_a_classes_file_error_names_the_file_and_line(tmp_path, text, error):
    write_images(tmp_path / "photos", ["a.png", "b.png"])
    path = tmp_path / "classes.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        build_plan(recipe({"images": str(tmp_path / "photos"), "classes_file": str(path)}, annotator=ANNOTATOR))
    assert str(raised.value).startswith(error.replace("{file}", str(path)))


def test_resize_squashes_crops_or_pads_to_the_generators_size():
    image = np.zeros((20, 40, 3), np.uint8)  # wide: a red left half, a blue right half
    image[:, :20, 0], image[:, 20:, 2] = 255, 255
    label = np.ones((20, 40), np.uint8)
    squashed, _ = fit_image(image, label, (10, 10), "squash")
    assert squashed.shape == (10, 10, 3) and squashed[:, :4, 0].min() == 255 and squashed[:, 6:, 2].min() == 255
    cropped, cropped_label = fit_image(image, label, (10, 10), "crop")  # the centre 20 x 20, halved
    assert cropped.shape == (10, 10, 3) and cropped[:, :4, 0].min() == 255 and cropped[:, 6:, 2].min() == 255
    assert (cropped_label == 1).all()
    padded, padded_label = fit_image(image, label, (10, 10), "pad")  # 5 x 10 in the middle, black around
    assert padded.shape == (10, 10, 3) and not padded[:2].any() and not padded[-3:].any()
    assert (padded_label[2:7] == 1).all() and (padded_label[:2] == 255).all() and (padded_label[7:] == 255).all()
    same = np.zeros((10, 10, 3), np.uint8)
    assert all(fit_image(same, None, (10, 10), how)[0] is same for how in ("squash", "crop", "pad"))
