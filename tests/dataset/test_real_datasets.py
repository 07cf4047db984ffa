import json

import numpy as np
import pytest
from PIL import Image

from factory.core.vocab import COCO
from factory.dataset.real import (
    COCOSemantic,
    VOCAugSegmentation,
    VOCSegmentation,
    ignore_classes,
    real_dataset,
    voc_val_overlap,
)

# ---------------------------------------------------------------- VOC fixture


def voc_palette():
    """The standard PASCAL VOC colour map (index 255 is the cream 'void' colour)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_label(shape, boxes):
    """Label map with one box per (index, top, left, bottom, right), each in a 255 border."""
    label = np.zeros(shape, dtype=np.uint8)
    for index, top, left, bottom, right in boxes:
        label[top - 2:bottom + 2, left - 2:right + 2] = 255
        label[top:bottom, left:right] = index
    return label


# image id -> label map; 12 dog, 15 person, 20 tvmonitor, 8 cat, 18 sofa
VOC_LABELS = {
    "2007_000032": voc_label((30, 40), [(12, 4, 4, 14, 20), (15, 16, 22, 26, 36)]),
    "2007_000039": voc_label((24, 32), [(20, 6, 6, 18, 26)]),
    "2008_000002": voc_label((20, 28), [(8, 3, 3, 10, 12), (18, 12, 14, 17, 25)]),
}


def write_palette_png(path, label):
    image = Image.fromarray(label, mode="P")
    image.putpalette(voc_palette())
    image.save(path)


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for image_id, label in VOC_LABELS.items():
        pixels = np.full((*label.shape, 3), (200, 120, 40), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", label)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(
        f"{i}\n" for i in VOC_LABELS))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2008_000002\n")
    return root


def test_voc_reads_palette_indices(voc_root):
    dataset = VOCSegmentation(voc_root)
    assert len(dataset) == 3
    assert dataset.ids == list(VOC_LABELS)
    for i, (image_id, expected) in enumerate(VOC_LABELS.items()):
        sample = dataset[i]
        assert sample.image_id == image_id
        assert sample.image.dtype == np.uint8 and sample.image.shape == (*expected.shape, 3)
        assert np.abs(sample.image.astype(int) - (200, 120, 40)).max() <= 4  # JPEG loss
        assert sample.label.dtype == np.uint8
        np.testing.assert_array_equal(sample.label, expected)
    # The colour of dog (12) is not 12: the reader must have read indices, not colours.
    with Image.open(voc_root / "SegmentationClass" / "2007_000032.png") as png:
        assert png.convert("RGB").getpixel((4, 4)) == (64, 0, 128)
    assert dataset[0].label[4, 4] == 12


def test_voc_other_split(voc_root):
    dataset = real_dataset("voc", voc_root, "train")
    assert isinstance(dataset, VOCSegmentation)
    assert dataset.ids == ["2008_000002"]
    assert set(np.unique(dataset[0].label)) == {0, 8, 18, 255}


def test_voc_missing_files(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC root not found"):
        VOCSegmentation(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"VOC split 'test' has no image list"):
        VOCSegmentation(voc_root, "test")
    (voc_root / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 listed images .*first: 2007_000039.png"):
        VOCSegmentation(voc_root)


def test_voc_rejects_rgb_label_pngs(voc_root):
    path = voc_root / "SegmentationClass" / "2007_000039.png"
    with Image.open(path) as png:
        png.convert("RGB").save(path)
    dataset = VOCSegmentation(voc_root)
    with pytest.raises(ValueError, match="expected a palette PNG of class indices, got mode RGB"
                       ) as info:
        dataset[1]
    assert "\n" not in str(info.value)


def test_voc_rejects_values_that_are_no_class(voc_root):
    label = VOC_LABELS["2007_000039"].copy()
    label[0, 0] = 21
    write_palette_png(voc_root / "SegmentationClass" / "2007_000039.png", label)
    with pytest.raises(ValueError, match=r"label values \[21\] are no voc class index"):
        VOCSegmentation(voc_root)[1]


def test_voc_aug_reads_sbd_masks(voc_root):
    """SBD's augmented set: greyscale index PNGs in SegmentationClassAug, listed in train_aug."""
    (voc_root / "SegmentationClassAug").mkdir()
    extra = voc_label((26, 30), [(13, 4, 4, 20, 24)])  # an SBD-only image: horse
    Image.fromarray(np.full((26, 30, 3), 90, np.uint8)).save(voc_root / "JPEGImages" / "2008_000003.jpg")
    Image.fromarray(extra, mode="L").save(voc_root / "SegmentationClassAug" / "2008_000003.png")
    Image.fromarray(VOC_LABELS["2008_000002"], mode="L").save(voc_root / "SegmentationClassAug" / "2008_000002.png")
    (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_000002\n2008_000003\n")

    dataset = real_dataset("voc_aug", voc_root)  # train_aug by default
    assert isinstance(dataset, VOCAugSegmentation) and dataset.ids == ["2008_000002", "2008_000003"]
    np.testing.assert_array_equal(dataset[1].label, extra)
    np.testing.assert_array_equal(dataset[0].label, VOC_LABELS["2008_000002"])
    # The fixture's val lists 2008_000002 too: such a list must not train a model scored on val.
    assert voc_val_overlap(dataset) == ["2008_000002"]
    (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_000003\n")
    assert voc_val_overlap(VOCAugSegmentation(voc_root)) == []
    (voc_root / "SegmentationClassAug" / "2008_000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 listed images .*SegmentationClassAug \(first: 2008_000003.png"):
        VOCAugSegmentation(voc_root)


# --------------------------------------------------------------- COCO fixture

OFFICIAL_CATEGORIES = [(1, "person"), (17, "cat"), (18, "dog"), (63, "couch"), (72, "tv"),
                       (73, "laptop"), (74, "mouse")]
PERSON, DOG, TV, LAPTOP = (COCO.lookup(n).index for n in ("person", "dog", "tv", "laptop"))


def rectangle(left, top, right, bottom):
    """COCO polygon of a rectangle: pycocotools fills rows top..bottom-1, cols left..right-1."""
    return [[left, top, right, top, right, bottom, left, bottom]]


def uncompressed_rle(mask):
    """COCO's crowd format: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"counts": [0] + runs if flat[0] else runs, "size": list(mask.shape)}


CROWD = np.zeros((24, 32), dtype=np.uint8)
CROWD[0:10, 0:12] = 1

# (annotation id, image id, category id, iscrowd, segmentation). Image 139 lists the small
# dog before the large person it overlaps, so file order alone would hide the dog.
COCO_ANNOTATIONS = [
    (1, 139, 18, 0, rectangle(20, 10, 36, 20)),  # dog, 160 px
    (2, 139, 1, 0, rectangle(2, 2, 30, 26)),     # person, 672 px
    (3, 139, 74, 0, rectangle(4, 4, 10, 8)),     # mouse on the person, 24 px
    (4, 285, 1, 1, uncompressed_rle(CROWD)),     # crowd of people, 120 px
    (5, 285, 18, 0, rectangle(8, 5, 16, 15)),    # dog on the crowd, 80 px
    (6, 285, 73, 0, rectangle(18, 18, 28, 24)),  # laptop, 60 px
    (7, 285, 72, 0, rectangle(20, 16, 30, 22)),  # tv, 60 px: same area, drawn after laptop
]
COCO_IMAGES = {139: (30, 40), 285: (24, 32)}  # id -> (height, width)


def expected_coco_labels():
    first = np.zeros(COCO_IMAGES[139], dtype=np.uint8)
    first[2:26, 2:30] = PERSON
    first[10:20, 20:36] = DOG
    first[4:8, 4:10] = 255
    second = np.zeros(COCO_IMAGES[285], dtype=np.uint8)
    second[0:10, 0:12] = PERSON
    second[5:15, 8:16] = DOG
    second[18:24, 18:28] = LAPTOP
    second[16:22, 20:30] = TV
    return {"000000000139": first, "000000000285": second}


def write_coco_tree(root, categories=OFFICIAL_CATEGORIES):
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for image_id, shape in COCO_IMAGES.items():
        # 285 is greyscale, as some real COCO images are.
        pixels = np.full(shape, 90, np.uint8) if image_id == 285 else \
            np.full((*shape, 3), (30, 160, 220), np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / f"{image_id:012d}.jpg", quality=95)
    data = {
        "info": {"description": "fixture", "version": "1.0", "year": 2017},
        "licenses": [],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w,
                    "license": 1} for i, (h, w) in COCO_IMAGES.items()],
        "annotations": [{"id": k, "image_id": img, "category_id": cat, "iscrowd": crowd,
                         "segmentation": segmentation, "area": 0.0, "bbox": [0, 0, 1, 1]}
                        for k, img, cat, crowd, segmentation in COCO_ANNOTATIONS],
        "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco_root(tmp_path):
    return write_coco_tree(tmp_path / "coco")


def test_coco_semantic_maps(coco_root):
    dataset = COCOSemantic(coco_root)
    expected = expected_coco_labels()
    assert len(dataset) == 2
    assert dataset.ids == list(expected)
    for i, (image_id, label) in enumerate(expected.items()):
        sample = dataset[i]
        assert sample.image_id == image_id
        assert sample.image.dtype == np.uint8 and sample.image.shape == (*label.shape, 3)
        assert sample.label.dtype == np.uint8
        np.testing.assert_array_equal(sample.label, label)


def test_coco_rules_pixel_by_pixel(coco_root):
    first, second = (sample.label for sample in COCOSemantic(coco_root))
    assert DOG == 17  # COCO id 18: id 12 is unused by COCO, hence one less
    assert first[15, 25] == DOG    # small dog drawn over the large person
    assert first[5, 5] == 255      # mouse: dropped class, ignored
    assert first[3, 3] == PERSON
    assert first[28, 38] == 0      # no annotation: background
    assert second[1, 1] == PERSON  # crowd counts as its class
    assert second[6, 9] == DOG
    assert second[19, 25] == TV    # equal areas: the later annotation id wins
    assert second[23, 19] == LAPTOP


def test_coco_reads_greyscale_images_as_rgb(coco_root):
    image = COCOSemantic(coco_root)[1].image
    assert image.shape == (24, 32, 3)
    assert np.abs(image.astype(int) - 90).max() <= 2


def test_coco_explicit_annotation_path(coco_root, tmp_path):
    moved = tmp_path / "instances.json"
    (coco_root / "annotations" / "instances_val2017.json").rename(moved)
    with pytest.raises(FileNotFoundError, match="COCO annotation file not found"):
        COCOSemantic(coco_root)
    assert COCOSemantic(coco_root, annotations=moved).ids == ["000000000139", "000000000285"]


def test_coco_missing_files(coco_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO image directory not found"):
        COCOSemantic(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="COCO image directory not found"):
        COCOSemantic(coco_root, "train2017")
    (coco_root / "val2017" / "000000000285.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 listed images .*first: 000000000285.jpg"):
        COCOSemantic(coco_root)


def test_coco_rejects_non_official_category_ids(tmp_path):
    root = write_coco_tree(tmp_path / "coco", categories=[(1, "dog"), (18, "person")])
    with pytest.raises(ValueError, match="category id 1 is 'dog'"):
        COCOSemantic(root)


def test_coco_rejects_a_file_that_is_not_coco(coco_root):
    (coco_root / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        COCOSemantic(coco_root)


# ------------------------------------------------------------------- helpers


def test_ignore_classes():
    label = np.array([[0, 1, 2], [3, 255, 2]], dtype=np.uint8)
    ignored = ignore_classes(label, [2, 3])
    np.testing.assert_array_equal(ignored, [[0, 1, 255], [255, 255, 255]])
    assert ignored.dtype == np.uint8
    assert label[0, 2] == 2  # the input is left alone
    np.testing.assert_array_equal(ignore_classes(label, []), label)


def test_real_dataset_defaults_and_errors(voc_root, coco_root):
    assert len(real_dataset("voc", voc_root)) == 3
    assert isinstance(real_dataset("coco", coco_root), COCOSemantic)
    with pytest.raises(ValueError, match=r"unknown dataset format 'ade' \(choices: voc, voc_aug, coco\)"):
        real_dataset("ade", voc_root)


def test_present_classes_agree_with_the_label_maps(voc_root, coco_root):
    """What a build from real images plans with (factory/pipeline/images.py), read without the images."""
    for reader in (VOCSegmentation(voc_root, "val"), COCOSemantic(coco_root)):
        for i in range(len(reader)):
            label = reader[i].label
            assert reader.present(i) == sorted(int(v) for v in np.unique(label) if v not in (0, 255))
