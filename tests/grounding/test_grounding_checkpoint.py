from factory.core.vocab import SHAPES
from factory.core.vocab_files import read_vocabulary
from grounding.checkpoint import classes_seen, read_grounding_metadata


def test_classes_seen_matches_a_users_classes_by_their_words():
    """The shipped module was trained on split 1's seen shapes: a user's sign drawn as a seen shape
    was seen under its shape's name; the one drawn as an unseen shape (red disc) was not."""
    metadata = read_grounding_metadata("models/shapes-grounding")
    assert classes_seen(metadata, SHAPES) == list(SHAPES.seen(1))
    signs = read_vocabulary("factory/recipes/vocabularies/signs.yaml")
    assert {c.name: c.natural for c in signs.classes} == {
        "stop_sign": "red disc", "warning_sign": "yellow triangle", "info_sign": "blue square"}
    assert classes_seen(metadata, signs) == ["warning_sign", "info_sign"]
