"""The model stages a recipe runs in the model actor, and the batch columns each reads and adds.

The registry is made of imports: each stage class is imported by a function called in the model
actor, so that the driver plans and checks without loading model code (torch, diffusers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from factory.core.storage import absolute_model_source
from factory.dataset.batch import LABEL_COLUMNS
from factory.pipeline.labelers import labeler_for, labeler_of
from factory.pipeline.recipe import Recipe
from factory.pipeline.sections import LabelerConfig


@dataclass(frozen=True)
class StageSpec:
    """One model stage inside the model actor, and the batch columns it reads and adds
    (``factory.dataset.batch``). ``stage`` is a Ray Data callable class, or a function returning
    one, called in the actor."""
    stage: type | Callable[[], type]
    kwargs: dict
    batch_size: int  # most samples per call
    reads: tuple[str, ...]
    adds: tuple[str, ...]


def resolve_stage(stage: type | Callable[[], type]) -> type:
    """A StageSpec's class."""
    return stage if isinstance(stage, type) else stage()


def generate_stage() -> type:
    from factory.pipeline.generate import GenerateStage

    return GenerateStage


def followed_stage() -> type:
    from factory.pipeline.followed import FollowedImages

    return FollowedImages


def reads_followed_images(recipe: Recipe) -> bool:
    """A follower that labels with a stage of its own and captures nothing reads the followed set's
    images (``factory.pipeline.followed``) instead of generating them again."""
    return (recipe.follow is not None and labeler_for(recipe).own_stage and recipe.capture.features == "none"
            and not recipe.capture.attention)


def label_stage() -> type:
    from factory.pipeline.label import LabelStage

    return LabelStage


def annotate_stage() -> type:
    from factory.pipeline.annotate import AnnotateStage

    return AnnotateStage


def image_stage() -> type:
    from factory.pipeline.real import ImageStage

    return ImageStage


def agreement_stage() -> type:
    from factory.pipeline.agreement import AgreementStage

    return AgreementStage


def quality_stage() -> type:
    from factory.pipeline.quality import QualityStage

    return QualityStage


_LABELS = (*LABEL_COLUMNS, "label_seconds")


def model_stages(recipe: Recipe) -> list[StageSpec]:
    """The recipe's model stages, in order: generate then label, generate-and-annotate, or read real
    images and label them; a second labeler's agreement; quality."""
    gen = recipe.generator.model_copy(update={"model": absolute_model_source(recipe.generator.model)})
    lab = _absolute_labeler(recipe.labeler)
    annotator = recipe.annotator.model_copy(update={"checkpoint": absolute_model_source(recipe.annotator.checkpoint)})
    attempts = recipe.pool.load_attempts
    if recipe.source.enabled:  # real images: read, into the U-Net, labelled by their masks or the module
        source = recipe.source.model_copy(update={"images": absolute_model_source(recipe.source.images)})
        stages = [StageSpec(image_stage,
                            {"generator": gen, "source": source, "capture": recipe.capture, "annotator": annotator,
                             "vocabulary": recipe.vocabulary, "fast": recipe.fast, "load_attempts": attempts},
                            gen.batch_size,
                            reads=("source_image", "prompt", "seed", "classes", "class_words"),
                            adds=("image", "psnr", "generate_seconds", "timestep", "latent", "features_<r>",
                                  *_LABELS))]
    elif not labeler_for(recipe).own_stage:  # the module reads the generator's features, DAAM its attention
        stages = [StageSpec(annotate_stage,
                            {"generator": gen, "annotator": annotator, "vocabulary": recipe.vocabulary,
                             "fast": recipe.fast, "load_attempts": attempts}, gen.batch_size,
                            reads=("prompt", "seed", "classes", "class_words"),
                            adds=("image", "generate_seconds", *_LABELS))]
    else:
        capture = ("timestep", "latent", "features_<r>", "ufeatures_<r>", "daam")
        images = (StageSpec(followed_stage, {"dataset": absolute_model_source(recipe.follow)}, gen.batch_size,
                            reads=("sample_id",), adds=("image", "generate_seconds"))
                  if reads_followed_images(recipe) else
                  StageSpec(generate_stage,
                            {"config": gen, "capture": recipe.capture, "fast": recipe.fast, "load_attempts": attempts},
                            gen.batch_size,
                            reads=("prompt", "seed", "class_words"), adds=("image", "generate_seconds", *capture)))
        stages = [images,
                  StageSpec(label_stage,
                            {"config": lab, "vocabulary": recipe.vocabulary, "image_size": min(gen.height, gen.width),
                             "load_attempts": attempts}, lab.batch_size,
                            reads=("image", "classes"), adds=_LABELS)]
    if recipe.agreement.enabled:
        check = recipe.agreement.model_copy(update={"labeler": _absolute_labeler(recipe.agreement.labeler)})
        stages.append(StageSpec(agreement_stage,
                                {"config": check, "vocabulary": recipe.vocabulary,
                                 "image_size": min(gen.height, gen.width), "load_attempts": attempts},
                                check.labeler.batch_size,
                                reads=("image", "classes", "class_bits", "label", "drop_reason"),
                                adds=("agreement", "label", "drop_reason", "label_seconds")))
    if recipe.quality.model:
        stages.append(StageSpec(quality_stage,
                                {"model": absolute_model_source(recipe.quality.model), "load_attempts": attempts},
                                lab.batch_size,
                                reads=("image",), adds=("quality",)))
    return stages


def model_ids(recipe: Recipe) -> dict[str, str]:
    """What the `generator` and `labeler` columns and the manifest name as the models."""
    generator = recipe.generator.model
    if recipe.source.enabled:  # the image is the source's; the generator's U-Net made the features
        generator = f"{recipe.source.format}:{recipe.source.images} ({recipe.source.route} by {generator})"
    ids = {"generator": generator, "labeler": labeler_for(recipe).model_id(recipe, recipe.labeler)}
    if recipe.agreement.enabled:
        checker = recipe.agreement.labeler
        ids["agreement"] = labeler_of(checker.model).model_id(recipe, checker)
    return ids


def _absolute_labeler(lab: LabelerConfig) -> LabelerConfig:
    """The labeler's model files as every node finds them."""
    return lab.model_copy(update={"weights": absolute_model_source(lab.weights), "sam": absolute_model_source(lab.sam)})
