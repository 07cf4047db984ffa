"""Derive the co-appearing category pairs from real PASCAL VOC or COCO annotations.

    python jobs/derive_pairs.py --voc-annotations VOCdevkit/VOC2012/Annotations \
        --image-list VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt --out pairs/voc.tsv
    python jobs/derive_pairs.py --voc-segmentation VOCdevkit/VOC2012/SegmentationClass --out pairs/voc.tsv
    python jobs/derive_pairs.py --coco-instances annotations/instances_train2017.json \
        --min-images 2 --out pairs/coco.tsv

Writes one 'class_a<TAB>class_b<TAB>images' line per pair (factory.core.pairs.save_pairs), where
images is the number of images in which both classes occur; recipes read it as their `pairs`.
The papers report 142 pairs for PASCAL VOC and 1,559 for COCO (COCO without "mouse").
"""

from __future__ import annotations

import sys

from factory.core.cli import run_job
from factory.core.options import ConfigError, parse_options
from factory.core.pairs import DerivePairsOptions, derive_pairs


def derive(argv: list[str] | None) -> int:
    options = parse_options(DerivePairsOptions, argv, __doc__)
    try:
        kept, vocabulary = derive_pairs(options)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    covered = {name for pair in kept for name in pair}
    print(f"{len(kept)} pairs covering {len(covered)} of {len(vocabulary)} "
          f"{vocabulary.name} classes written to {options.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("derive_pairs", derive, argv)


if __name__ == "__main__":
    sys.exit(main())
