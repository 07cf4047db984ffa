"""Bad input, one table: every malformed recipe or command line ends with exit code 2 and one
line `<job>: error: ...` that names the problem, before any model loads, with nothing written."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import ray
from PIL import Image

from factory.core import storage
from factory.core.vocab import VOC
from factory.dataset.layout import COMMIT_DIR, FORMAT
from factory.dataset.write import Commit, part_name
from factory.diffusion import clip, tiny
from factory.pipeline import generate, label, pipeline, quality
from factory.pipeline.recipe import load_recipe
from jobs import annotate_images, build_dataset, eval_grounding, eval_zs3, train_grounding, train_segmenter

REPO = Path(__file__).resolve().parents[2]

JOBS = {job.__name__.rsplit(".", 1)[-1]: job
        for job in (build_dataset, annotate_images, train_grounding, train_segmenter, eval_grounding, eval_zs3)}
RECIPE = "{tmp}/recipe.yaml"  # a case's `recipe` text is written here
OUT = "{tmp}/out"


def _png() -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(data, format="PNG")
    return data.getvalue()


def case(id: str, args: list[str], expect: str, *, recipe: str | None = None, files: dict | None = None,
         job: str = "build_dataset", before: list[str] | None = None):
    """`args` of `job` ({tmp}: the case's folder; build_dataset gets --out {tmp}/out unless it has one);
    `expect`: a fragment of the error line; `files`: written into {tmp} first; `before`: build_dataset
    arguments of an earlier run into {tmp}/out (see `earlier_run`)."""
    files = {**(files or {}), **({"recipe.yaml": recipe} if recipe is not None else {})}
    return pytest.param(job, args, expect, files, before, id=id)


PAIRS_HEADER = "# vocabulary: voc\n"
PNG = _png()
IMAGES = {"images/a.png": PNG, "images/b.png": b"\x89PNG but truncated"}
ANNOTATE = ["--images", "{tmp}/images", "--out", OUT]


def annotated_set(class_lists: str, prompted: list[str]) -> dict:
    """{tmp}/data as a finished VOC set labelled by a grounding module trained on split 1's seen
    classes, a cat and a dog (unseen in split 1) in every image: its manifest alone, which
    train_segmenter checks before it reads a row."""
    seen = VOC.seen(1)
    manifest = {"format": FORMAT, "name": "annotated", "recipe": {"vocabulary": "voc", "split": 1},
                "plan": {"samples": 4, "digest": "d", "prompted_classes": prompted},
                "vocabulary": VOC.definition(),
                "per_class": dict.fromkeys(("cat", "dog"), {"planned": 4, "attempted": 4, "kept": 4, "given_up": 0}),
                "labels": {"labeler": "grounding", "kind": "annotator", "trained_split": 1, "class_lists": class_lists,
                           "trained": {name: name in seen for name in VOC.names}},
                "files": [{"path": "data/part-0.parquet", "rows": 4}]}
    return {"data/manifest.json": json.dumps(manifest)}


def followed_set(**changes) -> dict:
    """{tmp}/lead as a finished build of the tiny recipe with `changes`: its manifest alone, which a
    follower checks before it reads a row."""
    recipe = load_recipe("tiny", changes)
    manifest = {"format": FORMAT, "name": "lead", "recipe": recipe.model_dump(mode="json"),
                "content_key": recipe.content_key(), "files": [{"path": "data/part-0.parquet", "rows": 4}]}
    return {"lead/manifest.json": json.dumps(manifest)}


# Saved SD 3.5 and FLUX.1 pipelines as their configs say (real sizes; no weights: nothing may load).
_VAE = '{"block_out_channels": [128, 256, 512, 512]}'
GENERATORS = {"sd35/model_index.json": '{"_class_name": "StableDiffusion3Pipeline"}', "sd35/vae/config.json": _VAE,
              "sd35/transformer/config.json": '{"patch_size": 2}',
              "flux/model_index.json": '{"_class_name": "FluxPipeline"}', "flux/vae/config.json": _VAE}

SEGMENTER = ["--data", "{tmp}/data", "--out", OUT]
INDUCTIVE = ["--setting", "inductive", "--model.head", "text", "--model.text-encoder", "tiny"]
CASES = [
    # --- classes, vocabulary, counts, splits
    case("unknown-class", ["--classes", "dog,unicorn"], "--classes: unknown class 'unicorn' in vocabulary voc"),
    case("misspelt-class-gets-a-suggestion", ["--classes", "dgo"],
         "unknown class 'dgo' in vocabulary voc (did you mean: dog?)"),
    case("empty-class-list-in-recipe", ["--recipe", RECIPE], "classes: empty list", recipe="classes: []\n"),
    case("empty-class-list-on-cli", ["--classes", ","], "--classes: empty list"),
    case("unknown-vocabulary", ["--vocabulary", "ade20k"],
         "--vocabulary: unknown vocabulary 'ade20k' (choices: voc, coco, shapes, or a .yaml/.yml/.tsv file)"),
    case("empty-vocabulary", ["--recipe", RECIPE],
         "vocabulary: unknown vocabulary '' (choices: voc, coco, shapes, or a .yaml/.yml/.tsv file)",
         recipe="vocabulary: ''\n"),
    case("vocabulary-file-missing", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: vocabulary file not found: {tmp}/mine.yaml"),
    case("vocabulary-index-twice", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: {tmp}/mine.yaml:2: vocabulary mine: index 1 given twice",
         files={"mine.yaml": "name: mine\nclasses: [{name: a, index: 1}, {name: b, index: 1}]\n"}),
    case("vocabulary-index-255", ["--vocabulary", "{tmp}/mine.tsv"],
         "--vocabulary: {tmp}/mine.tsv:3: vocabulary mine: class b has index 255; indices are 1..254 (0 is background, "
         "255 ignore)",
         files={"mine.tsv": "name\tindex\na\t1\nb\t255\n"}),
    case("open-vocabulary-model-missing", ["--labeler.model", "open_vocabulary", "--labeler.weights", "{tmp}/sam3"],
         "model not found: {tmp}/sam3/config.json"),
    case("agreement-weights-missing",
         ["--agreement.labeler", "{model: maskrcnn_small, weights: {tmp}/oracle.safetensors}"],
         "model not found: {tmp}/oracle.safetensors"),
    case("vocabulary-class-without-detector", ["--vocabulary", "{tmp}/mine.yaml"],
         "the tiny oracle has no class for b (vocabulary mine names no detector class)",
         files={"mine.yaml": "name: mine\nclasses: [{name: a, detector: dog}, b]\n"}),
    case("vocabulary-reserved-name", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: {tmp}/mine.yaml:2: vocabulary mine: class name 'background' is reserved",
         files={"mine.yaml": "name: mine\nclasses: [dog, background]\n"}),
    case("vocabulary-empty-natural", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: {tmp}/mine.yaml:3: vocabulary mine: class go's natural is empty",
         files={"mine.yaml": "name: mine\nclasses:\n  - {name: go, natural: '', detector: dog}\n"}),
    case("vocabulary-synonym-of-two-classes", ["--vocabulary", "{tmp}/mine.tsv"],
         "--vocabulary: {tmp}/mine.tsv:3: vocabulary mine: class b's synonym 'car' also names class a",
         files={"mine.tsv": "name\tsynonyms\tdetector\na\tcar\tcar\nb\tcar\tbus\n"}),
    case("vocabulary-synonym-is-another-class", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: {tmp}/mine.yaml:3: vocabulary mine: class a's synonym 'b' also names class b",
         files={"mine.yaml": "name: mine\nclasses:\n  - {name: a, synonyms: [b]}\n  - b\n"}),
    case("vocabulary-string-for-a-list", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: {tmp}/mine.yaml:3: vocabulary mine: unseen is a list of lists of classes",
         files={"mine.yaml": "name: mine\nclasses: [{name: road, detector: car}, {name: man, detector: person}]\n"
                             "unseen: [road]\n"}),
    case("vocabulary-yaml-syntax", ["--vocabulary", "{tmp}/mine.yaml"],
         "--vocabulary: {tmp}/mine.yaml:4: not valid YAML",
         files={"mine.yaml": "name: mine\nclasses:\n  - name: a\n   natural: b\n"}),
    case("seen-classes-of-a-vocabulary-without-splits", ["--vocabulary", "{tmp}/mine.tsv", "--classes", "seen"],
         "classes: seen needs seen/unseen splits, and vocabulary mine has none",
         files={"mine.tsv": "name\tdetector\na\tcar\n"}),
    case("oracle-of-other-classes", ["--recipe", "shapes", "--vocabulary", "vocabularies/street.yaml"],
         "labeler maskrcnn_small detects shapes classes, and vocabulary street's detector names coco classes"),
    case("per-class-negative", ["--per-class", "-1"], "--per-class: Input should be greater than or equal to 0"),
    case("per-pair-negative", ["--per-pair", "-2"], "--per-pair: Input should be greater than or equal to 0"),
    case("nothing-to-plan", ["--per-class", "0", "--per-pair", "0"], "per_class and per_pair are both 0"),
    case("num-samples-zero", ["--num-samples", "0"], "--num-samples: Input should be greater than or equal to 1"),
    case("num-samples-negative", ["--num-samples", "-5"], "--num-samples: Input should be greater than or equal to 1"),
    case("seed-negative", ["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    case("unknown-split", ["--classes", "seen", "--split", "4"],
         "--split: unknown split 4 for vocabulary voc (valid splits: 1, 2, 3)"),
    case("unknown-split-with-all-classes", ["--split", "0"], "--split: unknown split 0"),
    case("unseen-classes-without-split", ["--classes", "unseen"], "classes: unseen needs split"),
    # --- where the output goes
    case("gs-uri", ["--out", "gs://bucket/ds"], "unsupported URI 'gs://bucket/ds'"),
    case("http-uri", ["--out", "http://example.com/ds"], "unsupported URI 'http://example.com/ds'"),
    case("s3-uri-without-bucket", ["--out", "s3:///ds"], "bad S3 URI 's3:///ds': expected s3://bucket/prefix"),
    case("output-is-a-file", ["--out", "{tmp}/file"], "is not writable", files={"file": "not a folder"}),
    case("output-inside-a-file", ["--out", "{tmp}/file/ds"], "is not writable", files={"file": "not a folder"}),
    case("output-empty", ["--out", ""], "--out: String should have at least 1 character"),
    case("output-of-a-different-recipe", ["--seed", "1"],
         "holds a dataset of a different recipe", before=["--seed", "2"]),
    case("smaller-num-samples-than-the-output-holds", ["--num-samples", "3"], "holds 2 samples outside this plan",
         before=["--num-samples", "5"]),
    # --- following another set's samples (recipe follow)
    case("follow-a-set-of-another-seed", ["--follow", "{tmp}/lead"],
         "follow: {tmp}/lead has another plan: seed 1 there, 0 here", files=followed_set(seed=1)),
    case("follow-a-set-of-other-images", ["--follow", "{tmp}/lead"],
         "follow: {tmp}/lead has another plan: generator.steps 3 there, 10 here",
         files=followed_set(**{"generator.steps": 3, "labeler.score_threshold": 0.3})),
    case("follow-no-dataset", ["--follow", "{tmp}/none"],
         "follow: no dataset at {tmp}/none: manifest.json not found"),
    case("follow-and-drop", ["--follow", "{tmp}/lead", "--labeler.on-missing", "drop"],
         "follow keeps every sample it follows: labeler.on_missing ignore (a missed class leaves every unclaimed "
         "pixel 255), not drop", files=followed_set()),
    # --- recipe files and fields
    case("unknown-recipe-name", ["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe' (known: "),
    case("missing-recipe-file", ["--recipe", "{tmp}/nope.yaml"], "recipe file not found"),
    case("malformed-yaml", ["--recipe", RECIPE], "not valid YAML", recipe="classes: [dog\nper_class: : :\n"),
    case("recipe-not-a-mapping", ["--recipe", RECIPE], "a config is a mapping of fields, got list", recipe="- dog\n"),
    case("recipe-not-text", ["--recipe", RECIPE], "cannot read", files={"recipe.yaml": b"\xff\xfe\x00\x81"}),
    case("unknown-field-typo", ["--recipe", RECIPE], "generater: unknown field (did you mean generator?)",
         recipe="generater: {steps: 2}\n"),
    case("unknown-nested-field", ["--recipe", RECIPE], "generator.stepz: unknown field (did you mean steps?)",
         recipe="generator: {stepz: 2}\n"),
    case("string-for-an-int", ["--recipe", RECIPE],
         "per_class: Input should be a valid integer", recipe="per_class: many\n"),
    case("list-for-a-string", ["--recipe", RECIPE], "generator.model: Input should be a valid string",
         recipe="generator: {model: [a, b]}\n"),
    case("scalar-for-a-section", ["--recipe", RECIPE],
         "labeler: Input should be a valid dictionary", recipe="labeler: 5\n"),
    case("bool-for-an-int", ["--per-class", "true"], "--per-class: Input should be a valid integer"),
    case("fraction-for-an-int", ["--generator.steps", "2.5"], "--generator.steps: Input should be a valid integer"),
    case("number-for-classes", ["--classes", "5"],
         "--classes: Input should be 'all', 'seen' or 'unseen', or a valid list"),
    case("bad-recipe-name", ["--name", "has spaces"], "--name: String should match pattern"),
    # --- command line
    case("unknown-cli-flag", ["--generator.stepz", "3"],
         "unrecognized arguments: --generator.stepz 3 (did you mean --generator.steps?)"),
    case("unknown-cli-flags-without-a-close-one", ["--bogus", "--frobnicate=2"],
         "unrecognized arguments: --bogus --frobnicate=2 (see --help)"),
    case("cli-flag-without-value", ["--seed"], "argument --seed: expected one argument"),
    case("cli-value-of-wrong-type", ["--generator.steps", "many"], "--generator.steps: Input should be a valid integer"),
    # --- numbers out of range
    case("score-threshold-above-1", ["--labeler.score-threshold", "1.5"],
         "--labeler.score-threshold: Input should be less than or equal to 1"),
    case("mask-threshold-below-0", ["--labeler.mask-threshold", "-0.1"],
         "--labeler.mask-threshold: Input should be greater than or equal to 0"),
    case("ignore-threshold-not-below-score", ["--labeler.ignore-threshold", "0.5"],
         "ignore_threshold 0.5 must be below score_threshold"),
    case("ignore-threshold-above-score", ["--labeler.score-threshold", "0.5", "--labeler.ignore-threshold", "0.7"],
         "ignore_threshold 0.7 must be below score_threshold 0.5"),
    case("annotator-threshold-above-1", ["--annotator.threshold", "2"],
         "--annotator.threshold: Input should be less than or equal to 1"),
    case("annotator-checkpoint-and-daam", ["--annotator.checkpoint", "g/best", "--annotator.daam", "true"],
         "annotator: give a grounding checkpoint or daam: true, not both"),
    case("daam-annotator-with-capture", ["--annotator.daam", "true", "--capture.features", "latent"],
         "an annotator makes a segmentation set; capture is for oracle triplet sets"),
    case("guidance-negative", ["--generator.guidance-scale", "-1"],
         "--generator.guidance-scale: Input should be greater than or equal to 0"),
    case("steps-zero", ["--generator.steps", "0"], "--generator.steps: Input should be greater than or equal to 1"),
    case("height-not-a-multiple-of-8", ["--generator.height", "100"],
         "--generator.height: Input should be a multiple of 8"),
    case("width-zero", ["--generator.width", "0"], "--generator.width: Input should be greater than or equal to 16"),
    case("generator-batch-zero", ["--generator.batch-size", "0"],
         "--generator.batch-size: Input should be greater than or equal to 1"),
    case("labeler-batch-zero", ["--labeler.batch-size", "0"],
         "--labeler.batch-size: Input should be greater than or equal to 1"),
    case("pool-min-above-max", ["--pool.min-size", "3", "--pool.max-size", "2"],
         "pool: max_size 2 is smaller than min_size 3"),
    case("pool-size-zero", ["--pool.min-size", "0"], "--pool.min-size: Input should be greater than or equal to 1"),
    case("pool-of-a-stage", ["--labeler.pool.max-size", "2"], "unrecognized arguments: --labeler.pool.max-size"),
    case("jpeg-quality-above-100", ["--writer.jpeg-quality", "101"],
         "--writer.jpeg-quality: Input should be less than or equal to 100"),
    case("jpeg-quality-zero", ["--writer.jpeg-quality", "0"],
         "--writer.jpeg-quality: Input should be greater than or equal to 1"),
    case("unknown-image-format", ["--writer.image-format", "gif"],
         "--writer.image-format: Input should be 'png' or 'jpeg'"),
    case("unknown-dtype", ["--generator.dtype", "float8"], "--generator.dtype: Input should be"),
    case("capture-step-beyond-steps", ["--capture.features", "latent", "--capture.step", "20"],
         "capture.step 20 is beyond generator.steps"),
    # --- pairs and prompt files
    case("pair-with-an-unknown-class", ["--per-pair", "1", "--pairs", "{tmp}/pairs.tsv"],
         "pairs.tsv:2: unknown class 'unicorn'",
         files={"pairs.tsv": PAIRS_HEADER + "dog\tunicorn\t3\n"}),
    case("malformed-pairs-file", ["--per-pair", "1", "--pairs", "{tmp}/pairs.tsv"],
         "pairs.tsv:2: expected 'class_a<TAB>class_b",
         files={"pairs.tsv": PAIRS_HEADER + "dog cat\n"}),
    case("pairs-of-another-vocabulary", ["--per-pair", "1", "--pairs", "{tmp}/pairs.tsv"], "pairs of vocabulary 'coco'",
         files={"pairs.tsv": "# vocabulary: coco\nperson\tdog\n"}),
    case("missing-pairs-file", ["--per-pair", "1", "--pairs", "{tmp}/nope.tsv"], "pairs file not found"),
    case("per-pair-without-pairs", ["--per-pair", "1", "--pairs", "null"], "per_pair > 0 needs pairs"),
    case("prompt-file-with-an-unknown-class", ["--prompts.file", "{tmp}/prompts.txt"],
         "prompts.txt:1: unknown class 'unicorn'",
         files={"prompts.txt": "a {unicorn} on a beach\n"}),
    case("missing-prompt-file", ["--prompts.file", "{tmp}/nope.txt"], "prompts file not found"),
    case("template-without-placeholder", ["--prompts.one", "a photograph"],
         "template 'one' must use 1 positional placeholder"),
    # --- models and checkpoints
    case("missing-generator-model", ["--generator.model", "{tmp}/sd15"],
         "model not found: {tmp}/sd15/model_index.json"),
    case("empty-generator-model", ["--generator.model", ""],
         "--generator.model: String should have at least 1 character"),
    # a generator's family and sizes are read from its saved configs, before any weight loads
    case("unsupported-generator-kind", ["--generator.model", "{tmp}/kandinsky"],
         "generator {tmp}/kandinsky is a KandinskyV22Pipeline, which this factory does not run; supported: "
         "StableDiffusionPipeline (Stable Diffusion 1.x/2); StableDiffusionXLPipeline (SDXL)",
         files={"kandinsky/model_index.json": '{"_class_name": "KandinskyV22Pipeline"}'}),
    case("resolution-the-generator-cannot-take", ["--generator.model", "{tmp}/flux", "--generator.height", "1000"],
         "generator.height 1000 is not a multiple of 16, which FLUX.1 ({tmp}/flux) needs", files=GENERATORS),
    case("capture-on-a-transformer", ["--generator.model", "{tmp}/sd35", "--capture.features", "latent"],
         "capture.features reads a U-Net's features or cross-attention, and Stable Diffusion 3.5 ({tmp}/sd35) is a "
         "diffusion transformer: capture and annotation run on Stable Diffusion 1.x/2, SDXL", files=GENERATORS),
    case("daam-on-a-transformer", ["--generator.model", "{tmp}/flux", "--capture.attention", "true"],
         "capture.attention reads a U-Net's features or cross-attention, and FLUX.1 ({tmp}/flux) is a diffusion "
         "transformer", files=GENERATORS),
    case("annotator-on-a-transformer", ["--generator.model", "{tmp}/flux", "--annotator.checkpoint", "{tmp}/ck",
                                        "--labeler.on-missing", "ignore"],
         "annotator.checkpoint reads a U-Net's features or cross-attention, and FLUX.1 ({tmp}/flux)", files=GENERATORS),
    case("ddim-on-a-flow-model", ["--generator.model", "{tmp}/flux", "--generator.scheduler", "ddim"],
         "generator.scheduler ddim does not apply to FLUX.1 ({tmp}/flux): choose flow", files=GENERATORS),
    case("flow-on-a-unet-model", ["--generator.scheduler", "flow"],
         "generator.scheduler flow does not apply to Stable Diffusion 1.x/2 (tiny): choose ddim, dpm++ or lcm"),
    case("missing-labeler-weights", ["--labeler.weights", "{tmp}/maskrcnn.safetensors"],
         "model not found: {tmp}/maskrcnn.safetensors"),
    case("torchvision-weights-for-the-tiny-labeler", ["--labeler.weights", "torchvision"],
         "weights: torchvision needs a torchvision COCO architecture, not tiny"),
    case("real-labeler-without-weights", ["--labeler.model", "maskrcnn_resnet50_fpn_v2"], "needs weights"),
    case("unknown-labeler-model", ["--labeler.model", "yolo"], "--labeler.model: Input should be 'tiny'"),
    case("missing-quality-model", ["--quality.model", "{tmp}/clip"], "model not found: {tmp}/clip/config.json"),
    case("missing-annotator-checkpoint", ["--annotator.checkpoint", "{tmp}/grounding"],
         "no readable checkpoint at {tmp}/grounding"),
    # --- real images (a build's source, jobs/annotate_images.py)
    case("folder-of-images-without-annotator", ["--source.images", "{tmp}/images", "--capture.features", "latent"],
         "a folder of images has no masks: set annotator.checkpoint to annotate it"),
    case("voc-images-without-capture", ["--source.images", "{tmp}/voc", "--source.format", "voc"],
         "real images with masks make a triplet set: set capture.features"),
    case("daam-on-real-images", ["--source.images", "{tmp}/images", "--annotator.daam", "true"],
         "DAAM reads a generation's attention"),
    case("annotate-unreadable-image", [*ANNOTATE, "--classes", "red disc"],
         "1 of 2 images cannot be read; first: {tmp}/images/b.png:", files=IMAGES, job="annotate_images"),
    case("annotate-unknown-class", [*ANNOTATE, "--classes", "red disc,unicorn"],
         "--classes: unknown class 'unicorn' in vocabulary shapes", job="annotate_images"),
    case("annotate-unknown-class-in-classes-file", [*ANNOTATE, "--classes-file", "{tmp}/classes.json"],
         "{tmp}/classes.json:1: a.png: unknown class 'unicorn' in vocabulary shapes", job="annotate_images",
         files={"images/a.png": PNG, "classes.json": '{"a.png": ["red disc", "unicorn"]}'}),
    case("annotate-image-missing-from-classes-file", [*ANNOTATE, "--classes-file", "{tmp}/classes.json"],
         "1 images have no entry in {tmp}/classes.json (first: b.png)", job="annotate_images",
         files={"images/a.png": PNG, "images/b.png": PNG, "classes.json": '{"a.png": ["red disc"]}'}),
    case("annotate-empty-folder", [*ANNOTATE, "--classes", "red disc"], "no images in {tmp}/images",
         files={"images/notes.txt": "no image here"}, job="annotate_images"),
    case("annotate-missing-folder", [*ANNOTATE, "--classes", "red disc"], "source.images {tmp}/images not found",
         job="annotate_images"),
    case("annotate-folder-of-gif-and-webp", [*ANNOTATE, "--classes", "red disc"],
         "no images in {tmp}/images (.png, .jpg, .jpeg files directly inside it; skipped 2 files not read as images "
         "(1 .gif, 1 .webp; only .png, .jpg, .jpeg are): a.gif, b.webp)",
         files={"images/a.gif": PNG, "images/b.webp": PNG}, job="annotate_images"),
    case("annotate-classes-and-classes-file", [*ANNOTATE, "--classes", "red disc", "--classes-file",
                                               "{tmp}/classes.json"],
         "--classes and --classes-file {tmp}/classes.json both name the images' classes: give one",
         files={"images/a.png": PNG, "classes.json": '{"a.png": ["blue cross"]}'}, job="annotate_images"),
    case("annotate-classes-file-not-found", [*ANNOTATE, "--classes-file", "{tmp}/classes.json"],
         "classes file {tmp}/classes.json not found", files={"images/a.png": PNG}, job="annotate_images"),
    case("annotate-classes-file-not-json", [*ANNOTATE, "--classes-file", "{tmp}/classes.json"],
         "{tmp}/classes.json:2: not JSON: Expecting value", job="annotate_images",
         files={"images/a.png": PNG, "classes.json": '{"a.png":\n ["red disc",]}'}),
    case("annotate-classes-file-string-for-a-list", [*ANNOTATE, "--classes-file", "{tmp}/classes.json"],
         '{tmp}/classes.json:2: a.png: expected a list of class names, found "red disc"', job="annotate_images",
         files={"images/a.png": PNG, "classes.json": '{\n "a.png": "red disc"}'}),
    case("annotate-into-the-images-folder", ["--images", "{tmp}/images", "--out", "{tmp}/images", "--classes",
                                             "red disc"],
         "output {tmp}/images is source.images {tmp}/images: write the dataset to another folder (--out)",
         files={"images/a.png": PNG}, job="annotate_images"),
    case("annotate-inside-the-images-folder", ["--images", "{tmp}/images", "--out", "{tmp}/images/ds", "--classes",
                                               "red disc"],
         "output {tmp}/images/ds is inside source.images {tmp}/images", files={"images/a.png": PNG},
         job="annotate_images"),
    case("annotate-too-many-classes-for-every-image", [*ANNOTATE, "--classes", "all"],
         "20 classes for every image; a sample holds at most 8", files={"images/a.png": PNG}, job="annotate_images"),
    case("annotate-missing-checkpoint", [*ANNOTATE, "--classes", "red disc", "--checkpoint", "{tmp}/grounding"],
         "no readable checkpoint at {tmp}/grounding", files={"images/a.png": PNG}, job="annotate_images"),
    # --- the other jobs share the config and command-line code
    case("train-grounding-unknown-field", ["--config", RECIPE, "--data", "{tmp}/data", "--out", OUT],
         "epochz: unknown field (did you mean epochs?)", recipe="epochz: 3\n", job="train_grounding"),
    case("train-grounding-unknown-flag", ["--epochz", "3"],
         "unrecognized arguments: --epochz 3", job="train_grounding"),
    case("train-grounding-missing-data", ["--data", "{tmp}/data", "--out", OUT],
         "no dataset at {tmp}/data", job="train_grounding"),
    case("train-segmenter-unknown-nested-field", ["--config", RECIPE, "--data", "{tmp}/data", "--out", OUT],
         "model.backbone: unknown field", recipe="model: {backbone: resnet}\n", job="train_segmenter"),
    case("train-segmenter-unknown-flag", ["--iteratons", "3"],
         "unrecognized arguments: --iteratons 3 (did you mean --iterations?)", job="train_segmenter"),
    case("train-segmenter-zero-shot-on-class-lists-from-ground-truth", [*SEGMENTER, "--setting", "transductive"],
         "annotated: which images show unseen classes dog (split 1) comes from the source's ground truth (its masks "
         "or tags); this is not zero-shot. Train on generated images or your own class lists, or pass --setting "
         "supervised", files=annotated_set("ground_truth", ["cat", "dog"]), job="train_segmenter"),
    case("train-segmenter-inductive-on-prompts-naming-unseen-classes", [*SEGMENTER, *INDUCTIVE],
         "annotated: its prompts name unseen classes dog (split 1); the inductive setting sees no unseen class name "
         "in training. Build the set from the seen classes (classes: seen), or pass --setting transductive",
         files=annotated_set("prompt", ["cat", "dog"]), job="train_segmenter"),
    case("eval-grounding-missing-checkpoint",
         ["--checkpoints", "{1: {tmp}/ck}", "--data", "{tmp}/data", "--out", "{tmp}/out/r.json"],
         "no readable checkpoint at {tmp}/ck", job="eval_grounding"),
    case("eval-grounding-missing-argument", ["--checkpoints", "{1: {tmp}/ck}"],
         "--data: Field required", job="eval_grounding"),
    case("eval-grounding-one-checkpoint-for-all-splits", ["--checkpoint", "{tmp}/ck", "--data", "{tmp}/data"],
         "--checkpoints: one checkpoint per split, as a mapping: '{1: URI, 2: URI, 3: URI}'", job="eval_grounding"),
    case("eval-zs3-missing-checkpoint",
         ["--checkpoint", "{tmp}/ck", "--format", "voc", "--root", "{tmp}/voc", "--out", "{tmp}/out/r.json"],
         "no readable checkpoint at {tmp}/ck", job="eval_zs3"),
    case("eval-zs3-unknown-format", ["--checkpoint", "{tmp}/ck", "--format", "ade", "--root", "{tmp}/voc"],
         "--format: Input should be 'voc' or 'coco'", job="eval_zs3"),
]


def _refuse(*args, **kwargs):
    raise AssertionError("a model loaded or Ray started although the input was bad")


@pytest.fixture
def no_models(monkeypatch):
    """Model loaders and Ray raise: bad input must be refused before any of them runs."""
    for module, name in ((ray, "init"), (pipeline, "stream_samples"), (generate, "load_pipeline"),
                         (tiny, "tiny_pipeline"), (label, "load_detector"), (quality, "load_clip"),
                         (clip, "tiny_clip")):
        monkeypatch.setattr(module, name, _refuse)


def earlier_run(args: list[str], out: Path) -> None:
    """What an earlier build leaves in `out`: build.json and a commit record of its whole plan (as
    dropped samples, which need no Parquet file and no model)."""
    argv = ["--recipe", "tiny", *args, "--out", str(out)]
    earlier = build_dataset.recipe_from_args(build_dataset.parse_args(argv))
    prepared = pipeline.prepare_build(earlier)
    ids = [sample.sample_id for sample in prepared.plan]
    commit = Commit(part_name(ids), None, 0, 0, None, written=[], dropped=dict.fromkeys(ids, "not found"))
    prepared.location.write_bytes(f"{COMMIT_DIR}/{commit.name}.json", commit.to_json())


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def error_line(job: str, argv: list[str], capsys) -> str:
    """Runs the job in-process; asserts exit code 2 and one error line of the job; returns it."""
    assert JOBS[job].main(argv) == 2
    captured = capsys.readouterr()
    # Only the job's own lines: a Ray started by other tests of the session may log from its threads.
    lines = [line for line in captured.err.splitlines() if line.startswith(job)]
    assert len(lines) == 1 and lines[0].startswith(f"{job}: error: "), captured.err
    assert "Traceback" not in captured.err and not captured.out
    return lines[0]


@pytest.mark.parametrize("job, args, expect, files, before", CASES)
def test_bad_input_is_one_line_before_any_model_and_writes_nothing(job, args, expect, files, before, tmp_path,
                                                                    monkeypatch, capsys, no_models):
    monkeypatch.chdir(tmp_path)  # a default output (outputs/<name>) would land here and be seen
    (tmp_path / "models").symlink_to(REPO / "models")  # as in the repository root, where the recipes name models/
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if job == "build_dataset" and "--out" not in args:
        argv += ["--out", OUT.replace("{tmp}", str(tmp_path))]
    if job == "build_dataset" and "--recipe" not in args:  # the cases are of the tiny VOC recipe
        argv = ["--recipe", "tiny", *argv]
    if before is not None:
        earlier_run(before, tmp_path / "out")
    files_before = snapshot(tmp_path)

    line = error_line(job, argv, capsys)

    assert expect.replace("{tmp}", str(tmp_path)) in line
    assert snapshot(tmp_path) == files_before


# ------------------------------------------------------------------ S3 outputs

def test_missing_bucket_is_refused_before_any_model(s3_endpoint, no_models, capsys):
    line = error_line("build_dataset", ["--out", "s3://no-such-bucket/ds"], capsys)
    assert line == "build_dataset: error: bucket 'no-such-bucket' does not exist"


def test_unreachable_endpoint_is_refused_fast(s3_endpoint, no_models, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    storage.s3_filesystem.cache_clear()
    try:
        line = error_line("build_dataset", ["--out", "s3://any-bucket/ds"], capsys)
    finally:
        storage.s3_filesystem.cache_clear()
    assert line.startswith("build_dataset: error: cannot reach bucket 'any-bucket'")


def test_bad_recipe_with_an_s3_output_writes_nothing_there(bucket, s3_endpoint, no_models, capsys):
    line = error_line("build_dataset", ["--out", f"s3://{bucket}/ds", "--generator.model", "/nonexistent/sd15"], capsys)
    assert "model not found: /nonexistent/sd15/model_index.json" in line
    assert boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["KeyCount"] == 0


# ------------------------------------------------------------- the real script

@pytest.mark.slow  # two fresh interpreters import torch, diffusers and Ray: about 10 CPU seconds each
def test_the_script_prints_one_line_and_no_traceback(tmp_path):
    """As a user runs it: a separate Python process, its own exit code and stderr."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("generator: {steps: 2}\nlabeler: {score_treshold: 0.3}\n")
    commands = {"unknown-flag": ["--generater.steps", "2"],
                "unknown-field": ["--recipe", str(recipe)]}
    out = tmp_path / "out"
    script = [sys.executable, str(REPO / "jobs" / "build_dataset.py"), "--out", str(out)]
    running = {name: subprocess.Popen([*script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=tmp_path)
               for name, args in commands.items()}  # side by side: each spends its time importing torch and Ray
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr)
    for name, (code, stdout, stderr) in results.items():
        assert code == 2 and stdout == "", (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("build_dataset: error: "), (name, stderr)
    assert "--generater.steps 2 (did you mean --generator.steps?)" in results["unknown-flag"][2]
    assert "labeler.score_treshold: unknown field (did you mean score_threshold?)" in results["unknown-field"][2]
    assert not out.exists()
