"""Derive the co-appearing category pairs from real PASCAL VOC or COCO annotations.

Writes a TSV pair file (see factory.pairs.save_pairs) that the rest of the
factory reads with factory.pairs.load_pairs.
"""

from __future__ import annotations

import argparse
import sys

from factory.pairs import (pairs_from_coco, pairs_from_voc_annotations,
                           pairs_from_voc_segmentation, read_image_ids, save_pairs)
from factory.vocab import COCO, VOC

EXAMPLES = """\
examples:
  python jobs/derive_pairs.py --voc-annotations VOCdevkit/VOC2012/Annotations \\
      --image-list VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt --out pairs/voc.tsv
  python jobs/derive_pairs.py --voc-segmentation VOCdevkit/VOC2012/SegmentationClass \\
      --out pairs/voc.tsv
  python jobs/derive_pairs.py --coco-instances annotations/instances_train2017.json \\
      --min-images 2 --out pairs/coco.tsv

The output has one 'class_a<TAB>class_b<TAB>images' line per pair, where images is
the number of images in which both classes occur. The papers report 142 pairs for
PASCAL VOC and 1,559 for COCO (COCO without "mouse").
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="derive_pairs.py", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--voc-annotations", metavar="DIR",
                        help="VOC Annotations directory of <id>.xml files")
    source.add_argument("--voc-segmentation", metavar="DIR",
                        help="VOC SegmentationClass directory of <id>.png label maps")
    source.add_argument("--coco-instances", metavar="JSON",
                        help="COCO instances_*.json file")
    parser.add_argument("--image-list", metavar="FILE",
                        help="VOC ImageSets file: use only the listed image ids "
                             "(default: every file in the directory)")
    parser.add_argument("--min-images", type=int, default=1, metavar="N",
                        help="keep pairs that occur in at least N images (default: 1)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output pair file (TSV), e.g. pairs/voc.tsv")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_list and args.coco_instances:
        parser.error("--image-list applies only to --voc-annotations/--voc-segmentation")
    if args.min_images < 1:
        parser.error("--min-images must be at least 1")

    try:
        image_ids = read_image_ids(args.image_list) if args.image_list else None
        if args.coco_instances:
            vocabulary, source = COCO, f"coco-instances {args.coco_instances}"
            counts = pairs_from_coco(args.coco_instances)
        elif args.voc_annotations:
            vocabulary, source = VOC, f"voc-annotations {args.voc_annotations}"
            counts = pairs_from_voc_annotations(args.voc_annotations, image_ids)
        else:
            vocabulary, source = VOC, f"voc-segmentation {args.voc_segmentation}"
            counts = pairs_from_voc_segmentation(args.voc_segmentation, image_ids)
    except (OSError, ValueError) as exc:
        print(f"derive_pairs: error: {exc}", file=sys.stderr)
        return 2

    if args.image_list:
        source += f", images listed in {args.image_list}"
    source += f", min-images {args.min_images}"
    kept = {pair: n for pair, n in counts.items() if n >= args.min_images}
    if not kept:
        print(f"derive_pairs: error: no pairs found in at least {args.min_images} images "
              f"({source})", file=sys.stderr)
        return 2

    try:
        save_pairs(args.out, kept, vocabulary, source)
    except OSError as exc:
        print(f"derive_pairs: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    covered = {name for pair in kept for name in pair}
    print(f"{len(kept)} pairs covering {len(covered)} of {len(vocabulary)} "
          f"{vocabulary.name} classes written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
