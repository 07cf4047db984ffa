"""Annotate real, unlabelled images with a trained grounding module: images -> segmentation dataset.

    python jobs/annotate_images.py             # the drawn benchmark: jobs/draw_benchmark.py --out data/shapes-voc
    python jobs/annotate_images.py --images photos/ --classes "red disc,blue cross" --checkpoint ckpt/best
    python jobs/annotate_images.py --images s3://bucket/photos --classes-file classes.json --route noised \\
        --checkpoint s3://bucket/grounding/best --out s3://bucket/annotated

Each image goes into the generator's U-Net by DDIM inversion (--route inversion: faithful, 2 x steps
U-Net calls) or by one pass on its noised latent (--route noised: fast), and the module labels it
from those features. The output is a factory dataset (label maps, masks, scores, card, preview,
manifest), resumed by running the same command again. Every --section.field of the recipe applies.
With --images and a class list (--classes), every image is asked about every class, and a class
the module does not find is taken as absent (--annotator.on-missing absent); --classes-file names each
image's classes instead. An image is known by its file name and content: adding images to the folder
and running again annotates just the new ones. Images of another shape than the generator's are
squashed to it (--source.resize squash, the default), or centre-cropped (crop) or padded (pad); each
row records the original size.
"""

from __future__ import annotations

import argparse
import sys

from factory.pipeline.pipeline import prepare_build, run_build
from factory.pipeline.recipe import Recipe, RecipeError, add_recipe_arguments, load_recipe
from factory.core.cli import add_verbose_argument, run_job, setup_output
from factory.core.options import job_parser, overrides_from_args

DEFAULT_RECIPE = "shapes-annotate"
SHORTCUTS = {"images": "source.images", "classes_file": "source.classes_file", "route": "source.route",
             "checkpoint": "annotator.checkpoint"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__)
    add_recipe_arguments(parser)
    add_verbose_argument(parser)
    parser.set_defaults(recipe=DEFAULT_RECIPE)
    shortcuts = parser.add_argument_group("shortcuts")
    shortcuts.add_argument("--images", help="a folder or s3:// prefix of image files (--source.images with "
                           "--source.format folder; a VOC or COCO root or a factory dataset: those two options)")
    shortcuts.add_argument("--classes-file", help="--source.classes_file: JSON {image file name: [class names]}")
    shortcuts.add_argument("--route", choices=("inversion", "noised"), help="--source.route")
    shortcuts.add_argument("--checkpoint", help="--annotator.checkpoint: the grounding module")
    return parser.parse_args(argv)


def annotate(argv: list[str] | None) -> int:
    args = parse_args(argv)
    setup_output(args.verbose)
    overrides = overrides_from_args(args, Recipe)
    overrides.update({field: getattr(args, name) for name, field in SHORTCUTS.items() if getattr(args, name)})
    if args.images:
        overrides["source.format"] = "folder"
        if not args.classes_file:
            overrides.setdefault("annotator.on_missing", "absent")
    recipe = load_recipe(args.recipe, overrides)
    if recipe.source.classes_file and "classes" in overrides:
        raise RecipeError(f"--classes and --classes-file {recipe.source.classes_file} both name the images' "
                          f"classes: give one")
    if not recipe.source.enabled or not recipe.annotator.checkpoint:
        raise RecipeError("annotating needs images (--images) and a grounding module (--checkpoint)")
    prepared = prepare_build(recipe)
    for note in prepared.notes:
        print(f"note: {note}")
    print(run_build(prepared).report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("annotate_images", annotate, argv,
                   storage_failure="committed parts are kept; the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
