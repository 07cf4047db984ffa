"""Real images as a build's source (factory/build/images.py) and their plan (factory/build/plan.py):
listings, each image's classes, what is left out, and the reader the model actor uses."""

import json

import numpy as np
import pytest
from PIL import Image

from factory.build.images import ImageReader, class_masks
from factory.build.plan import all_attempts, build_plan
from factory.build.recipe import Recipe, RecipeError
from factory.core.options import fill_template
from factory.core.vocab import SHAPES
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
    assert [s.index for s in plan] == [0, 1, 2]
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
    images, labels = reader.load([s.source_image for s in plan], (32, 32))  # resized: bilinear / nearest
    assert images.shape == (6, 32, 32, 3) and labels.shape == (6, 32, 32)
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
