"""Tiny random generators of every family, built in code as diffusers' own tests build them.

Each has its family's structure (text encoders, tokenizers, U-Net or transformer, VAE, scheduler) at
miniature sizes, 64x64 images, weights from a seed alone. ``tiny_pipeline()`` is the recipe's
``tiny`` generator; ``save_tiny_pipeline`` writes any family as a saved diffusers folder, which the
tests then load through the same path as a real SDXL, SD 3.5 or FLUX.1 (``load_pipeline``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from factory.core.vocab import COCO, VOC
from factory.diffusion.families import FLUX, SD, SD3, SDXL, Family
from factory.diffusion.schedulers import sd_scheduler

PROMPT_WORDS = frozenset({"a", "photograph", "of", "and"})  # the recipes' default templates


def tiny_tokenizer() -> CLIPTokenizer:
    """The tiny generator's tokenizer: the template words and every VOC and COCO class word."""
    words = set(PROMPT_WORDS)
    for info in VOC.classes + COCO.classes:
        words.update(info.natural.split())
    return bpe_tokenizer(words)


def bpe_tokenizer(words: set[str], max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE tokenizer whose merges spell out `words`.

    Every byte is a token, so any text encodes; each of `words` is a single token, like
    most words are in CLIP's real vocabulary. Prompts are padded to `max_length` tokens.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    # BPE applies merges by rank, not left to right, so per-word merge chains collide
    # ("photograph" came out in 7 pieces): learn the merges as BPE training does instead,
    # most frequent pair first, until every word is one symbol.
    segments = [list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(words)]
    merges = []
    while pairs := Counter(pair for parts in segments for pair in zip(parts, parts[1:])):
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for parts in segments:
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == best:
                    parts[i:i + 2] = [parts[i] + parts[i + 1]]
                i += 1
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer for the tiny T5 encoders: each template and class word one piece, and every
    letter of them, so other words spell out (unknown characters become <unk>)."""
    words = _tiny_words()
    letters = sorted({c for word in words for c in word})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + word, -1.0) for word in sorted(words)] + [(c, -10.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_words() -> set[str]:
    words = set(PROMPT_WORDS)
    for info in VOC.classes + COCO.classes:
        words.update(info.natural.split())
    return words


def _clip_text(tokenizer: CLIPTokenizer, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_text(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id))


def _vae(**scaling) -> AutoencoderKL:
    """64x64 images, 32x32x4 latents (SD's 8x downsampling would leave too few latent pixels)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=64, **scaling)


def _tiny_sd() -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    text_encoder = _clip_text(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL's structure: CLIP-L-like and OpenCLIP-like encoders whose penultimate states are concatenated
    (32 + 32 = 64 wide), the second's pooled projection and the image sizes as extra conditioning
    (``addition_embed_type="text_time"``), a first block without attention, linear projections."""
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)  # pooled text + six size ids of 8 each
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip_text(tokenizer), text_encoder_2=_clip_text(tokenizer, projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))


def _tiny_sd3() -> StableDiffusion3Pipeline:
    """SD 3.5's structure: two CLIP encoders and a T5, an MMDiT over 2x2 patches, a shifted flow schedule."""
    tokenizer, t5 = tiny_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, text_encoder=_clip_text(tokenizer, projection=True),
        text_encoder_2=_clip_text(tokenizer, projection=True), text_encoder_3=_t5_text(t5), tokenizer=tokenizer,
        tokenizer_2=tokenizer, tokenizer_3=t5, vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _tiny_flux() -> FluxPipeline:
    """FLUX.1-dev's structure: a CLIP (pooled) and a T5 (sequence), double- and single-stream blocks over
    2x2-packed latents, rotary positions, an embedded (distilled) guidance scale, a resolution-dependent shift."""
    tokenizer, t5 = tiny_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True)
    return FluxPipeline(
        transformer=transformer, text_encoder=_clip_text(tokenizer), text_encoder_2=_t5_text(t5), tokenizer=tokenizer,
        tokenizer_2=t5, vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096))


BUILDERS = {SD: _tiny_sd, SDXL: _tiny_sdxl, SD3: _tiny_sd3, FLUX: _tiny_flux}


def tiny_pipeline(seed: int = 0, family: Family = SD):
    """A random miniature of ``family`` with its structure (64x64 images, 32x32 latents).

    Its weights come from `seed` alone; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[family]()


def save_tiny_pipeline(folder: str | Path, family: Family, seed: int = 0) -> str:
    """``tiny_pipeline(seed, family)`` saved as a diffusers folder (safetensors); returns its path."""
    tiny_pipeline(seed, family).save_pretrained(folder, safe_serialization=True)
    return str(folder)
