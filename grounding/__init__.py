"""The grounding module: U-Net features + class-word text embeddings -> one mask per class; its
training on triplets of seen classes (Ray Train), its checkpoints, and Protocol-I evaluation."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "checkpoint": ("check_generation", "load_grounding_checkpoint", "read_grounding_metadata",
                   "save_grounding_checkpoint", "training_generation"),
    "config": ("GroundingEvalOptions", "GroundingModelConfig", "GroundingTrainConfig", "TextConfig"),
    "data": ("Featurizer", "TripletSource"),
    "evaluate": ("prepare_evaluation", "run_evaluation"),
    "metrics": ("IoUCounts", "PresenceCounts", "ProtocolIAccumulator"),
    "model": ("GroundingModule",),
    "train": ("prepare_training", "run_training"),
})
