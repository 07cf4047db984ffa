"""Triplet sources (grounding/data.py): what a dataset must hold to train or test the module."""

from __future__ import annotations

import json

import pytest

from factory.dataset.source import DatasetError
from grounding.data import TripletSource


@pytest.mark.parametrize("capture", [None, {"features": "none", "attention": True, "dtype": "float16", "shapes": {}}],
                         ids=["nothing-captured", "heat-maps-only"])
def test_a_set_without_unet_features_is_refused_in_one_line(capture, tmp_path):
    manifest = {"recipe": {}, "vocabulary": {"name": "voc"}, "capture": capture,
                "files": [{"path": "data/part-a.parquet", "rows": 1, "bytes": 1}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="has no U-Net capture columns") as error:
        TripletSource.open(str(tmp_path))
    assert "\n" not in str(error.value)
