"""The manifest and label provenance (factory/pipeline/manifest.py)."""

import pytest

from factory.core.vocab import VOC, get_vocabulary
from factory.pipeline.manifest import build_manifest, class_lists, label_provenance, prompted_classes
from factory.pipeline.pipeline import prepare_build
from factory.pipeline.plan import build_plan
from factory.pipeline.recipe import load_recipe


def test_labels_record_which_classes_the_labeler_was_trained_on(tmp_path):
    from grounding.checkpoint import save_grounding_checkpoint
    from grounding.config import GroundingModelConfig
    from grounding.model import GroundingModule

    voc = get_vocabulary("voc").names
    oracle = label_provenance(load_recipe("tiny"), VOC, "maskrcnn")
    assert oracle["kind"] == "oracle" and oracle["trained"] == {name: True for name in voc}

    checkpoint = str(tmp_path / "best")
    module = GroundingModule(GroundingModelConfig.tiny(feature_channels={16: 8, 32: 8}, mask_resolution=16))
    save_grounding_checkpoint(checkpoint, module, None, {"epoch": 1, "classes": ["dog", "cat"], "split": 1})
    annotated = label_provenance(load_recipe("tiny", {"annotator": {"checkpoint": checkpoint}}), VOC, "grounding")
    assert annotated["kind"] == "annotator" and annotated["trained_split"] == 1
    assert {name for name, trained in annotated["trained"].items() if trained} == {"dog", "cat"}
    assert annotated["trained"].keys() == set(voc)

    daam = label_provenance(load_recipe("tiny", {"annotator": {"daam": True}}), VOC, "daam")
    assert daam["kind"] == "daam" and daam["trained"] == {name: False for name in voc}  # zero-shot everywhere

    # an oracle that decides which of the module's labels are kept knows every class: not zero-shot
    checked = {"agreement": {"labeler": {"model": "tiny"}}}
    recorded = label_provenance(load_recipe("tiny", {"annotator": {"checkpoint": checkpoint}, **checked}), VOC, "grounding")
    assert recorded == annotated  # min_iou 0: the agreement is recorded, no label is chosen by it
    acting = {"annotator": {"checkpoint": checkpoint}, "agreement": {**checked["agreement"], "min_iou": 0.5}}
    filtered = label_provenance(load_recipe("tiny", acting), VOC, "grounding")
    assert filtered["kind"] == "annotator" and filtered["trained_split"] is None
    assert filtered["trained"] == {name: True for name in voc} and filtered["chosen_by"] == "tiny"


@pytest.mark.parametrize("source, lists", [
    (None, "prompt"),
    ({"images": "/photos"}, "user"),  # every image asked for the recipe's classes
    ({"images": "/photos", "classes_file": "/photos.json"}, "user"),
    *(({"images": "/real", "format": name}, "ground_truth") for name in ("voc", "voc_aug", "coco", "dataset")),
])
def test_labels_record_where_each_images_class_list_came_from(source, lists):
    # an annotator of real images is zero-shot on its unseen classes, but masks or tags chose which images name them
    recipe = load_recipe("tiny", {"annotator": {"checkpoint": "ck"}, **({"source": source} if source else {})})
    assert class_lists(recipe) == lists


def test_manifest_records_the_classes_prompts_named(tmp_path):
    recipe = load_recipe("tiny", {"classes": ["dog", "cat"], "per_pair": 0, "out": str(tmp_path / "ds")})
    manifest = build_manifest(prepare_build(recipe), [], {"generator": "g", "labeler": "l"})
    assert manifest["plan"]["prompted_classes"] == ["cat", "dog"]  # vocabulary order
    assert manifest["labels"]["class_lists"] == "prompt"
    names = get_vocabulary("voc").names
    plan = build_plan(load_recipe("tiny", {"num_samples": 3}))  # a prefix of the plan: its prompts' classes only
    named = prompted_classes(plan, names)
    assert set(named) == {name for sample in plan for name in sample.classes} and len(named) < len(names)
