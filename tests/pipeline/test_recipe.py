import argparse
from pathlib import Path

import pytest

from factory.core.conventions import RECIPE_DIR
from factory.pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, load_recipe, recipe_from_args

RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def parse(argv, recipe: str | None = "tiny"):
    """The recipe of a command line; of the tiny recipe unless `recipe` is None (the default one)."""
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    return recipe_from_args(parser.parse_args(argv if recipe is None or "--recipe" in argv
                                              else ["--recipe", recipe, *argv]))


def recipe_error(overrides, recipe="tiny"):
    """The RecipeError message of a recipe that must not build; always one line."""
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ------------------------------------------------------------------ YAML recipes

def test_recipe_folder_has_the_default():
    assert RECIPE_DIR == Path(__file__).resolve().parents[2] / "factory" / "recipes"  # package data (pyproject)
    assert "tiny" in [p.stem for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    by_name = load_recipe(path.stem)
    by_path = load_recipe(str(path))
    assert isinstance(by_name, Recipe)
    assert by_name.name == path.stem  # name defaults to the file's stem
    assert by_name == by_path
    assert by_name.output == by_name.out or by_name.output == f"outputs/{by_name.name}"


def test_the_default_is_the_mini_world():
    recipe = load_recipe()
    assert recipe.name == "shapes" and recipe.vocabulary == "shapes"
    assert recipe.generator.model == "models/shapes-generator" and recipe.labeler.model == "maskrcnn_small"
    assert recipe.pool.require_gpu is False  # its models are small enough for CPUs


def test_tiny_recipe_values():
    recipe = load_recipe("tiny")
    assert recipe.name == "tiny" and recipe.vocabulary == "voc" and recipe.classes == "all"
    assert recipe.generator.model == "tiny" and recipe.labeler.model == "tiny"
    assert (recipe.generator.height, recipe.generator.width) == (64, 64)
    assert recipe.output == "outputs/tiny"


def test_recipe_by_explicit_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("classes: [dog, cat]\nper_class: 2\ngenerator: {steps: 2}\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine"
    assert recipe.classes == ["dog", "cat"] and recipe.per_class == 2 and recipe.generator.steps == 2


# -------------------------------------------------------------------- overrides

def test_dotted_overrides():
    recipe = load_recipe("tiny", {"generator.steps": 3, "labeler.score_threshold": 0.25,
                                  "pool.max_size": 2, "seed": 7})
    assert recipe.generator.steps == 3
    assert recipe.labeler.score_threshold == 0.25
    assert recipe.pool.max_size == 2
    assert recipe.seed == 7
    # Fields not overridden keep the recipe's values.
    assert recipe.generator.height == 64 and recipe.labeler.on_missing == "ignore"


def test_override_into_a_value_that_is_not_a_section():
    message = recipe_error({"seed.value": 1})
    assert "seed" in message


def test_classes_comma_form():
    recipe = load_recipe("tiny", {"classes": "dog,cat"})
    assert recipe.classes == ["dog", "cat"]
    recipe = load_recipe("tiny", {"classes": " dog , potted plant ,"})
    assert recipe.classes == ["dog", "potted plant"]
    assert load_recipe("tiny", {"classes": "dog"}).classes == ["dog"]
    assert load_recipe("tiny", {"classes": "all"}).classes == "all"


# ------------------------------------- validators (bad input: tests/pipeline/test_bad_input.py)

def test_ignore_threshold_below_score_threshold():
    ok = load_recipe("tiny", {"labeler.score_threshold": 0.5, "labeler.ignore_threshold": 0.2})
    assert ok.labeler.ignore_threshold == 0.2


def test_real_labeler_with_weights():
    ok = load_recipe("tiny", {"labeler.model": "maskrcnn_resnet50_fpn_v2",
                              "labeler.weights": "/models/maskrcnn.safetensors"})
    assert ok.labeler.weights == "/models/maskrcnn.safetensors"


@pytest.mark.parametrize("field,template", [
    ("one", "a photograph"),                 # no placeholder at all
    ("two", "a photograph of a {0}"),        # the second class never named
    ("two", "a photograph"),
    ("one", "a photograph of a {name}"),     # named, not positional
    ("one", "a photograph of a {1}"),        # index out of range
    ("one", "a photograph of a {"),          # malformed
])
def test_template_without_placeholders(field, template):
    message = recipe_error({f"prompts.{field}": template})
    assert f"template {field!r}" in message and "placeholder" in message


def test_templates_with_placeholders():
    recipe = load_recipe("tiny", {"prompts.one": "{0}, a photo", "prompts.two": "{1} next to {0}"})
    assert recipe.prompts.two.format("dog", "cat") == "cat next to dog"


# --------------------------------------------------------------- command line

def test_argparse_overrides():
    recipe = parse(["--generator.steps", "3", "--out", "/tmp/x", "--num-samples", "5"])
    assert recipe.generator.steps == 3
    assert recipe.out == "/tmp/x" and recipe.output == "/tmp/x"
    assert recipe.num_samples == 5
    assert recipe.name == "tiny"


def test_argparse_underscore_and_dash_forms():
    assert parse(["--num_samples", "7"]).num_samples == 7
    assert parse(["--num-samples", "7"]).num_samples == 7
    assert parse(["--generator.batch_size", "2"]).generator.batch_size == 2
    assert parse(["--generator.batch-size", "2"]).generator.batch_size == 2
    assert parse(["--pool.max-size", "3"]).pool.max_size == 3


def test_argparse_without_overrides_is_the_recipe():
    assert parse([], recipe=None) == load_recipe("shapes")


def test_argparse_yaml_values():
    recipe = parse(["--classes", "dog,cat", "--labeler.ignore-threshold", "0.001",
                    "--prompts.two", "a {0} and a {1}"])
    assert recipe.classes == ["dog", "cat"]
    assert recipe.labeler.ignore_threshold == 0.001
    assert recipe.prompts.two == "a {0} and a {1}"
    assert parse(["--classes", "[dog, cat]"]).classes == ["dog", "cat"]
    assert parse(["--labeler.weights", "null"]).labeler.weights is None


def test_argparse_recipe_path(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("classes: [bus]\nper_class: 4\n")
    recipe = parse(["--recipe", str(path), "--per-class", "2"])
    assert recipe.name == "other" and recipe.classes == ["bus"] and recipe.per_class == 2


# ----------------------------------------------------------------- content key

BASE = {"seed": 1}


@pytest.mark.parametrize("overrides", [
    {"out": "/tmp/elsewhere"},
    {"out": "s3://bucket/prefix"},
    {"num_samples": 5},
    {"num_samples": None},
    {"generator.batch_size": 1},
    {"labeler.batch_size": 2},
    {"pool.max_size": 4},
    {"pool.min_size": 2, "pool.max_size": 3, "pool.load_attempts": 5},
    {"writer.preview_samples": 0},
    {"fast.attention": "math", "fast.channels_last": True, "fast.compile": "max-autotune"},
    {"fast.static_batch": True, "fast.overlap": True},
    {"follow": "outputs/mixture"},  # which samples are made, not what each holds
], ids=lambda o: ",".join(o))
def test_content_key_ignores_run_settings(overrides):
    assert load_recipe("tiny", {**BASE, **overrides}).content_key() == load_recipe("tiny", BASE).content_key()


@pytest.mark.parametrize("overrides", [
    {"seed": 2},
    {"generator.steps": 11},
    {"labeler.score_threshold": 0.3},
    {"labeler.ignore_threshold": 0.001},
    {"generator.guidance_scale": 7.5},
    {"classes": "dog,cat"},
    {"per_class": 2},
    {"prompts.one": "a picture of a {0}"},
    {"writer.image_format": "jpeg"},
    {"annotator.daam": True},
    {"prompts.per_class": {"dog": ["a {} on a sofa"]}},
    {"vocabulary": "vocabularies/street.yaml", "classes": "all"},
    {"generator.scheduler": "dpm++"},
    {"generator.scheduler": "lcm", "generator.lora": "lcm-lora.safetensors"},
], ids=lambda o: ",".join(o))
def test_content_key_follows_content(overrides):
    assert load_recipe("tiny", {**BASE, **overrides}).content_key() != load_recipe("tiny", BASE).content_key()


def test_content_key_is_stable():
    key = load_recipe("tiny").content_key()
    assert key == load_recipe("tiny").content_key()
    assert len(key) == 16 and int(key, 16) >= 0


def test_content_key_survives_new_fields_at_their_default():
    """Datasets built before a field existed keep their key, and so resume after an upgrade: this is
    tiny.yaml's key from before annotator.daam (update it only when tiny.yaml itself changes)."""
    assert load_recipe("tiny").content_key() == "1e8f82bb028f3e6a"


def test_text_fields_are_taken_verbatim_from_the_command_line():
    assert parse(["--out", "no"]).out == "no"  # YAML would have made it False
    assert parse(["--name", "2024"]).name == "2024"
    assert parse(["--prompts.one", "{0}"]).prompts.one == "{0}"
    assert parse(["--prompts.file", "null"]).prompts.file is None




# ------------------------------------------------------------------ user-defined vocabularies

def test_a_vocabulary_file_is_kept_as_its_definition(tmp_path):
    """The recipe (and so the manifest and the content key) holds the definition, not the path:
    the same file elsewhere is the same recipe, and a changed file another one."""
    street = load_recipe("tiny", {"vocabulary": "vocabularies/street.yaml"})
    assert street.vocabulary["name"] == "street" and street.selected_classes == ["vehicle", "pedestrian", "cyclist"]
    assert street.vocabulary["classes"][0] == {"index": 1, "name": "vehicle", "natural": "car",
                                               "synonyms": ["automobile"], "detector": "car"}
    moved = tmp_path / "mine.yaml"
    moved.write_text((RECIPE_DIR / "vocabularies" / "street.yaml").read_text())
    assert load_recipe("tiny", {"vocabulary": str(moved)}) == street
    assert Recipe.model_validate(street.model_dump(mode="json")).content_key() == street.content_key()
    moved.write_text(moved.read_text().replace("synonyms: [automobile]", "synonyms: [automobile, sedan]"))
    assert load_recipe("tiny", {"vocabulary": str(moved)}).content_key() != street.content_key()
    inline = load_recipe("tiny", {"vocabulary": {"name": "two", "classes": [{"name": "hound", "detector": "dog"},
                                                                            {"name": "kitty", "detector": "cat"}]}})
    assert inline.selected_classes == ["hound", "kitty"]


@pytest.mark.parametrize("overrides, message", [
    ({"vocabulary": "ade20k"},
     "--vocabulary: unknown vocabulary 'ade20k' (choices: voc, coco, shapes, or a .yaml/.yml/.tsv file)"),
    ({"vocabulary": "none.yaml"}, "--vocabulary: vocabulary file not found: none.yaml"),
    ({"vocabulary": {"name": "mine", "classes": []}}, "--vocabulary: vocabulary mine has no classes"),
    ({"vocabulary": "vocabularies/street.yaml", "classes": "vehicle,dog"},
     "--classes: unknown class 'dog' in vocabulary street"),
    ({"vocabulary": "vocabularies/street.yaml", "classes": "all", "split": 2},
     "--split: unknown split 2 for vocabulary street (valid splits: 1)"),
    ({"vocabulary": "vocabularies/warehouse.tsv", "classes": "all"},
     "tiny.yaml: the tiny oracle has no class for forklift, pallet, hard_hat (vocabulary warehouse names no "
     "detector class): label them with labeler.model open_vocabulary or annotator.checkpoint"),
    ({"prompts.per_class": {"unicorn": ["a {} at dawn"]}},
     "tiny.yaml: prompts: unknown class 'unicorn' in vocabulary voc"),
    ({"prompts.per_class": {"dog": ["a dog at dawn"]}},
     "tiny.yaml: prompts: template 'per_class: dog' must use 1 positional placeholder(s) {0}..: {0} missing"),
])
def test_bad_vocabulary_or_prompts(overrides, message):
    assert recipe_error(overrides) == message


@pytest.mark.parametrize("overrides, message", [
    ({"fast.compile": "fast"}, "--fast.compile: Input should be 'off', 'default', 'max-autotune' or "
     "'reduce-overhead'"),
    ({"fast.compile": "default", "capture.attention": True},
     "tiny.yaml: fast.compile with DAAM: its recorder swaps the U-Net's attention processors for each batch, which "
     "a compiled graph does not see; compile off, or no attention maps"),
    ({"generator.scheduler": "dpm++", "generator.steps": 25, "capture.features": "latent", "capture.step": 51},
     "tiny.yaml: capture.step 51 is beyond DDIM-50, the reference of dpm++ (50 steps)"),
    ({"generator.scheduler": "euler"}, "--generator.scheduler: Input should be 'ddim', 'dpm++', 'lcm' or 'flow'"),
])
def test_bad_fast_paths_or_samplers(overrides, message):
    assert recipe_error(overrides) == message


# ------------------------------------------------------------------ follow

def test_a_follower_makes_each_followed_sample_once():
    follower = load_recipe("tiny", {"follow": "s3://b/mixture", "attempts": 4})
    assert follower.tries == 1 and load_recipe("tiny", {"attempts": 4}).tries == 4
    assert load_recipe("tiny", {"follow": "m", "annotator.daam": True, "annotator.on_missing": "absent"}).tries == 1


@pytest.mark.parametrize("overrides, message", [
    ({"follow": "m", "labeler.on_missing": "drop"},
     "tiny.yaml: follow keeps every sample it follows: labeler.on_missing ignore (a missed class leaves every "
     "unclaimed pixel 255), not drop"),
    ({"follow": "m", "annotator.daam": True, "annotator.on_missing": "drop"},
     "tiny.yaml: follow keeps every sample it follows: annotator.on_missing ignore (a missed class leaves every "
     "unclaimed pixel 255), not drop"),
    ({"follow": "m", "agreement.labeler": {"model": "tiny"}, "agreement.min_iou": 0.5},
     "tiny.yaml: follow keeps every sample it follows: agreement.action ignore, not drop"),
    ({"follow": "m", "source.images": "/voc", "source.format": "voc", "capture.features": "latent"},
     "tiny.yaml: follow is for generated sets; a build from real images plans each image once already"),
], ids=["labeler drops", "annotator drops", "agreement drops", "real images"])
def test_a_follower_that_would_drop_or_reads_real_images_is_refused(overrides, message):
    assert recipe_error(overrides) == message


def test_a_few_step_sampler_captures_beyond_its_own_step_count():
    """capture.step counts DDIM-50's steps for dpm++ and lcm: t=5 is valid for LCM-4."""
    recipe = load_recipe("tiny", {"generator.scheduler": "lcm", "generator.steps": 4, "generator.guidance_scale": 1.0,
                                  "capture.features": "latent", "capture.step": 5})
    assert recipe.capture.step == 5


# ------------------------------------------------------------------ open-vocabulary labeler

def test_open_vocabulary_labeler():
    sam3 = load_recipe("tiny", {"labeler.model": "open_vocabulary", "labeler.weights": "s3://models/sam3"})
    assert sam3.labeler.sam is None and "sam" not in sam3.model_dump()["labeler"]  # unset: the content key stays
    grounded = load_recipe("tiny", {"labeler.model": "open_vocabulary", "labeler.weights": "google/owlv2-base-patch16",
                                    "labeler.sam": "facebook/sam-vit-huge"})
    assert grounded.labeler.sam == "facebook/sam-vit-huge"
    assert grounded.content_key() != sam3.content_key()


@pytest.mark.parametrize("overrides,message", [
    ({"labeler.model": "open_vocabulary"},
     "tiny.yaml: labeler: labeler open_vocabulary needs weights: a SAM 3, OWLv2 or Grounding DINO model"),
    ({"labeler.model": "open_vocabulary", "labeler.weights": "torchvision"},
     "tiny.yaml: labeler: weights: torchvision needs a torchvision COCO architecture, not open_vocabulary"),
    ({"labeler.sam": "facebook/sam-vit-huge"},
     "tiny.yaml: labeler: sam is for labeler open_vocabulary with a detector, not tiny"),
], ids=["no weights", "torchvision", "sam without open_vocabulary"])
def test_bad_open_vocabulary_labeler(overrides, message):
    # Whether weights is SAM 3 (then sam is refused) is known when it loads: tests/pipeline/test_openvocab.py.
    assert recipe_error(overrides) == message


def test_the_recipes_split_applies_only_where_the_vocabulary_has_splits(tmp_path):
    fruit = tmp_path / "fruit.tsv"
    fruit.write_text("# detector: shapes\nname\tnatural\tdetector\napple\tred disc\tred disc\n")
    recipe = parse(["--vocabulary", str(fruit)], recipe=None)  # the default recipe says split: 1
    assert recipe.split is None and recipe.model_dump()["split"] is None  # the dataset is declared for no split
    assert recipe.notes == ["split 1 does not apply: vocabulary fruit has no seen/unseen splits, so this dataset "
                            "is declared for none"]
    assert parse([]).notes == [] and parse(["--vocabulary", "vocabularies/signs.yaml"], recipe=None).split == 1
    assert "classes: unseen needs seen/unseen splits, and vocabulary fruit has none" in recipe_error(
        {"vocabulary": str(fruit), "classes": "unseen"}, recipe="shapes")


def test_an_oracle_labels_only_the_detector_classes_it_was_trained_on():
    assert "labeler maskrcnn_small detects shapes classes, and vocabulary street's detector names coco classes" in \
        recipe_error({"vocabulary": "vocabularies/street.yaml"}, recipe="shapes")
    assert "labeler maskrcnn_resnet50_fpn_v2 detects coco classes, and vocabulary signs's detector names shapes" in \
        recipe_error({"vocabulary": "vocabularies/signs.yaml"}, recipe="voc-oracle")
    assert parse(["--vocabulary", "vocabularies/signs.yaml"]).vocabulary["detector"] == "shapes"  # tiny: random
