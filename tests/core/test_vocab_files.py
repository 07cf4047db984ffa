"""Vocabulary files: the shipped examples, YAML and TSV, local and on S3, and a file's mistakes
named by file and line."""


import pytest

from factory.core.conventions import RECIPE_DIR
from factory.core.vocab import SHAPES, VOC, get_vocabulary
from factory.core.vocab_files import read_vocabulary

VOCABULARIES = RECIPE_DIR / "vocabularies"


def test_yaml_vocabulary_file():
    signs = read_vocabulary(str(VOCABULARIES / "signs.yaml"))
    assert signs.names == ("stop_sign", "warning_sign", "info_sign") and not signs.builtin
    info = signs.lookup("blue square")  # the natural name finds the class, as in prompt files
    assert (info.name, info.index, info.synonyms) == ("info_sign", 3, ("blue box",))
    # the detector names a class of the mini world's oracle, which labels by shapes indices
    assert (info.detector, info.coco_id) == ("blue square", SHAPES.lookup("blue_square").coco_id)
    assert signs.unseen(1) == ("info_sign",) and signs.seen(1) == ("stop_sign", "warning_sign")
    assert signs.pairs == (("stop_sign", "info_sign"), ("warning_sign", "info_sign"))
    assert get_vocabulary(signs.definition()) == signs and get_vocabulary(signs.spec()) == signs
    assert VOC.spec() == "voc" and get_vocabulary(VOC.definition()) is VOC  # a built-in name is the built-in


def test_tsv_vocabulary_file_is_named_after_the_file():
    warehouse = read_vocabulary(str(VOCABULARIES / "warehouse.tsv"))
    assert warehouse.name == "warehouse" and warehouse.names == ("forklift", "pallet", "hard_hat")
    assert warehouse.lookup("wooden pallet").name == "pallet"
    assert warehouse.lookup("hard_hat").synonyms == ("safety helmet", "construction helmet")
    assert warehouse.lookup("forklift").coco_id == 0 and warehouse.lookup("forklift").detector == ""  # none given
    assert warehouse.unseen_splits == (("hard_hat",),)


def test_vocabulary_file_on_s3(s3_endpoint, bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="vocab/signs.yaml",
                                  Body=(VOCABULARIES / "signs.yaml").read_bytes())
    assert read_vocabulary(f"s3://{bucket}/vocab/signs.yaml") == read_vocabulary(str(VOCABULARIES / "signs.yaml"))
    with pytest.raises(ValueError, match=f"cannot read the vocabulary file s3://{bucket}/vocab/none.yaml"):
        read_vocabulary(f"s3://{bucket}/vocab/none.yaml")


def test_a_tsv_file_names_its_detector_and_may_have_no_splits(tmp_path):
    fruit = tmp_path / "fruit.tsv"
    fruit.write_text("# fruit drawn as shapes\n# detector: shapes\nname\tnatural\tdetector\n"
                     "apple\tred disc\tred disc\npear\tgreen triangle\tgreen_triangle\n")
    vocabulary = read_vocabulary(str(fruit))
    assert vocabulary.detector_space == "shapes" and vocabulary.unseen_splits == ()
    assert [c.coco_id for c in vocabulary.classes] == [SHAPES.lookup("red disc").coco_id,
                                                       SHAPES.lookup("green triangle").coco_id]
    with pytest.raises(ValueError, match="vocabulary fruit has no seen/unseen splits"):
        vocabulary.unseen(1)


@pytest.mark.parametrize("file, text, message", [
    ("mine.yaml", "name: mine\nclasses:\n  - a\n  - name: background\n",
     "mine.yaml:4: vocabulary mine: class name 'background' is reserved (every label map has background, 0, and "
     "ignore, 255); name the class otherwise"),
    ("mine.tsv", "name\nroad\nIgnore\n", "mine.tsv:3: vocabulary mine: class name 'Ignore' is reserved"),
    ("mine.yaml", "name: mine\nclasses:\n  - name: go\n    natural: \"\"\n",
     "mine.yaml:4: vocabulary mine: class go's natural is empty; give the words that prompt it, or leave natural "
     "out (the name, _ as spaces)"),
    ("mine.yaml", "name: mine\nclasses:\n  - {name: a, synonyms: [car]}\n  - {name: b, synonyms: [car]}\n",
     "mine.yaml:4: vocabulary mine: class b's synonym 'car' also names class a; a word names one class"),
    ("mine.tsv", "name\tsynonyms\nvehicle\tcar,truck\ncar\t\n",
     "mine.tsv:2: vocabulary mine: class vehicle's synonym 'car' also names class car; a word names one class"),
    ("mine.yaml", "name: mine\nclasses:\n  - name: street\n    synonyms: road\n",
     "mine.yaml:4: vocabulary mine: class street's synonyms are a list of names, [road], not 'road'"),
    ("mine.yaml", "name: mine\nclasses: [road, car]\nunseen: [road]\n",
     "mine.yaml:3: vocabulary mine: unseen is a list of lists of classes, [[a], [b, c]]; item 1 is 'road'"),
    ("mine.yaml", "name: mine\nclasses: [road, car]\npairs: road\n",
     "mine.yaml:3: vocabulary mine: pairs is a list of lists of classes, [[a, b]], not 'road'"),
    ("mine.yaml", "name: mine\nclasses:\n  - name: a\n   natural: b\n",
     "mine.yaml:4: not valid YAML: expected <block end>, but found '<block mapping start>'"),
    ("mine.tsv", "name\tnatural\na\tb\tc\n", "mine.tsv:2: more cells than the header's 2 columns"),
])
def test_a_vocabulary_files_mistake_is_one_line_naming_the_file_and_line(tmp_path, file, text, message):
    (tmp_path / file).write_text(text)
    with pytest.raises(ValueError) as info:
        read_vocabulary(str(tmp_path / file))
    assert str(info.value).startswith(f"{tmp_path / file}:") and message in str(info.value), str(info.value)
