"""The dataset format and its consumers: the folder layout, the Parquet schema, the batch that
passes between model stages, image codecs, writing with commit records, reading (PyTorch,
Ray Data), the card, the preview, exports, inspection and verification."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "batch": ("SampleLabels", "attach_labels", "check_batch"),
    "codec": ("decode_image", "decode_label", "decode_masks", "encode_label"),
    "export": ("ExportOptions", "export_dataset"),
    "inspection": ("InspectOptions", "inspect", "write_inspection"),
    "reader": ("IterableSegmentationDataset", "SegmentationDataset", "read_dataset"),
    "real": ("COCOSemantic", "VOCSegmentation", "real_dataset"),
    "schema": ("SCHEMA",),
    "source": ("DatasetError", "DatasetSource"),
    "verify": ("Verifier", "VerifyOptions"),
    "write": ("Commit", "encode_batch", "write_part"),
})
