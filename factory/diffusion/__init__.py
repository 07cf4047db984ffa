"""Diffusion internals: the generator families (Stable Diffusion 1.x/2, SDXL, SD 3.5, FLUX.1), their
pipelines (real and tiny), samplers and fast paths, one generation call (denoise, decode), U-Net feature
capture, class-word token positions, DAAM cross-attention maps and the CLIP quality score."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "clip": ("QualityScorer", "load_clip", "select_top_fraction"),
    "daam": ("DAAM_THRESHOLD", "CrossAttentionRecorder", "daam_masks"),
    "families": ("FAMILIES", "read_generator"),
    "fast": ("apply_fast_paths",),
    "features": ("FeatureCapture", "unet_features"),
    "pipelines": ("decode", "denoise", "encode_texts", "generate", "load_pipeline", "unet_conditioning"),
    "schedulers": ("make_scheduler",),
    "steps": ("capture_call_index", "reference_timestep"),
    "tiny": ("save_tiny_pipeline", "tiny_pipeline"),
    "tokens": ("class_embeddings", "class_token_positions"),
})
