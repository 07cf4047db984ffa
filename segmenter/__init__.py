"""The Protocol-II segmenter: MaskFormer trained on synthetic sets (Ray Train), real VOC and
COCO readers, and zero-shot evaluation (seen, unseen and harmonic mIoU)."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "checkpoint": ("load_segmenter_checkpoint", "save_segmenter_checkpoint"),
    "config": ("SegmenterModelConfig", "SegmenterTrainConfig", "ZS3EvalOptions"),
    "evaluate": ("prepare_evaluation", "run_evaluation"),
    "metrics": ("ConfusionMatrix", "zs3_scores"),
    "model": ("Segmenter",),
    "train": ("prepare_training", "run_training"),
})
