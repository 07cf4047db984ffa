"""The Parquet schema of a dataset's rows, and the feature metadata that `datasets` reads.

Images are stored as Hugging Face `Image` structs {bytes, path}, so image viewers, pandas and
`datasets` all read them without our code. Optional columns (U-Net capture, DAAM heat maps,
quality scores; ``factory.dataset.batch.OPTIONAL_COLUMNS``) follow the schema's columns.
"""

from __future__ import annotations

import json

import pyarrow as pa

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("index", pa.int64()),
    ("prompt", pa.string()),
    ("classes", pa.list_(pa.string())),
    ("class_words", pa.list_(pa.string())),
    ("class_indices", pa.list_(pa.int16())),
    ("seed", pa.int64()),
    ("image", IMAGE),
    ("label", IMAGE),
    ("masks", pa.list_(IMAGE)),
    ("scores", pa.list_(pa.float32())),
    ("instances", pa.list_(pa.int16())),
    ("found", pa.list_(pa.bool_())),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("generator", pa.string()),
    ("labeler", pa.string()),
])

# How `datasets` names Arrow types whose Value dtype differs from pyarrow's name for them.
_HF_DTYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}


def _hf_feature(dtype: pa.DataType) -> dict:
    if dtype == IMAGE:
        return {"_type": "Image"}  # decodes to PIL; label maps keep mode "P" (their indices)
    if pa.types.is_list(dtype):
        return {"feature": _hf_feature(dtype.value_type), "_type": "List"}
    return {"dtype": _HF_DTYPES.get(str(dtype), str(dtype)), "_type": "Value"}


def huggingface_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """Parquet schema metadata from which `datasets.load_dataset("parquet", ...)` takes its
    features: image, label and masks as `Image`, lists as `List`, capture tensors as binary."""
    features = {field.name: _hf_feature(field.type) for field in schema}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
