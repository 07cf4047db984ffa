"""Export a finished dataset for other tools.

    python jobs/export_dataset.py outputs/tiny --format mmseg --out exports/tiny-mmseg
    python jobs/export_dataset.py s3://bucket/datasets/voc-oracle --format coco --coco-masks class \
        --out s3://bucket/exports/voc-oracle-coco

Formats: ``mmseg`` (img_dir/ann_dir/splits, metainfo.json, dataset_config.py and
maskformer_config.py for mmsegmentation 1.x), ``coco`` (train/, val/,
annotations/instances_{train,val}.json with RLE masks per instance or per class) and
``folders`` (images/, masks/ index PNGs, classes.txt). The train/val split is fixed by a
hash of each sample id. A non-empty target is refused unless --overwrite. Exit code 0 on
success, 2 when the dataset or the target cannot be used, 1 when storage fails midway.
"""

from __future__ import annotations

import sys

from factory.core.cli import run_job
from factory.core.options import parse_options
from factory.core.storage import first_line
from factory.dataset.export import ExportOptions, export_dataset
from factory.dataset.source import DatasetSource


def export(argv: list[str] | None) -> int:
    options = parse_options(ExportOptions, argv, __doc__)
    source = DatasetSource.open(options.dataset)
    try:
        summary = export_dataset(source, options)
    except OSError as exc:  # storage failing mid-export: a local target is left untouched
        print(f"export_dataset: export failed: {first_line(exc)}", file=sys.stderr)
        return 1
    print(summary.report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("export_dataset", export, argv)


if __name__ == "__main__":
    sys.exit(main())
