"""Train the mini world's Stable Diffusion from scratch on a CPU: the generator of `shapes` recipes.

The same classes as Stable Diffusion 1.5 (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel, CLIPTokenizer, DDIM), miniature sizes, trained in two stages
on drawings of all 20 classes with their prompts (Stable Diffusion saw every class too):

1. the VAE: 64x64x3 <-> 16x16x4, L1 reconstruction plus a small KL term; its latent scale
   is then measured and stored as ``scaling_factor``, as SD's 0.18215 was;
2. the U-Net and the text encoder together, on the frozen VAE's latents: epsilon prediction
   with min-SNR weighting, the prompt dropped for 10% of samples (classifier-free guidance),
   an exponential moving average of the weights kept for sampling.

Training state lives in ``work`` (one checkpoint folder, ``factory.core.checkpoints``) and a
rerun continues from it up to the configured steps. ``init`` starts a new run from an exported
pipeline's weights instead (its VAE kept, stage 1 skipped): training a shipped generator further
once its training state is gone; the card keeps that pipeline's own record. ``out`` receives the EMA weights as a
diffusers pipeline folder (``save_pretrained``, safetensors), which recipes load by path
exactly as they load SD 1.5, with a loss plot, sample grid and model card beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from factory.core.checkpoints import (
    check_same_run,
    load_optimizer_state,
    read_checkpoint_metadata,
    read_tensors,
    save_checkpoint,
)
from factory.core.devices import pick_device
from factory.core.vocab import SHAPE_COLOURS, SHAPE_FORMS, SHAPES
from factory.diffusion.pipelines import generate
from factory.diffusion.schedulers import sd_scheduler
from factory.diffusion.tiny import PROMPT_WORDS, bpe_tokenizer
from world.draw import SIZE, draw
from world.evaluate import generator_quality
from world.oracle import load_oracle
from world.utils import EMA, TrainingLog, class_draws, image_grid, prompt_of, psnr, write_card

KIND = "world-generator-training/1"
LATENT = SIZE // 4  # three VAE blocks: two downsamplings


class GeneratorTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field("models/shapes-generator", description="the pipeline folder written at each save")
    work: str = Field("runs/shapes-generator", description="the resumable training state")
    seed: int = Field(0, description="seeds the initial weights and every drawn batch")
    init: str | None = Field(None, description="an exported generator pipeline folder whose weights start the "
                             "run (its VAE is kept and stage 1 skipped); None trains from scratch")
    vae_steps: int = Field(3000, ge=0, description="VAE steps (stage 1; the rate drops 5x for the last third)")
    unet_steps: int = Field(20000, ge=0, description="U-Net + text encoder steps (stage 2)")
    batch_size: int = Field(16, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    lr: float = Field(6e-4, gt=0, description="U-Net and text encoder learning rate (after 200 warm-up steps)")
    two_objects: float = Field(0.5, ge=0, le=1, description="fraction of two-object drawings")
    train_text_encoder: bool = Field(True, description="train the text encoder with the U-Net in stage 2; false "
                                     "keeps it as it starts (from `init`: the class words' embeddings unchanged)")
    uncond: float = Field(0.1, ge=0, le=1, description="fraction of prompts dropped (guidance training)")
    snr_gamma: float = Field(5.0, gt=0, description="min-SNR loss weighting")
    ema_decay: float = Field(0.999, gt=0, lt=1)
    save_every: int = Field(500, ge=1, description="steps between checkpoints (and pipeline exports)")
    oracle: str = Field("models/shapes-oracle/model.safetensors", description="the oracle that measures each "
                        "export (objects of the prompted classes found); skipped while it does not exist")
    quality_images: int = Field(100, ge=1, description="one-object and two-object images of each measurement")
    sample_steps: int = Field(25, ge=1, description="DDIM steps of the sample grid and of each quality measurement "
                              "(the recipes' 25)")


# Changing these makes a different run: its training state is not resumed.
_RUN_IDENTITY = ("seed", "init", "batch_size", "vae_lr", "lr", "two_objects", "train_text_encoder", "uncond",
                 "snr_gamma", "ema_decay")


def build_components(seed: int) -> dict[str, nn.Module]:
    """The untrained generator: VAE, U-Net, text encoder (the tokenizer is ``world_tokenizer``)."""
    tokenizer = world_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=64,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(48, 96, 96), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet}


def world_tokenizer():
    """CLIP's tokenizer class, whose words are the templates' and the world's (16 tokens a prompt)."""
    return bpe_tokenizer(set(PROMPT_WORDS) | set(SHAPE_COLOURS) | set(SHAPE_FORMS), max_length=16)


def drawn_batch(seed: int, step: int, size: int, two_objects: float) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, 64, 64) images in [-1, 1] and their prompts; a function of (seed, step) alone."""
    images, prompts = [], []
    for classes, draw_seed in class_draws(seed, step, size, two_objects):
        image, _ = draw(classes, draw_seed, "training")
        images.append(image)
        prompts.append(prompt_of(classes))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, prompts


class GeneratorTraining:
    """Both stages, resumable. ``run()`` continues from ``work`` up to the configured steps."""

    def __init__(self, config: GeneratorTrainConfig):
        self.config = config
        self.device = pick_device()
        self.parts = {k: v.to(self.device) for k, v in build_components(config.seed).items()}
        self.tokenizer = world_tokenizer()
        self.ema = EMA(nn.ModuleDict({k: self.parts[k] for k in ("unet", "text_encoder")}), config.ema_decay)
        self.log = TrainingLog()
        self.vae_step = self.unet_step = 0
        self.vae_optimizer = torch.optim.AdamW(self.parts["vae"].parameters(), lr=config.vae_lr, weight_decay=0.0)
        trained = list(self.parts["unet"].parameters())
        if config.train_text_encoder:
            trained += list(self.parts["text_encoder"].parameters())
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=1e-2)
        self.scheduler = sd_scheduler()
        self.continued_from: dict | None = None
        if not self._resume() and config.init:
            self._start_from(config.init)

    # -- state ------------------------------------------------------------------------------

    def _state(self) -> nn.ModuleDict:
        return nn.ModuleDict({**self.parts, "ema": self.ema.shadow})

    def _resume(self) -> bool:
        if not (Path(self.config.work) / "checkpoint.json").exists():
            return False
        metadata = read_checkpoint_metadata(self.config.work, KIND)
        check_same_run(self.config.work, metadata["config"], self.config.model_dump(), _RUN_IDENTITY)
        self._state().load_state_dict(read_tensors(self.config.work, metadata, "model"))
        self.vae_step, self.unet_step = metadata["vae_step"], metadata["unet_step"]
        self.parts["vae"].register_to_config(scaling_factor=metadata["scaling_factor"])
        self.log = TrainingLog(metadata["log"], metadata.get("seconds", 0.0))
        # One optimizer state is saved: the current stage's.
        optimizer = self.optimizer if self.unet_step else self.vae_optimizer
        load_optimizer_state(self.config.work, optimizer, metadata)
        self.continued_from = metadata.get("continued_from")
        return True

    def _start_from(self, folder: str) -> None:
        """The weights of an exported pipeline (float16 files, cast back), with its training record."""
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        for name, part in self.parts.items():
            part.load_state_dict(getattr(pipe, name).state_dict())
        self.parts["vae"].register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
        self.ema.shadow.load_state_dict(self.ema.module.state_dict())
        self.vae_step = self.config.vae_steps
        record = Path(folder) / "training.json"
        self.continued_from = {"folder": folder, **(json.loads(record.read_text()) if record.is_file() else {})}

    def _save(self) -> None:
        stage_optimizer = self.optimizer if self.unet_step else self.vae_optimizer
        save_checkpoint(self.config.work, KIND, self.vae_step + self.unet_step, self._state(), stage_optimizer,
                        {"vae_step": self.vae_step, "unet_step": self.unet_step, "log": self.log.records,
                         "seconds": self.log.seconds,
                         "scaling_factor": self.parts["vae"].config.scaling_factor,
                         "config": self.config.model_dump(), "continued_from": self.continued_from})
        self.export()

    # -- stage 1 ----------------------------------------------------------------------------

    def vae_loss(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.parts["vae"].encode(pixels).latent_dist
        reconstruction = self.parts["vae"].decode(posterior.sample()).sample
        return F.l1_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()

    def train_vae(self) -> None:
        vae, config = self.parts["vae"].train(), self.config
        bar = tqdm(total=config.vae_steps, initial=self.vae_step, desc="VAE", unit="step")
        while self.vae_step < config.vae_steps:
            pixels = drawn_batch(config.seed, self.vae_step, config.batch_size, config.two_objects)[0].to(self.device)
            for group in self.vae_optimizer.param_groups:
                group["lr"] = config.vae_lr * (0.2 if self.vae_step >= 2 * config.vae_steps / 3 else 1.0)
            loss = self.vae_loss(pixels)
            self.vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_optimizer.step()
            self.vae_step += 1
            self.log.add("vae", self.vae_step, loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.vae_step % config.save_every == 0 or self.vae_step == config.vae_steps:
                if self.vae_step == config.vae_steps:
                    vae.register_to_config(scaling_factor=self.latent_scale())
                self._save()
        bar.close()

    @torch.no_grad()
    def latent_scale(self) -> float:
        """1 / the standard deviation of the latents: the diffusion sees unit-variance latents."""
        pixels = drawn_batch(self.config.seed + 1, 0, 256, self.config.two_objects)[0].to(self.device)
        return float(1.0 / self.parts["vae"].eval().encode(pixels).latent_dist.mean.std())

    # -- stage 2 ----------------------------------------------------------------------------

    def unet_loss(self, pixels: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        vae, unet, text_encoder = self.parts["vae"], self.parts["unet"], self.parts["text_encoder"]
        # Every random draw on the CPU generator: a step's noise is the same on any device.
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.device)).latent_dist
            epsilon = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
            latents = (posterior.mean + posterior.std * epsilon) * vae.config.scaling_factor
        dropped = torch.rand(len(prompts), generator=generator) < self.config.uncond
        prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, t.to(self.device))
        prediction = unet(noisy, t.to(self.device), encoder_hidden_states=text_encoder(ids)[0]).sample
        # min-SNR-gamma (Hang et al., 2023) for epsilon prediction: weight min(SNR, gamma) / SNR.
        alphas = self.scheduler.alphas_cumprod[t].to(self.device)
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=self.config.snr_gamma) / snr
        return (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    def train_unet(self) -> None:
        config = self.config
        self.parts["vae"].eval().requires_grad_(False)
        self.parts["unet"].train()
        self.parts["text_encoder"].train(self.config.train_text_encoder).requires_grad_(self.config.train_text_encoder)
        bar = tqdm(total=config.unet_steps, initial=self.unet_step, desc="U-Net + text", unit="step")
        while self.unet_step < config.unet_steps:
            step = self.unet_step
            pixels, prompts = drawn_batch(config.seed + 2, step, config.batch_size, config.two_objects)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / 200)
            loss = self.unet_loss(pixels, prompts, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], 1.0)
            self.optimizer.step()
            self.ema.update()
            self.unet_step += 1
            self.log.add("unet", self.unet_step, loss.item())
            bar.update()
            bar.set_postfix(loss=f"{self.log.recent('unet'):.4f}")
            if self.unet_step % config.save_every == 0 or self.unet_step == config.unet_steps:
                self._save()
        bar.close()

    def run(self) -> "GeneratorTraining":
        started = time.monotonic()
        self.train_vae()
        self.train_unet()
        self.minutes = (time.monotonic() - started) / 60
        return self

    # -- the shipped pipeline ---------------------------------------------------------------

    def pipeline(self) -> StableDiffusionPipeline:
        """The EMA weights as a Stable Diffusion pipeline (copies: training goes on untouched)."""
        shadow = self.ema.shadow
        parts = build_components(self.config.seed)
        parts["vae"].load_state_dict(self.parts["vae"].state_dict())
        parts["vae"].register_to_config(scaling_factor=self.parts["vae"].config.scaling_factor)
        parts["unet"].load_state_dict(shadow["unet"].state_dict())
        parts["text_encoder"].load_state_dict(shadow["text_encoder"].state_dict())
        pipe = StableDiffusionPipeline(**{k: v.eval() for k, v in parts.items()}, tokenizer=self.tokenizer,
                                       scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def export(self) -> None:
        """The pipeline folder, its loss plot, sample grid and card."""
        out = Path(self.config.out)
        pipe = self.pipeline()
        # float16 files halve what the repository carries; loading casts to the recipe's dtype.
        pipe.to(dtype=torch.float16).save_pretrained(out, safe_serialization=True)
        pipe.to(dtype=torch.float32)
        self.log.plot(out / "loss.png", title="mini-world generator")
        pixels = drawn_batch(self.config.seed + 3, 0, 64, 0.0)[0].to(self.device)
        with torch.no_grad():
            vae = pipe.vae
            decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        quality = {"vae_psnr_db": round(psnr(decoded, pixels), 2), "vae_steps": self.vae_step,
                   "unet_steps": self.unet_step,
                   "parameters_m": round(sum(p.numel() for part in (pipe.unet, pipe.vae, pipe.text_encoder)
                                             for p in part.parameters()), -3) / 1e6}
        if self.unet_step:
            sample_grid(pipe, out / "samples.png", steps=self.config.sample_steps)
            if Path(self.config.oracle).is_file():
                measured = generator_quality(pipe, load_oracle(self.config.oracle, device=self.device),
                                             self.config.quality_images, steps=self.config.sample_steps)
                quality["oracle_finds"] = {**measured.as_dict(), "oracle": self.config.oracle}
        write_card(out / "README.md", "The mini world's generator", __doc__, self.config.model_dump(),
                   self.log, quality, self.continued_from)
        record = {"quality": quality, "config": self.config.model_dump(), "continued_from": self.continued_from}
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


GRID_CLASSES = [(name,) for name in SHAPES.names] + [
    ("red_disc", "blue_square"), ("green_triangle", "white_cross"), ("yellow_square", "red_cross"),
    ("blue_disc", "green_square"), ("white_triangle", "yellow_disc")]


def sample_grid(pipe: StableDiffusionPipeline, path: Path, steps: int = 25, guidance_scale: float = 4.0) -> None:
    """One sample of every class and of five pairs, each captioned by its prompt."""
    prompts = [prompt_of(classes) for classes in GRID_CLASSES]
    images = generate(pipe, prompts, list(range(len(prompts))), steps=steps, guidance_scale=guidance_scale,
                      height=SIZE, width=SIZE)
    captions = [" + ".join(SHAPES.lookup(name).natural for name in classes) for classes in GRID_CLASSES]
    image_grid(images, captions, path, columns=5)
