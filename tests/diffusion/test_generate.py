import numpy as np
import pytest
import torch

from factory.core.conventions import TINY
from factory.core.devices import pick_device, pick_dtype
from factory.core.vocab import COCO, VOC
from factory.diffusion.pipelines import generate, load_pipeline
from factory.diffusion.tiny import tiny_pipeline, tiny_tokenizer
from factory.pipeline.generate import GenerateStage
from factory.pipeline.sections import GeneratorConfig

SETTINGS = dict(steps=2, guidance_scale=5.0, height=64, width=64)
P1, P2, P3 = "a photograph of a dog", "a photograph of a cat and a bus", "a photograph of a potted plant"
A, B, C = 11, 2**62 + 5, 123456789


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def run(pipe, prompts, seeds, **overrides):
    return generate(pipe, prompts, seeds, **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def three(pipe):
    return run(pipe, [P1, P2, P3], [A, B, C])


@pytest.fixture(scope="module")
def one(pipe):
    return run(pipe, [P1], [A])[0]


def diff(x, y):
    return int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())


def test_generates_uint8_images(three):
    assert three.shape == (3, 64, 64, 3) and three.dtype == np.uint8
    assert three.std() > 0  # not a constant image


def test_other_sizes(pipe):
    images = run(pipe, [P1], [A], height=32, width=48, steps=1)
    assert images.shape == (1, 32, 48, 3) and images.dtype == np.uint8


def test_same_seed_same_image(pipe, one):
    again = run(pipe, [P1], [A])
    assert np.array_equal(again[0], one)


def test_image_does_not_depend_on_its_batch(pipe, three, one):
    assert diff(one, three[0]) <= 1
    alone = run(pipe, [P2], [B])
    assert diff(alone[0], three[1]) <= 1
    # Position in the batch does not matter either.
    swapped = run(pipe, [P3, P2], [C, B])
    assert diff(swapped[1], three[1]) <= 1 and diff(swapped[0], three[2]) <= 1


def test_different_seeds_different_images(pipe, one):
    other_seed, other_prompt = run(pipe, [P1, P3], [A + 1, A])
    assert diff(other_seed, one) > 10
    assert np.abs(other_seed.astype(int) - one).mean() > 1
    # The same seed with another prompt: the prompt changes the image too.
    assert diff(other_prompt, one) > 10


def test_tiny_pipeline_is_reproducible(pipe, one):
    fresh = tiny_pipeline()
    fresh.set_progress_bar_config(disable=True)
    assert np.array_equal(run(fresh, [P1], [A])[0], one)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.safety_checker is None


def test_saved_pipeline_loads_by_path(pipe, one, tmp_path):
    path = tmp_path / "sd-tiny"
    pipe.save_pretrained(path, safe_serialization=True)
    assert (path / "model_index.json").is_file()
    for part in ("unet", "vae", "text_encoder"):
        assert list((path / part).glob("*.safetensors")), part
    assert not list(path.rglob("*.bin"))
    loaded = load_pipeline(str(path))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.steps_offset == 1 and not loaded.scheduler.config.clip_sample
    assert loaded.unet.dtype == torch.float32
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert np.array_equal(run(loaded, [P1], [A])[0], one)


def test_tokenizer_class_names_are_few_tokens():
    tokenizer = tiny_tokenizer()
    words = {"a", "photograph", "of", "and"}
    for info in VOC.classes + COCO.classes:
        words.update(info.natural.split())
    for word in sorted(words):
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    assert len(tokenizer("potted plant", add_special_tokens=False).input_ids) == 2
    ids = tokenizer("a photograph of a tv monitor and a hair drier").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 10 + 2


def test_tokenizer_encodes_any_text():
    tokenizer = tiny_tokenizer()
    text_encoder_vocab = tiny_pipeline().text_encoder.config.vocab_size
    assert text_encoder_vocab == len(tokenizer)
    for text in ["Ünïcödé 🦄 zebra-crossing!", "a photograph of a {bus}", "数据集", "x" * 300, ""]:
        ids = tokenizer(text, truncation=True).input_ids
        assert ids and max(ids) < len(tokenizer) and min(ids) >= 0
        assert len(ids) <= 77
    # Padding to the model length, as the pipeline does.
    padded = tokenizer("a dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and max(padded) < len(tokenizer)


def test_pick_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("auto", cuda) == torch.float16
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float32", cuda) == torch.float32
    assert pick_dtype("float16", cpu) == torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected


def test_generate_stage(one):
    stage = GenerateStage(GeneratorConfig(model="tiny", **SETTINGS))
    batch = {"prompt": np.array([P1], dtype=object), "seed": np.array([A], dtype=np.int64),
             "sample_id": np.array(["0000000-a"], dtype=object)}
    out = stage(batch)
    assert out["image"].shape == (1, 64, 64, 3) and out["image"].dtype == np.uint8
    assert out["generate_seconds"].shape == (1,) and (out["generate_seconds"] >= 0).all()
    assert list(out["sample_id"]) == ["0000000-a"]
    if stage.pipe.device.type == "cpu":
        assert np.array_equal(out["image"][0], one)


def test_tiny_builders_leave_the_global_random_state_alone():
    """Built from their own seed: a caller's torch.manual_seed stream goes on as if nothing was built."""
    from factory.detection.maskrcnn import build_maskrcnn
    from factory.diffusion.clip import tiny_clip

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_pipeline(), tiny_clip(), build_maskrcnn(TINY, 64)
    assert torch.equal(torch.rand(4), expected)
