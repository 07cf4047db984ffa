"""Train a model of the mini world (world/) from its seed, resumably.

    python jobs/train_world.py generator                     # Stable Diffusion: VAE, then U-Net + text encoder
    python jobs/train_world.py oracle                        # the Mask R-CNN oracle
    python jobs/train_world.py backbone                      # the world segmenter's ResNet, on other drawings
    python jobs/train_world.py generator --unet_steps 30000  # continue the same run further
    python jobs/train_world.py generator --init models/shapes-generator --out runs/generator-next \
        --work runs/generator-next-state --unet_steps 6000       # a new run from shipped weights

A rerun continues from --work up to the configured steps. --out receives what recipes load
(a diffusers pipeline folder; model.safetensors), a loss plot, samples and a model card with
the quality measured at the last save. `python jobs/train_world.py MODEL --help` lists every knob.
"""

from __future__ import annotations

import sys

import torch

from factory.core.cli import run_job
from factory.core.options import ConfigError, parse_options
from factory.core.vocab import SHAPES
from segmenter.config import SegmenterModelConfig
from segmenter.data import normalize
from segmenter.model import Segmenter
from world.backbone import BackboneTrainConfig, BackboneTraining
from world.generator import GeneratorTrainConfig, GeneratorTraining
from world.oracle import OracleTrainConfig, OracleTraining


def backbone_training(config: BackboneTrainConfig) -> BackboneTraining:
    """The `world` segmenter preset's own ResNet, so that its pretrained weights load there unchanged."""
    preset = SegmenterModelConfig.world(num_labels=len(SHAPES.names) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = Segmenter(preset).backbone
    return BackboneTraining(config, backbone, preset.backbone_widths[-1], normalize)


MODELS = {"generator": (GeneratorTrainConfig, GeneratorTraining), "oracle": (OracleTrainConfig, OracleTraining),
          "backbone": (BackboneTrainConfig, backbone_training)}


def train(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODELS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        raise ConfigError(f"name the model to train first: {' or '.join(MODELS)}")
    config_type, training_type = MODELS[argv[0]]
    config = parse_options(config_type, argv[1:], __doc__)
    training = training_type(config).run()
    print(f"{argv[0]}: trained to the configured steps in {training.minutes:.1f} min this run; "
          f"weights, loss plot and card in {config.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("train_world", train, argv)


if __name__ == "__main__":
    sys.exit(main())
