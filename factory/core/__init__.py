"""The shared base every layer uses: storage, typed options, errors, vocabularies, pairs,
checkpoints, devices, model start-up and Ray plumbing."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "checkpoints": ("CheckpointError", "read_checkpoint_metadata", "read_tensors", "save_checkpoint"),
    "cli": ("run_job",),
    "cluster": ("actor_resources", "cluster_gpus", "map_positions"),
    "conventions": ("BACKGROUND", "IGNORE", "TINY", "is_held_out"),
    "devices": ("pick_device", "pick_dtype"),
    "distributed": ("all_reduce_mean", "fit"),
    "errors": ("FactoryError",),
    "loading": ("ModelLoadError", "load_with_retries"),
    "options": ("ConfigError", "parse_config", "parse_options", "positional"),
    "pairs": ("load_pairs", "save_pairs"),
    "storage": ("Location", "StorageError", "check_reachable", "open_location", "write_file"),
    "vocab": ("COCO", "VOC", "ClassInfo", "Vocabulary", "define_vocabulary", "get_vocabulary"),
    "vocab_files": ("read_vocabulary",),
})
