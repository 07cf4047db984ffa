import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.core.conventions import IGNORE
from factory.dataset.codec import decode_png
from factory.diffusion.daam import DAAM_THRESHOLD, daam_masks
from factory.pipeline.annotate import AnnotateStage, annotation_label_map, annotation_labels
from factory.pipeline.generate import GenerateStage
from factory.pipeline.pipeline import prepare_build
from factory.pipeline.recipe import load_recipe
from factory.pipeline.sections import AnnotatorConfig, CaptureConfig, GeneratorConfig, PromptConfig
from grounding.checkpoint import save_grounding_checkpoint
from grounding.config import GroundingModelConfig
from grounding.config import TextConfig
from grounding.model import GroundingModule
from jobs import build_dataset

TINY_CHANNELS = {16: 288, 32: 192}  # the tiny U-Net's capture (tests/diffusion/test_features.py)


def test_label_map_takes_the_most_probable_class_above_threshold():
    p = np.zeros((2, 2, 3), np.float32)
    p[0] = [[0.9, 0.6, 0.2], [0.1, 0.45, 0.0]]  # dog
    p[1] = [[0.7, 0.8, 0.1], [0.2, 0.1, 0.0]]  # cat
    label = annotation_label_map(p, [12, 8], threshold=0.5)
    assert label.tolist() == [[12, 8, 0], [0, 0, 0]]
    banded = annotation_label_map(p, [12, 8], threshold=0.5, ignore_below=0.3)
    assert banded.tolist() == [[12, 8, 0], [0, IGNORE, 0]]  # 0.45: unsure, neither class nor background


def test_a_class_judged_absent_gets_no_pixels():
    """Presence: a class scored below presence_threshold gets no pixels, however probable its mask; its
    pixels go to the class that is there, and on_missing decides the sample as for any class not found."""
    p = np.zeros((2, 2, 2), np.float32)
    p[0] = [[0.9, 0.9], [0.1, 0.1]]  # dog: a confident mask over the top row
    p[1] = [[0.95, 0.1], [0.1, 0.1]]  # cat: more confident still at (0, 0)
    presence = np.array([0.8, 0.3], np.float32)  # cat judged absent
    kept = annotation_labels(p, [12, 8], AnnotatorConfig(on_missing="absent", presence_threshold=0.5), presence)
    assert kept.label.tolist() == [[12, 12], [0, 0]]  # (0, 0) is dog's once cat is out
    assert kept.found.tolist() == [True, False] and not kept.masks[1].any()
    assert kept.presence.tolist() == pytest.approx([0.8, 0.3])
    dropped = annotation_labels(p, [12, 8], AnnotatorConfig(on_missing="drop", presence_threshold=0.5), presence)
    assert dropped.drop_reason == "class_not_found"
    # At a threshold below both scores, the presence scores change nothing.
    loose = annotation_labels(p, [12, 8], AnnotatorConfig(on_missing="drop", presence_threshold=0.2), presence)
    assert loose.label.tolist() == [[8, 12], [0, 0]] and loose.drop_reason == ""
    # DAAM (no presence scores): every class keeps its mask.
    assert annotation_labels(p, [12, 8], AnnotatorConfig(on_missing="drop")).found.tolist() == [True, True]


# How the checkpoint's training images were made: the tiny recipe's, with 4 steps, captured at step 2.
GENERATION = {"model": "tiny", "steps": 4, "capture_step": 2, "guidance_scale": 5.0,
              "prompts": PromptConfig().model_dump(mode="json")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny module with a presence head in the training code's checkpoint format, trained on
    dog and cat (dog is unseen in split 1, cat in split 3; both are seen in split 2)."""
    path = tmp_path_factory.mktemp("grounding") / "best"
    module = GroundingModule(GroundingModelConfig.tiny(feature_channels=TINY_CHANNELS, mask_resolution=64,
                                                       presence="region"))
    save_grounding_checkpoint(str(path), module, None, {
        "epoch": 0, "text": TextConfig().model_dump(), "generation": GENERATION,
        "capture": {"features": "latent", "steps_remaining": 2}, "vocabulary": {"name": "voc"},
        "classes": ["dog", "cat"], "split": None})  # trained on a list of classes, not a split's seen ones
    return str(path)


def test_annotate_stage_labels_the_prompt_classes(checkpoint):
    stage = AnnotateStage(GeneratorConfig(steps=4, height=64, width=64, guidance_scale=5.0),
                          AnnotatorConfig(checkpoint=checkpoint, threshold=0.5, on_missing="ignore"), "voc")
    batch = {"prompt": np.array(["a photograph of a dog", "a photograph of a cat and a bus"], dtype=object),
             "class_words": np.array([["dog"], ["cat", "bus"]], dtype=object),
             "classes": np.array([["dog"], ["cat", "bus"]], dtype=object), "seed": np.array([1, 2])}
    out = stage(batch)
    assert out["image"].shape == (2, 64, 64, 3) and out["label"].shape == (2, 64, 64)
    assert set(np.unique(out["label"][1])) <= {0, IGNORE, 8, 6}  # background, ignore, cat, bus
    assert [len(s) for s in out["scores"]] == [1, 2]
    for bits, found in zip(out["class_bits"], out["found"]):
        assert all(bool(((bits >> k) & 1).any()) == f for k, f in enumerate(found))


def test_daam_annotation_is_protocol_i_daam_baseline():
    """A DAAM-labelled set labels each class as Protocol-I scores DAAM: the same images and the
    heat maps a triplet build stores, thresholded at tau."""
    generator = GeneratorConfig(steps=4, height=64, width=64, guidance_scale=5.0)
    prompts = ["a photograph of a dog", "a photograph of a cat and a bus"]
    words = [["dog"], ["cat", "bus"]]

    def batch():
        return {"prompt": np.array(prompts, dtype=object), "class_words": np.array(words, dtype=object),
                "classes": np.array(words, dtype=object), "seed": np.array([1, 2])}

    annotated = AnnotateStage(generator, AnnotatorConfig(daam=True, threshold=DAAM_THRESHOLD), "voc")(batch())
    triplets = GenerateStage(generator, CaptureConfig(attention=True))(batch())
    np.testing.assert_array_equal(annotated["image"], triplets["image"])
    for i, classes in enumerate(words):
        expected = daam_masks(triplets["daam"][i][None].astype(np.float32), size=(64, 64))[0]
        assert expected.reshape(len(classes), -1).any(axis=1).all()  # min-max normalised: never empty
        for k in range(len(classes)):
            np.testing.assert_array_equal((annotated["class_bits"][i] >> k) & 1, expected[k])


def refused(capsys, *args: str) -> str:
    """The one error line of an annotating build that must stop before any model loads."""
    assert build_dataset.main(["--recipe", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("build_dataset: error: ") and err.count("\n") == 1
    return err.strip().removeprefix("build_dataset: error: ")


def test_checkpoint_of_other_features_is_refused_before_models_load(checkpoint, tmp_path, capsys, monkeypatch):
    from factory.pipeline import pipeline
    monkeypatch.setattr(pipeline, "stream_samples", lambda *a, **k: pytest.fail("models loaded"))
    (tmp_path / "sd" / "vae").mkdir(parents=True)  # a saved SD pipeline's configs, no weights
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "sd" / "vae" / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')
    out = ["--out", str(tmp_path / "o"), "--annotator.checkpoint", checkpoint]
    assert refused(capsys, *out, "--generator.steps", "4", "--generator.model", str(tmp_path / "sd")) == (
        f"grounding checkpoint {checkpoint} reads features this build does not make: generator model 'tiny' vs "
        f"'{tmp_path / 'sd'}' (its training data vs this recipe)")
    # Capture step 2 of 4 is another U-Net call, at another timestep, than step 2 of 10.
    assert refused(capsys, *out, "--generator.steps", "10") == (
        f"grounding checkpoint {checkpoint} reads features this build does not make: total steps 4 vs 10 "
        f"(its training data vs this recipe)")
    # Another sampler visits other latents (a record from before samplers were recorded means DDIM).
    assert refused(capsys, *out, "--generator.steps", "4", "--generator.scheduler", "dpm++") == (
        f"grounding checkpoint {checkpoint} reads features this build does not make: sampler 'ddim' vs 'dpm++' "
        f"(its training data vs this recipe)")
    assert "no readable checkpoint" in refused(capsys, "--out", str(tmp_path / "o"),
                                               "--annotator.checkpoint", str(tmp_path / "none"))
    assert not (tmp_path / "o").exists()


def test_checkpoint_that_saw_the_splits_unseen_classes_is_refused(checkpoint, tmp_path, capsys):
    """A dataset declared for split 1 must be labelled by a module that never saw split 1's unseen
    classes: otherwise its "unseen" labels are not zero-shot."""
    out = ["--out", str(tmp_path / "o"), "--annotator.checkpoint", checkpoint, "--generator.steps", "4"]
    assert refused(capsys, *out, "--split", "1") == (
        f"grounding checkpoint {checkpoint} was trained on dog, unseen classes of split 1, which this dataset is "
        f"declared for; annotate with a module trained on split 1's seen classes")
    assert "trained on cat, unseen classes of split 3" in refused(capsys, *out, "--split", "3")
    assert not (tmp_path / "o").exists()


def test_a_renamed_class_is_the_class_the_module_saw(checkpoint, tmp_path, capsys):
    """The module saw dog and cat, whatever a user's vocabulary calls them: a class prompted as
    "dog" is not unseen under another name, so the split guard refuses it as it refuses dog."""
    pets = tmp_path / "pets.yaml"
    pets.write_text("name: pets\nclasses:\n  - name: puppy\n    natural: dog\n  - name: kitty\n"
                    "    synonyms: [cat]\n  - name: goldfish\nunseen:\n  - [puppy]\n")
    out = ["--out", str(tmp_path / "o"), "--annotator.checkpoint", checkpoint, "--generator.steps", "4",
           "--vocabulary", str(pets), "--classes", "all"]
    assert refused(capsys, *out, "--split", "1") == (
        f"grounding checkpoint {checkpoint} was trained on puppy, unseen classes of split 1, which this dataset is "
        f"declared for; annotate with a module trained on split 1's seen classes")
    assert not (tmp_path / "o").exists()


def test_other_guidance_or_prompts_are_a_note(checkpoint, tmp_path):
    """Same features, other images: the build goes on, and says so."""
    recipe = load_recipe("tiny", {"generator.steps": 4, "generator.guidance_scale": 7.5, "split": 2,
                                  "prompts.two": "a {0} next to a {1}", "annotator.checkpoint": checkpoint,
                                  "out": str(tmp_path / "a")})
    note = (f"grounding checkpoint {checkpoint} was trained on images made otherwise: guidance scale 5.0 vs 7.5; "
            f"prompt template two 'a photograph of a {{0}} and a {{1}}' vs 'a {{0}} next to a {{1}}' "
            f"(its training data vs this recipe)")
    assert prepare_build(recipe).notes == [note]  # split 2: dog and cat are seen there
    same = load_recipe("tiny", {"generator.steps": 4, "annotator.checkpoint": checkpoint, "out": str(tmp_path / "b")})
    assert prepare_build(same).notes == []


def test_checkpoint_without_a_generation_record_is_refused(checkpoint, tmp_path, capsys):
    """Written before checkpoints recorded their training data's generation: the total steps are
    unknown, so a mismatch could not be seen; retraining is the safe way."""
    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    metadata = json.loads((old / "checkpoint.json").read_text())
    del metadata["generation"]
    (old / "checkpoint.json").write_text(json.dumps({**metadata, "generator": "tiny"}))
    assert refused(capsys, "--out", str(tmp_path / "o"), "--annotator.checkpoint", str(old)) == (
        f"{old} does not record how its training data was generated (total steps, guidance scale, prompt "
        f"templates): it predates that record; retrain it")


@pytest.mark.slow
def test_annotated_build(ray_cluster, checkpoint, tmp_path):
    out = tmp_path / "seg"
    assert build_dataset.main(["--out", str(out), "--recipe", "tiny", "--num-samples", "6", "--generator.steps", "4",
                               "--annotator.checkpoint", checkpoint, "--annotator.on-missing", "ignore"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["labeler"] == f"grounding:{checkpoint}"
    assert manifest["counts"]["written"] == 6
    # Only dog and cat come from a labeler trained on them: the others are zero-shot labels.
    assert manifest["labels"]["kind"] == "annotator" and manifest["labels"]["trained_split"] is None
    assert {name for name, trained in manifest["labels"]["trained"].items() if trained} == {"dog", "cat"}
    rows = [r for f in manifest["files"] for r in pq.read_table(out / f["path"]).to_pylist()]
    for row in rows:
        label = decode_png(row["label"]["bytes"])
        assert set(np.unique(label)) <= {0, IGNORE, *row["class_indices"]}
        assert row["labeler"] == f"grounding:{checkpoint}"
        # Every row records a presence score per class; a class judged absent has no pixels.
        assert len(row["presence"]) == len(row["classes"])
        for index, score in zip(row["class_indices"], row["presence"]):
            if score < 0.5:
                assert not (label == index).any()
    # The manifest and card count, per class, the images judged present and absent.
    presence = manifest["presence"]
    assert presence["threshold"] == 0.5
    named = [name for row in rows for name in row["classes"]]
    assert {name: c["samples"] for name, c in presence["classes"].items()} == {n: named.count(n) for n in set(named)}
    assert all(c["present"] + c["absent"] == c["samples"] for c in presence["classes"].values())
    assert "### Presence" in (out / "README.md").read_text()
