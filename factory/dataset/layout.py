"""Where things are in a dataset folder (local or s3://).

    build.json                 the recipe that claimed the output (written first)
    data/part-<hash>.parquet   the samples; <hash> is derived from the part's sample ids
    _commits/part-<hash>.json  written after its Parquet file: ids written and dropped,
                               row count, size, sha256, stage timings
    manifest.json              written when the plan is complete: a dataset exists from then on
    preview.png                a grid of samples with their masks
    README.md                  the dataset card
"""

FORMAT = "dataset-factory/1"
BUILD_FILE = "build.json"
DATA_DIR = "data"
COMMIT_DIR = "_commits"
MANIFEST_FILE = "manifest.json"
PREVIEW_FILE = "preview.png"
CARD_FILE = "README.md"
