import math

import boto3
import numpy as np
import pytest
import torch

from factory.diffusion.clip import PROMPTS, QualityScorer, load_clip, select_top_fraction, tiny_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


@pytest.fixture(scope="module")
def scorer(clip):
    return QualityScorer(*clip, batch_size=4)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (6, 48, 40, 3), dtype=np.uint8)
    # Smooth images as well as noise, so that scores differ from image to image.
    ramp = np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None].repeat(48, 0).repeat(3, 2)
    return np.concatenate([noise, ramp[None], 255 - ramp[None]])


def test_scores_are_probabilities(scorer, images):
    scores = scorer(images)
    assert scores.shape == (len(images),) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.std() > 0


def test_no_images_no_scores(scorer, images):
    assert scorer(images[:0]).shape == (0,)


def test_deterministic(scorer, images):
    again = QualityScorer(*tiny_clip())
    np.testing.assert_array_equal(scorer(images), scorer(images))
    np.testing.assert_allclose(again(images), scorer(images), atol=1e-6)


def test_score_does_not_depend_on_batch_mates(scorer, images):
    together = scorer(images)  # two batches of four
    alone = np.concatenate([scorer(images[i:i + 1]) for i in range(len(images))])
    reversed_ = scorer(images[::-1])[::-1]
    np.testing.assert_allclose(alone, together, atol=1e-5)
    np.testing.assert_allclose(reversed_, together, atol=1e-5)


def test_score_is_softmax_of_scaled_cosines(clip, scorer, images):
    model, tokenizer, processor = clip
    with torch.inference_mode():
        text = tokenizer(list(PROMPTS), padding=True, return_tensors="pt")
        good, bad = model.get_text_features(**text).pooler_output
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        cosines = torch.stack([torch.cosine_similarity(image, good[None]),
                               torch.cosine_similarity(image, bad[None])], dim=1)
        expected = torch.softmax(model.logit_scale.exp() * cosines, dim=1)[:, 0].numpy()
    np.testing.assert_allclose(scorer(images), expected, atol=1e-5)


def test_prompts_are_configurable(clip, scorer, images):
    swapped = QualityScorer(*clip, prompts=PROMPTS[::-1])
    np.testing.assert_allclose(swapped(images), 1 - scorer(images), atol=1e-5)


def test_saved_model_scores_the_same_from_a_folder_and_from_s3(images, tmp_path, bucket, s3_endpoint,
                                                               monkeypatch):
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    saved = tiny_clip()
    with torch.no_grad():
        saved[0].logit_scale.fill_(math.log(50.0))  # differ from a freshly built tiny CLIP
    folder = tmp_path / "clip"
    for part in saved:
        part.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for file in folder.iterdir():
        s3.upload_file(str(file), bucket, f"models/clip/{file.name}")

    expected = QualityScorer(*saved)(images)
    for source in (str(folder), f"s3://{bucket}/models/clip"):
        np.testing.assert_array_equal(QualityScorer(*load_clip(source))(images), expected)


def test_select_top_fraction():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 0.0])
    keep = select_top_fraction(scores, 0.8)
    assert keep.dtype == bool and keep.sum() == 8
    assert not keep[0] and not keep[9]
    assert select_top_fraction(scores, 0.7).sum() == 7  # 0.7 * 10 is 7.000000000000001
    assert select_top_fraction(scores, 0.25).sum() == 3  # rounded up: at least the fraction
    assert select_top_fraction(scores, 1.0).all()
    assert select_top_fraction(scores[:1], 0.01).tolist() == [True]
    assert select_top_fraction(np.array([]), 0.5).shape == (0,)


def test_select_top_fraction_breaks_ties_by_index():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    assert select_top_fraction(scores, 0.6).tolist() == [True, True, True, False, False]
    assert select_top_fraction(np.full(4, 0.3), 0.5).tolist() == [True, True, False, False]


@pytest.mark.parametrize("fraction", [0.0, -0.2, 1.01, float("nan")])
def test_select_top_fraction_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        select_top_fraction(np.array([0.2, 0.4]), fraction)
