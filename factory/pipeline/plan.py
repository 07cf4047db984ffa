"""The plan: every sample of a dataset, decided before any GPU work.

A sample is its classes, its prompt and its noise seed. The plan is a pure
function of the recipe: the same recipe and seed always give the same samples with
the same ids, and `num_samples` keeps a prefix of the shuffled plan, so a larger
`num_samples` extends a dataset instead of replacing it.

Each plan entry has up to `recipe.attempts` samples: when one is dropped (a class not
found), the entry's next attempt, the same prompt with its next seed, is made, until one is
kept or the attempts are spent ("given up"). Which attempts are made is decided by the
commit records alone (``next_attempts``), so an interrupted build resumes to the same set.

A follower (``recipe.follow``) plans exactly the samples a finished dataset of the same plan
wrote, each at the followed set's attempt and with its sample id, made once (``followed_plan``):
the same prompts and seeds, so the same images, with this recipe's labels; a join on
``sample_id`` pairs each image's labels of both sets.

A build from real images (``recipe.source``) plans one sample per image instead, in the
source's order (``image_plan``); a dropped image is not replaced. A real image's index, and so its
id and seed, come from the image itself (its name and content), not from where it sorts: an image
added to the folder is planned beside the samples already made, which keep their ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from factory.core.options import fill_template
from factory.core.pairs import all_pairs, load_pairs
from factory.core.storage import StorageError, first_line
from factory.core.vocab import Vocabulary, get_vocabulary
from factory.dataset.batch import MAX_CLASSES, PLAN_COLUMNS
from factory.dataset.codec import objects
from factory.dataset.source import DatasetError, DatasetSource
from factory.pipeline.images import ImageListing, open_images
from factory.pipeline.recipe import MAX_ATTEMPTS, Recipe, RecipeError, find_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    sample_id: str
    index: int
    classes: tuple[str, ...]  # canonical class names, in prompt order
    class_words: tuple[str, ...]  # how each class is worded inside the prompt
    prompt: str
    seed: int
    attempt: int = 0  # 0: the plan entry's first sample; k: its k-th replacement
    source_image: str = ""  # a real image's ref in the recipe's source; "" for a generated sample

    @property
    def columns(self) -> list[str]:
        return [*PLAN_COLUMNS, "source_image"] if self.source_image else list(PLAN_COLUMNS)

    def row(self) -> dict:
        """The sample's plan columns, as the stages read them (``PLAN_COLUMNS``, and a real
        image's ``source_image``)."""
        return {key: getattr(self, key) for key in self.columns}


def plan_batch(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """The samples as Ray Data hands them to a stage: one array per plan column, int64 for the
    numbers, objects for the rest."""
    batch = {key: objects([getattr(s, key) for s in samples]) for key in samples[0].columns}
    batch["index"], batch["seed"] = batch["index"].astype(np.int64), batch["seed"].astype(np.int64)
    return batch


@dataclass(frozen=True)
class Prompt:
    """A hand-written prompt: its text and the words that name its classes."""
    text: str
    classes: tuple[str, ...]
    words: tuple[str, ...]


def selected_pairs(recipe: Recipe, vocabulary: Vocabulary, classes: list[str]) -> list[tuple[str, str]]:
    if recipe.per_pair == 0:
        return []
    if recipe.pairs == "all":
        return all_pairs(classes, vocabulary)
    if recipe.pairs == "vocabulary":
        pairs, where = list(vocabulary.pairs), f"vocabulary {vocabulary.name}"
    else:
        try:
            pairs, where = load_pairs(find_file(recipe.pairs, "pairs"), vocabulary), f"pairs file {recipe.pairs}"
        except (ValueError, OSError) as exc:
            raise RecipeError(str(exc)) from None
    inside = set(classes)
    pairs = [pair for pair in pairs if set(pair) <= inside]
    if not pairs:
        raise RecipeError(f"{where} has no pair whose classes are both selected")
    return pairs


_BRACED = re.compile(r"\{([^{}]+)\}")


def load_prompt_file(path: Path, vocabulary: Vocabulary) -> list[Prompt]:
    """Lines like 'a photograph of a {bus} crossing a busy street'; '#' starts a comment."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = tuple(_BRACED.findall(line))
        if not words:
            raise RecipeError(f"{path}:{number}: no class in braces: {line!r}")
        if len(words) > MAX_CLASSES:
            raise RecipeError(f"{path}:{number}: {len(words)} classes; a prompt may name at most {MAX_CLASSES}")
        try:
            classes = tuple(vocabulary.lookup(word).name for word in words)
        except ValueError as exc:
            raise RecipeError(f"{path}:{number}: {exc}") from None
        prompts.append(Prompt(_BRACED.sub(r"\1", line), classes, words))
    return prompts


def _sample_seed(plan_seed: int, index: int, attempt: int = 0) -> int:
    name = f"seed:{plan_seed}:{index}" + (f":{attempt}" if attempt else "")
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: fits int64 and torch.Generator


def _sample_id(content_key: str, index: int, attempt: int = 0) -> str:
    # Sorts in plan order (a real image's: by its index, a number of its own), a replacement
    # ("0000012.1-...") after its entry's first sample; the hash keeps ids of different recipes apart
    # when datasets are merged (a follower takes its followed set's ids: the same images).
    if not attempt:
        return f"{index:07d}-{hashlib.sha256(f'{content_key}:{index}'.encode()).hexdigest()[:8]}"
    return f"{index:07d}.{attempt}-{hashlib.sha256(f'{content_key}:{index}:{attempt}'.encode()).hexdigest()[:8]}"


def build_plan(recipe: Recipe) -> list[Sample]:
    vocabulary = get_vocabulary(recipe.vocabulary)
    classes = recipe.selected_classes
    if recipe.source.enabled:
        return image_plan(recipe, open_images(recipe, classes, vocabulary))
    groups = [(name,) for name in classes for _ in range(recipe.per_class)]
    groups += [pair for pair in selected_pairs(recipe, vocabulary, classes) for _ in range(recipe.per_pair)]

    hand_written: dict[frozenset[str], list[Prompt]] = {}
    if recipe.prompts.file:
        for prompt in load_prompt_file(find_file(recipe.prompts.file, "prompts"), vocabulary):
            hand_written.setdefault(frozenset(prompt.classes), []).append(prompt)
    for name, templates in recipe.prompts.per_class.items():
        info = vocabulary.lookup(name)
        hand_written.setdefault(frozenset([info.name]), []).extend(
            Prompt(template.format(info.natural), (info.name,), (info.natural,)) for template in templates)

    rng = np.random.default_rng(recipe.seed)
    order = rng.permutation(len(groups))
    key = recipe.content_key()
    plan = []
    for index, group_index in enumerate(order):
        group = groups[group_index]
        choices = hand_written.get(frozenset(group))
        if choices:
            prompt = choices[rng.integers(len(choices))]
            group_classes, words, text = prompt.classes, prompt.words, prompt.text
        else:
            if len(group) == 2 and rng.random() < 0.5:
                group = group[::-1]  # both orders, so neither class is always named first
            group_classes = group
            words = tuple(vocabulary.lookup(name).natural for name in group)
            text = (recipe.prompts.one if len(group) == 1 else recipe.prompts.two).format(*words)
        plan.append(Sample(_sample_id(key, index), index, tuple(group_classes), tuple(words), text,
                           _sample_seed(recipe.seed, index)))
    if recipe.num_samples is not None:
        plan = plan[: recipe.num_samples]
    return followed_plan(recipe, plan) if recipe.follow is not None else plan


def image_plan(recipe: Recipe, listing: ImageListing) -> list[Sample]:
    """One sample per source image, in the source's order, its index from the image itself
    (``image_index``); the prompt names the image's classes with the recipe's templates, the seed
    is the noised route's noise."""
    vocabulary, key = get_vocabulary(recipe.vocabulary), recipe.content_key()
    for line in listing.warnings(recipe.source.images):
        logger.warning(line)
    plan = []
    for image in listing.images:
        index = image_index(image.identity)
        words = tuple(vocabulary.lookup(name).natural for name in image.classes)
        plan.append(Sample(_sample_id(key, index), index, image.classes, words,
                           fill_template(recipe.prompts.one, recipe.prompts.two, words),
                           _sample_seed(recipe.seed, index), source_image=image.ref))
    if len({sample.index for sample in plan}) < len(plan):  # 53-bit hashes: about 1 in 20,000 at a million images
        raise RecipeError(f"two images of {recipe.source.images} share an index; rename one of them")
    return plan[: recipe.num_samples] if recipe.num_samples is not None else plan


def image_index(identity: str) -> int:
    """A real image's plan index: a hash of what it is (``SourceImage.identity``), so that the
    images around it never change it. 53 bits: exact in JSON, where COCO exports use it as an image id."""
    return int.from_bytes(hashlib.sha256(f"image:{identity}".encode()).digest()[:8], "little") >> 11


def _attempt(sample: Sample, k: int, content_key: str, plan_seed: int) -> Sample:
    """The k-th sample of `sample`'s plan entry: the same prompt with the k-th seed."""
    return replace(sample, sample_id=_sample_id(content_key, sample.index, k),
                   seed=_sample_seed(plan_seed, sample.index, k), attempt=k)


def _attempts(sample: Sample, recipe: Recipe, content_key: str) -> list[Sample]:
    """The samples a plan entry may make, in order: attempts 0 .. recipe.attempts - 1, or a
    follower's one sample as the followed set made it (its attempt and id)."""
    if recipe.follow is not None:
        return [sample]
    return [_attempt(sample, k, content_key, recipe.seed) for k in range(recipe.tries)]


def all_attempts(plan: list[Sample], recipe: Recipe) -> list[Sample]:
    """Every sample the plan may make: each entry's attempts 0 .. recipe.attempts - 1 (a
    follower's: its one sample)."""
    key = recipe.content_key()
    return [made for sample in plan for made in _attempts(sample, recipe, key)]


def next_attempts(plan: list[Sample], recipe: Recipe, outcomes: dict[str, str]) -> list[Sample]:
    """What to make next, given the `outcomes` of the samples committed so far (sample id ->
    "" when written, the drop reason when dropped): each entry's first attempt when none was
    made, its next one when the last made was dropped and attempts are left."""
    key, due = recipe.content_key(), []
    for sample in plan:
        for made in _attempts(sample, recipe, key):
            outcome = outcomes.get(made.sample_id)
            if outcome is None:
                due.append(made)
            if not outcome:  # not made yet, or kept
                break
    return due


# What decides a generated sample's prompt, seed and image: a follower's plan must equal its followed set's.
_PLAN_FIELDS = {"vocabulary", "per_class", "per_pair", "pairs", "num_samples", "seed", "prompts", "generator", "source"}


def plan_fields(recipe: Recipe) -> dict:
    """The recipe's fields that decide its samples' images, dotted: {"seed": 12, "generator.steps": 25, ...}
    (classes as the selected class names; not the generator's batch size)."""
    dump = recipe.model_dump(mode="json", include=_PLAN_FIELDS, exclude={"generator": {"batch_size"}})
    fields = {"classes": recipe.selected_classes}
    for name, value in dump.items():
        if name in ("prompts", "generator", "source"):
            fields.update({f"{name}.{field}": inner for field, inner in value.items()})
        else:
            fields[name] = value
    return fields


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def open_followed(uri: str) -> DatasetSource:
    """The finished dataset a recipe follows; RecipeError naming it when there is none."""
    try:
        return DatasetSource.open(uri)
    except DatasetError as exc:
        raise RecipeError(f"follow: {exc}") from None


def followed_plan(recipe: Recipe, plan: list[Sample]) -> list[Sample]:
    """The samples that the dataset ``recipe.follow`` wrote, as samples of `plan` (this recipe's, the
    same as the followed set's): found by index and seed, checked by prompt and classes, each at
    its attempt with its id there. RecipeError, one line naming the followed set, when its
    plan is not this recipe's."""
    uri = recipe.follow
    followed = open_followed(uri)
    try:
        theirs = Recipe.model_validate(followed.recipe)
    except ValidationError as exc:
        raise RecipeError(f"follow: cannot read the recipe of {uri}: {first_line(exc)}") from None
    mine, other = plan_fields(recipe), plan_fields(theirs)
    for name in [*mine, *(name for name in other if name not in mine)]:
        if mine.get(name) != other.get(name):
            raise RecipeError(f"follow: {uri} has another plan: {name} {_shown(other.get(name))} there, "
                              f"{_shown(mine.get(name))} here")
    try:
        rows = followed.read(["sample_id", "index", "seed", "prompt", "classes"]).to_pylist()
    except (OSError, StorageError, pa.ArrowException) as exc:
        raise RecipeError(f"follow: cannot read the samples of {uri}: {first_line(exc)}") from None
    entries, samples = {entry.index: entry for entry in plan}, []
    for row in rows:
        entry = entries.get(row["index"])
        # any attempt: a followed follower made its own followed set's, whatever its `attempts` says
        attempt = None if entry is None else next(
            (k for k in range(MAX_ATTEMPTS) if _sample_seed(recipe.seed, entry.index, k) == row["seed"]), None)
        if attempt is None or (entry.prompt, list(entry.classes)) != (row["prompt"], row["classes"]):
            raise RecipeError(f"follow: sample {row['sample_id']} of {uri} ({row['prompt']!r}, seed {row['seed']}) "
                              f"is not in this recipe's plan")
        samples.append(replace(entry, sample_id=row["sample_id"], seed=row["seed"], attempt=attempt))
    return sorted(samples, key=lambda sample: (sample.index, sample.attempt))


def plan_digest(plan: list[Sample]) -> str:
    """A fingerprint of the whole plan, recorded in the manifest."""
    h = hashlib.sha256()
    for sample in plan:
        h.update(f"{sample.sample_id}|{sample.prompt}|{sample.seed}\n".encode())
    return h.hexdigest()[:16]


def replan(manifest: dict) -> list[Sample]:
    """Every sample a finished dataset's plan may make (``all_attempts``), rebuilt from its
    manifest's recipe; DatasetError when this version of the code cannot rebuild the plan, or
    rebuilds another one."""
    try:
        recipe = Recipe.model_validate(manifest["recipe"])
        if recipe.content_key() != manifest["content_key"]:
            raise DatasetError(f"the recipe's content key is {recipe.content_key()} here, {manifest['content_key']} "
                               f"when built: made by another version of dataset-factory, so its planned ids "
                               f"cannot be rebuilt here")
        plan = build_plan(recipe)
    except (ValidationError, RecipeError) as exc:
        raise DatasetError(f"cannot rebuild the plan from the manifest's recipe: {first_line(exc)}") from None
    if plan_digest(plan) != manifest["plan"]["digest"]:
        raise DatasetError(f"the plan rebuilt from the manifest's recipe has digest {plan_digest(plan)}, "
                           f"the manifest {manifest['plan']['digest']}")
    return all_attempts(plan, recipe)
