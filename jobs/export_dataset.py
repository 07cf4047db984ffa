"""Export a finished dataset for other tools.

    python jobs/export_dataset.py outputs/tiny --format mmseg --out exports/tiny-mmseg
    python jobs/export_dataset.py s3://bucket/datasets/voc-oracle --format coco --coco-masks class \\
        --out s3://bucket/exports/voc-oracle-coco

Formats: ``mmseg`` (img_dir/ann_dir/splits, metainfo.json, dataset_config.py and
maskformer_config.py for mmsegmentation 1.x), ``coco`` (train/, val/,
annotations/instances_{train,val}.json with RLE masks per instance or per class) and
``folders`` (images/, masks/ index PNGs, classes.txt). The train/val split is fixed by a
hash of each sample id. A non-empty target is refused unless --overwrite. Exit code 0 on
success, 2 when the dataset or the target cannot be used, 1 when storage fails midway.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from factory.export import ExportError, ExportOptions, export_dataset
from factory.options import one_line
from factory.reader import DatasetError, DatasetSource
from factory.storage import first_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="the dataset: a local folder or s3://bucket/prefix")
    parser.add_argument("--format", required=True, choices=["mmseg", "coco", "folders"])
    parser.add_argument("--out", required=True, help="a local folder or s3://bucket/prefix to write")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of samples in the val split, by sample-id hash (default: 0.1)")
    parser.add_argument("--coco-masks", choices=["instance", "class"], default="instance",
                        help="coco: one annotation per 8-connected region of a class mask, or per class")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty target")
    args = parser.parse_args(argv)
    try:
        options = ExportOptions(format=args.format, out=args.out, val_fraction=args.val_fraction,
                                coco_masks=args.coco_masks, overwrite=args.overwrite)
        summary = export_dataset(DatasetSource.open(args.uri), options)
    except ValidationError as exc:
        print(f"export_dataset: {one_line(exc)}", file=sys.stderr)
        return 2
    except (DatasetError, ExportError) as exc:
        print(f"export_dataset: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # storage failing mid-export: a local target is left untouched
        print(f"export_dataset: export failed: {first_line(exc)}", file=sys.stderr)
        return 1
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
