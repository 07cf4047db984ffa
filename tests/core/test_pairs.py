import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.core.pairs import (
    all_pairs,
    load_pairs,
    pairs_from_coco,
    pairs_from_voc_annotations,
    pairs_from_voc_segmentation,
    read_image_ids,
    save_pairs,
)
from factory.core.vocab import COCO, VOC
from jobs import derive_pairs

REPO = Path(__file__).resolve().parents[2]




# ---------------------------------------------------------------- VOC fixtures

# Objects per image; "person+parts" is a person with <part> children (layout boxes).
VOC_IMAGES = {
    "2008_000001": ["dog", "person+parts", "person"],
    "2008_000002": ["sofa", "cat", "dog"],
    "2008_000003": ["dog", "person"],
    "2008_000004": ["aeroplane"],
    "2008_000005": ["diningtable", "chair", "chair"],
}
VOC_ALL = Counter({("dog", "person"): 2, ("cat", "dog"): 1, ("cat", "sofa"): 1,
                   ("dog", "sofa"): 1, ("chair", "diningtable"): 1})


def voc_object(name):
    parts = ""
    if name == "person+parts":
        name = "person"
        parts = "".join(
            f"<part><name>{p}</name><bndbox><xmin>10</xmin><ymin>10</ymin>"
            f"<xmax>20</xmax><ymax>20</ymax></bndbox></part>" for p in ("head", "hand"))
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>48</xmin><ymin>240</ymin>"
            f"<xmax>195</xmax><ymax>371</ymax></bndbox>{parts}</object>")


def write_voc_xml(directory, image_id, objects):
    xml = (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
           f"<source><database>The VOC2008 Database</database></source>"
           f"<size><width>500</width><height>375</height><depth>3</depth></size>"
           f"<segmented>1</segmented>{''.join(map(voc_object, objects))}</annotation>")
    (directory / f"{image_id}.xml").write_text(xml)


@pytest.fixture
def voc_annotations(tmp_path):
    directory = tmp_path / "VOC2012" / "Annotations"
    directory.mkdir(parents=True)
    for image_id, objects in VOC_IMAGES.items():
        write_voc_xml(directory, image_id, objects)
    return directory


def write_image_list(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids) + "\n")
    return path


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


def write_voc_png(directory, image_id, class_names):
    """A label map with one square per class, each with a 255 (void) border."""
    labels = np.zeros((40, 20 * max(len(class_names), 1) + 4), dtype=np.uint8)
    for k, name in enumerate(class_names):
        x = 2 + 20 * k
        labels[4:36, x:x + 18] = 255
        labels[6:34, x + 2:x + 16] = VOC.lookup(name).index
    image = Image.fromarray(labels, mode="P")
    image.putpalette(voc_palette())
    image.save(directory / f"{image_id}.png")


@pytest.fixture
def voc_segmentation(tmp_path):
    directory = tmp_path / "VOC2012" / "SegmentationClass"
    directory.mkdir(parents=True)
    for image_id, objects in VOC_IMAGES.items():
        write_voc_png(directory, image_id, [o.split("+")[0] for o in objects])
    write_voc_png(directory, "2008_000006", [])  # background and nothing else
    return directory


# --------------------------------------------------------------- COCO fixture

COCO_CATEGORIES = [(1, "person"), (5, "airplane"), (17, "cat"), (18, "dog"), (63, "couch"),
                   (72, "tv"), (73, "laptop"), (74, "mouse")]
# (image id, category id, iscrowd)
COCO_ANNOTATIONS = [
    (1, 1, 0), (1, 18, 0), (1, 18, 0),  # person, two dogs
    (2, 73, 0), (2, 74, 0), (2, 72, 0),  # laptop, mouse, tv: mouse is dropped
    (3, 1, 1), (3, 18, 0),               # a crowd of people and a dog
    (4, 74, 0), (4, 17, 0),              # mouse and cat: no pair left
    (5, 17, 0), (5, 63, 0),              # cat on a couch
]


def write_coco(path, categories=COCO_CATEGORIES, annotations=COCO_ANNOTATIONS):
    data = {
        "info": {"description": "fixture"},
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480}
                   for i in range(1, 7)],
        "annotations": [{"id": k, "image_id": img, "category_id": cat, "iscrowd": crowd,
                         "area": 100.0, "bbox": [0, 0, 10, 10], "segmentation": []}
                        for k, (img, cat, crowd) in enumerate(annotations, start=1)],
        "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories],
    }
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------- tests


def test_voc_annotations_pairs_and_counts(voc_annotations):
    assert pairs_from_voc_annotations(voc_annotations) == VOC_ALL


def test_voc_annotations_image_list(voc_annotations, tmp_path):
    listing = write_image_list(tmp_path / "train.txt", ["2008_000001", "2008_000002"])
    counts = pairs_from_voc_annotations(voc_annotations, read_image_ids(listing))
    assert counts == Counter({("dog", "person"): 1, ("cat", "dog"): 1, ("cat", "sofa"): 1,
                              ("dog", "sofa"): 1})


def test_voc_annotations_errors(voc_annotations):
    with pytest.raises(FileNotFoundError, match="2008_999999.xml"):
        pairs_from_voc_annotations(voc_annotations, ["2008_000001", "2008_999999"])
    write_voc_xml(voc_annotations, "2008_000007", ["dgo"])
    with pytest.raises(ValueError, match=r"2008_000007.xml: unknown class 'dgo'.*dog"):
        pairs_from_voc_annotations(voc_annotations)


def test_read_image_ids_takes_the_first_column(tmp_path):
    path = tmp_path / "dog_trainval.txt"
    path.write_text("2008_000001  1\n2008_000002 -1\n\n")
    assert read_image_ids(path) == ["2008_000001", "2008_000002"]


def test_voc_segmentation_reads_indices_not_colours(voc_segmentation):
    with Image.open(voc_segmentation / "2008_000002.png") as image:
        assert image.mode == "P"
        assert set(np.unique(np.array(image))) == {0, 255, 8, 12, 18}  # cat, dog, sofa
    assert pairs_from_voc_segmentation(voc_segmentation) == VOC_ALL


def test_voc_segmentation_image_list(voc_segmentation):
    counts = pairs_from_voc_segmentation(voc_segmentation, ["2008_000003", "2008_000005"])
    assert counts == Counter({("dog", "person"): 1, ("chair", "diningtable"): 1})


def test_voc_segmentation_rejects_colour_pngs(voc_segmentation):
    with Image.open(voc_segmentation / "2008_000001.png") as image:
        image.convert("RGB").save(voc_segmentation / "2008_000001.png")
    with pytest.raises(ValueError, match="expected a palette PNG"):
        pairs_from_voc_segmentation(voc_segmentation)


def test_coco_pairs_skip_mouse_and_count_crowds(tmp_path):
    counts = pairs_from_coco(write_coco(tmp_path / "instances_val2017.json"))
    assert counts == Counter({("person", "dog"): 2, ("tv", "laptop"): 1, ("cat", "couch"): 1})


def test_coco_pairs_in_the_voc_vocabulary(tmp_path):
    counts = pairs_from_coco(write_coco(tmp_path / "instances.json"), vocabulary=VOC)
    assert counts == Counter({("dog", "person"): 2, ("cat", "sofa"): 1})


def test_coco_rejects_non_official_category_ids(tmp_path):
    path = write_coco(tmp_path / "instances.json", categories=[(1, "dog"), (18, "person")],
                      annotations=[(1, 1, 0), (1, 18, 0)])
    with pytest.raises(ValueError, match="category id 1 is 'dog'"):
        pairs_from_coco(path)


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "pairs" / "voc.tsv"
    save_pairs(path, {("person", "dog"): 2, ("sofa", "cat"): 1, ("dining table", "chair"): 3},
               VOC, source="fixture")
    assert path.read_text() == ("# vocabulary: voc\n# source: fixture\n"
                                "cat\tsofa\t1\nchair\tdiningtable\t3\ndog\tperson\t2\n")
    assert load_pairs(path, VOC) == [("cat", "sofa"), ("chair", "diningtable"),
                                     ("dog", "person")]


def test_load_accepts_natural_names_and_collapses_duplicates(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# hand-written\n\npotted plant\tdining table\n"
                    "diningtable\tpottedplant\t4\n  tv monitor\tSofa  \n")
    assert load_pairs(path, VOC) == [("diningtable", "pottedplant"), ("sofa", "tvmonitor")]
    assert load_pairs(path, COCO) == [("couch", "tv"), ("potted plant", "dining table")]


@pytest.mark.parametrize("line,message", [
    ("dgo\tcat", r"pairs.tsv:3: unknown class 'dgo' in vocabulary voc \(did you mean: dog\?\)"),
    ("dog\tdog", r"pairs.tsv:3: pair of 'dog' with itself"),
    ("dog\tdog monitor", r"pairs.tsv:3: unknown class 'dog monitor'"),
    ("dog cat", r"pairs.tsv:3: expected 'class_a<TAB>class_b\[<TAB>images\]'"),
    ("dog\tcat\tmany", r"pairs.tsv:3: expected"),
    ("dog\tcat\t1\t2", r"pairs.tsv:3: expected"),
])
def test_load_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.tsv"
    path.write_text(f"# vocabulary: voc\ncat\tdog\t1\n{line}\n")
    with pytest.raises(ValueError, match=message) as info:
        load_pairs(path, VOC)
    assert "\n" not in str(info.value)


def test_load_rejects_a_file_of_another_vocabulary(tmp_path):
    path = tmp_path / "coco.tsv"
    save_pairs(path, {("cat", "dog"): 1}, COCO, source="fixture")
    with pytest.raises(ValueError, match="coco.tsv:1: pairs of vocabulary 'coco'"):
        load_pairs(path, VOC)


def test_all_pairs():
    assert all_pairs(["person", "dog", "cat", "Dog"], VOC) == [
        ("cat", "dog"), ("cat", "person"), ("dog", "person")]
    assert len(all_pairs(VOC.names, VOC)) == 20 * 19 // 2
    assert len(all_pairs(COCO.names, COCO)) == 79 * 78 // 2


# ------------------------------------------------------------------------ CLI


def test_cli_voc_annotations(voc_annotations, tmp_path, capsys):
    listing = write_image_list(tmp_path / "ImageSets" / "Segmentation" / "trainval.txt",
                               ["2008_000001", "2008_000002", "2008_000003"])
    out = tmp_path / "pairs" / "voc.tsv"
    assert derive_pairs.main(["--voc-annotations", str(voc_annotations),
                              "--image-list", str(listing), "--out", str(out)]) == 0
    assert load_pairs(out, VOC) == [("cat", "dog"), ("cat", "sofa"), ("dog", "person"),
                                    ("dog", "sofa")]
    assert "dog\tperson\t2" in out.read_text().splitlines()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"4 pairs covering 4 of 20 voc classes written to {out}"]


def test_cli_min_images(voc_segmentation, tmp_path):
    out = tmp_path / "voc.tsv"
    assert derive_pairs.main(["--voc-segmentation", str(voc_segmentation),
                              "--min-images", "2", "--out", str(out)]) == 0
    assert load_pairs(out, VOC) == [("dog", "person")]


def test_cli_coco(tmp_path, capsys):
    out = tmp_path / "coco.tsv"
    json_path = write_coco(tmp_path / "instances_train2017.json")
    assert derive_pairs.main(["--coco-instances", str(json_path), "--out", str(out)]) == 0
    assert load_pairs(out, COCO) == [("person", "dog"), ("cat", "couch"), ("tv", "laptop")]
    assert "3 pairs covering 6 of 79 coco classes" in capsys.readouterr().out


@pytest.mark.parametrize("make_args", [
    lambda d, t: ["--voc-annotations", str(t / "missing")],
    lambda d, t: ["--voc-annotations", str(d), "--image-list", str(t / "missing.txt")],
    lambda d, t: ["--voc-annotations", str(d),
                  "--image-list", str(write_image_list(t / "one.txt", ["2008_000004"]))],
    lambda d, t: ["--voc-annotations", str(d), "--min-images", "3"],
    lambda d, t: ["--coco-instances", str(t / "instances.json")],
])
def test_cli_errors_are_one_line_and_write_nothing(voc_annotations, tmp_path, capsys,
                                                   make_args):
    out = tmp_path / "out" / "pairs.tsv"
    assert derive_pairs.main(make_args(voc_annotations, tmp_path) + ["--out", str(out)]) == 2
    assert not out.parent.exists()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith("derive_pairs: error: ")


def test_cli_needs_exactly_one_source(voc_annotations, tmp_path):
    json_path = write_coco(tmp_path / "instances.json")
    for args in ([], ["--voc-annotations", str(voc_annotations), "--coco-instances",
                      str(json_path)]):
        assert derive_pairs.main(args + ["--out", str(tmp_path / "x.tsv")]) == 2
    assert not (tmp_path / "x.tsv").exists()
