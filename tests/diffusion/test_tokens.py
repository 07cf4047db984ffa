import pytest
import torch
from transformers import CLIPTokenizer

from factory.diffusion.tiny import tiny_tokenizer
from factory.diffusion.tokens import class_embeddings, class_token_positions


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tokens_at(tokenizer, prompt, positions):
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    return [ids[i] for i in positions]


def spelled(tokenizer, prompt, positions):
    return tokenizer.decode(tokens_at(tokenizer, prompt, positions)).strip()


def test_one_class(tokenizer):
    prompt = "a photograph of a dog"
    assert class_token_positions(tokenizer, prompt, ["dog"]) == [[5]]  # 0 is the start token
    assert class_token_positions(tokenizer, "A Photograph of a DOG", ["dog"]) == [[5]]


def test_two_classes_with_a_two_word_name(tokenizer):
    prompt = "a photograph of a dining table and a dog"
    positions = class_token_positions(tokenizer, prompt, ("dining table", "dog"))
    assert positions == [[5, 6], [9]]
    assert [spelled(tokenizer, prompt, p) for p in positions] == ["dining table", "dog"]


def test_class_order_need_not_follow_the_prompt(tokenizer):
    prompt = "a photograph of a cat and a bus"
    assert class_token_positions(tokenizer, prompt, ["bus", "cat"]) == [[8], [5]]


def test_multi_token_word(tokenizer):
    prompt = "a photograph of a zebracorn and a dog"
    [zebracorn, dog] = class_token_positions(tokenizer, prompt, ["zebracorn", "dog"])
    assert len(zebracorn) > 1 and zebracorn == list(range(5, 5 + len(zebracorn)))
    assert spelled(tokenizer, prompt, zebracorn) == "zebracorn"
    assert spelled(tokenizer, prompt, dog) == "dog" and dog == [zebracorn[-1] + 3]


def test_repeated_word_takes_successive_occurrences(tokenizer):
    prompt = "a dog and a dog"
    assert class_token_positions(tokenizer, prompt, ["dog", "dog"]) == [[2], [5]]
    with pytest.raises(ValueError, match="dog"):
        class_token_positions(tokenizer, prompt, ["dog", "dog", "dog"])


def test_whole_word_preferred_then_part_of_a_word(tokenizer):
    prompt = "a busy street with a bus"
    [bus] = class_token_positions(tokenizer, prompt, ["bus"])
    assert spelled(tokenizer, prompt, bus) == "bus" and bus == [13]
    # Inside a longer word: the tokens overlapping the class word (here "do" "g", not "s").
    assert class_token_positions(tokenizer, "two dogs", ["dog"]) == [[4, 5]]


def test_word_not_in_prompt(tokenizer):
    with pytest.raises(ValueError, match="'cat' not found in prompt 'a photograph of a dog'"):
        class_token_positions(tokenizer, "a photograph of a dog", ["cat"])


def test_truncated_word(tokenizer):
    # 75 prompt tokens fit between the start and end tokens.
    with pytest.raises(ValueError, match="'cat' is cut off by truncation at 77"):
        class_token_positions(tokenizer, "a " * 80 + "cat", ["cat"])
    partly = "a " * 74 + "zebracorn"  # only its first token fits
    with pytest.raises(ValueError, match="zebracorn"):
        class_token_positions(tokenizer, partly, ["zebracorn"])
    assert class_token_positions(tokenizer, "a " * 74 + "dog", ["dog"]) == [[75]]


def test_saved_and_reloaded_tokenizer_gives_the_same_positions(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    cases = [("a photograph of a dining table and a dog", ["dining table", "dog"]),
             ("a photograph of a zebracorn and a dog", ["zebracorn", "dog"]),
             ("a dog and a dog", ["dog", "dog"])]
    for prompt, words in cases:
        positions = class_token_positions(reloaded, prompt, words)
        assert positions == class_token_positions(tokenizer, prompt, words)
        for p in positions:
            assert tokens_at(reloaded, prompt, p) == tokens_at(tokenizer, prompt, p)


def test_class_embeddings_average_the_class_tokens():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    embeddings, mask = class_embeddings(hidden, [[[1, 2], [4]], [[3]]])
    assert embeddings.shape == (2, 2, 3) and mask.shape == (2, 2)
    assert torch.equal(embeddings[0, 0], (hidden[0, 1] + hidden[0, 2]) / 2)
    assert torch.equal(embeddings[0, 1], hidden[0, 4])
    assert torch.equal(embeddings[1, 0], hidden[1, 3])
    assert torch.equal(embeddings[1, 1], torch.zeros(3))
    assert mask.tolist() == [[True, True], [True, False]]


def test_class_embeddings_need_one_position_list_per_sample():
    with pytest.raises(ValueError, match="1 position lists for a batch of 2"):
        class_embeddings(torch.zeros(2, 4, 3), [[[1]]])
