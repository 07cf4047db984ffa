"""The cost model: every figure follows from the recipe, the plan size, the rates and the GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.core.options import ConfigError
from factory.pipeline.cost import (
    DEFAULT_RATES,
    FEATURE_BYTES_512,
    LATENT_BYTES_512,
    MASKRCNN_BENCH_TFLOP,
    Rates,
    bytes_per_sample,
    estimate,
    format_estimate,
    in_flight_bytes,
    load_rates,
)
from factory.pipeline.labelers.open_vocabulary import OPEN_VOCABULARY_TFLOP
from factory.pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RATES = Rates(source="test", image_size=512, unet_forwards_per_s=100.0, vae_images_per_s=10.0, label_images_per_s=40.0)


def test_gpu_hours_are_samples_over_rates():
    recipe = load_recipe("voc-oracle-one")  # detector-labelled: generate and label stages
    e = estimate(recipe, 10_000, RATES, gpus=4)
    g = recipe.generator
    generate = 2 * g.steps / RATES.unet_forwards_per_s + 1 / RATES.vae_images_per_s  # guided: two evaluations a step
    assert e.seconds_per_sample["generate"] == pytest.approx(generate)
    assert e.seconds_per_sample["label"] == pytest.approx(1 / RATES.label_images_per_s)
    assert e.gpu_hours["generate"] == pytest.approx(10_000 * generate / 3600)
    assert e.total_gpu_hours == pytest.approx(10_000 * (generate + 1 / RATES.label_images_per_s) / 3600)


def test_doubling_gpus_halves_wall_hours_until_the_pool_is_full():
    recipe = load_recipe("voc-oracle-one", {"pool.max_size": 16})
    two, four = estimate(recipe, 10_000, RATES, gpus=2), estimate(recipe, 10_000, RATES, gpus=4)
    assert four.wall_hours == pytest.approx(two.wall_hours / 2)
    assert four.wall_hours == pytest.approx(four.total_gpu_hours / 4)
    assert four.total_gpu_hours == pytest.approx(two.total_gpu_hours)  # the work is the same
    # One model actor per GPU, at most pool.max_size of them: more GPUs do not help.
    capped = load_recipe("voc-oracle-one", {"pool.max_size": 3})
    many = estimate(capped, 10_000, RATES, gpus=64)
    assert many.wall_hours == pytest.approx(estimate(capped, 10_000, RATES, gpus=3).wall_hours)
    assert any("61 of the 64 GPUs would sit idle" in note for note in many.notes)


def test_steps_guidance_and_resolution_scale_the_generator():
    base = estimate(load_recipe("voc-oracle-one"), 100, RATES, gpus=1).seconds_per_sample["generate"]
    unet = 2 * 50 / RATES.unet_forwards_per_s
    half_steps = load_recipe("voc-oracle-one", {"generator.steps": 25})
    no_guidance = load_recipe("voc-oracle-one", {"generator.guidance_scale": 1.0})
    double_side = load_recipe("voc-oracle-one", {"generator.height": 1024, "generator.width": 1024})
    assert estimate(half_steps, 100, RATES, 1).seconds_per_sample["generate"] == pytest.approx(base - unet / 2)
    assert estimate(no_guidance, 100, RATES, 1).seconds_per_sample["generate"] == pytest.approx(base - unet / 2)
    assert estimate(double_side, 100, RATES, 1).seconds_per_sample["generate"] == pytest.approx(4 * base)


def test_open_vocabulary_labeler_costs_its_flops():
    mask_rcnn = estimate(load_recipe("voc-oracle-one"), 1, DEFAULT_RATES, gpus=1)
    overrides = {"labeler.model": "open_vocabulary", "labeler.weights": "facebook/sam3"}
    open_vocabulary = estimate(load_recipe("voc-oracle-one", overrides), 1, DEFAULT_RATES, gpus=1)
    # the same assumed FLOP/s as Mask R-CNN's 0.33 TFLOP an image (the public figure)
    assert open_vocabulary.seconds_per_sample["label"] == pytest.approx(
        mask_rcnn.seconds_per_sample["label"] * OPEN_VOCABULARY_TFLOP / 0.33)
    assert open_vocabulary.seconds_per_sample["generate"] == mask_rcnn.seconds_per_sample["generate"]
    assert any("costlier route" in note for note in open_vocabulary.notes)
    # its models resize every image to their own input: larger images cost the generator, not it
    large = load_recipe("voc-oracle-one", {**overrides, "generator.height": 1024, "generator.width": 1024})
    assert estimate(large, 1, DEFAULT_RATES, 1).seconds_per_sample["label"] == pytest.approx(
        open_vocabulary.seconds_per_sample["label"])
    # measured rates: bench/gpu.py's, or Mask R-CNN's measured one at the same FLOP/s in files from before it
    assert estimate(load_recipe("voc-oracle-one", overrides), 1, RATES.model_copy(
        update={"open_vocabulary_images_per_s": 4.0}), 1).seconds_per_sample["label"] == pytest.approx(0.25)
    assert RATES.labeler_images_per_s("open_vocabulary") == pytest.approx(
        RATES.label_images_per_s * MASKRCNN_BENCH_TFLOP / OPEN_VOCABULARY_TFLOP)
    assert RATES.labeler_images_per_s("maskrcnn_resnet50_fpn_v2") == RATES.label_images_per_s


def test_a_second_labeler_adds_its_stage():
    checked = load_recipe("voc-synthetic-one", {"agreement.labeler": {"model": "open_vocabulary",
                                                                      "weights": "facebook/sam3"}})
    e = estimate(checked, 10_000, RATES, gpus=8)
    assert list(e.gpu_hours) == ["generate+annotate", "agreement"]
    assert e.seconds_per_sample["agreement"] == pytest.approx(1 / RATES.labeler_images_per_s("open_vocabulary"))
    assert e.total_gpu_hours == pytest.approx(estimate(load_recipe("voc-synthetic-one"), 10_000, RATES, 8)
                                              .total_gpu_hours + 10_000 * e.seconds_per_sample["agreement"] / 3600)


def test_annotator_recipes_have_one_gpu_stage():
    recipe = load_recipe("voc-synthetic-one")
    e = estimate(recipe, 10_000, RATES, gpus=8)
    assert list(e.gpu_hours) == ["generate+annotate"]
    assert e.total_gpu_hours == pytest.approx(10_000 * (100 / 100.0 + 1 / 10.0) / 3600)


@pytest.mark.parametrize("route, evaluations, vae", [("inversion", 2 * 50, 2), ("noised", 1, 1)])
def test_real_images_cost_their_routes_u_net_calls(route, evaluations, vae):
    """Inversion: steps calls up and steps down without guidance, an encode and a decode; noised: one call."""
    recipe = load_recipe("shapes-annotate", {"generator.steps": 50, "generator.height": 512, "generator.width": 512,
                                             "source.route": route})
    e = estimate(recipe, 1000, RATES, gpus=1)
    assert e.seconds_per_sample == {
        "featurize+label": pytest.approx(evaluations / RATES.unet_forwards_per_s + vae / RATES.vae_images_per_s)}


def test_bytes_follow_the_capture_mode():
    oracle = load_recipe("voc-oracle-one")
    latent = load_recipe("voc-oracle-one", {"capture.features": "latent"})
    tensors = load_recipe("voc-oracle-one", {"capture.features": "tensors"})
    both = load_recipe("voc-oracle-one", {"capture.features": "tensors", "capture.unconditional": True})
    assert bytes_per_sample(latent) - bytes_per_sample(oracle) == pytest.approx(LATENT_BYTES_512)
    assert bytes_per_sample(tensors) - bytes_per_sample(oracle) == pytest.approx(FEATURE_BYTES_512)
    assert bytes_per_sample(both) - bytes_per_sample(oracle) == pytest.approx(2 * FEATURE_BYTES_512)
    e = estimate(tensors, 1_000, RATES, gpus=1)
    assert e.bytes_written == pytest.approx(1_000 * bytes_per_sample(tensors))
    flight = in_flight_bytes(tensors)  # only encoded rows leave the model actor
    assert flight["model actor -> write"] == pytest.approx(tensors.generator.batch_size * bytes_per_sample(tensors))
    assert flight["one Parquet part"] == pytest.approx(tensors.writer.rows_per_file * bytes_per_sample(tensors))


def test_price_is_gpu_hours_times_rate():
    e = estimate(load_recipe("voc-oracle-one"), 5_000, RATES, gpus=2, usd_per_gpu_hour=1.5)
    assert e.usd == pytest.approx(1.5 * e.total_gpu_hours)


def test_default_rates_reproduce_the_public_a100_figure():
    # spec section 11: about 1.3 images/s at 50 guided DDIM steps on an A100
    seconds = estimate(load_recipe("voc-oracle-one"), 1, DEFAULT_RATES, gpus=1).seconds_per_sample["generate"]
    assert 1 / seconds == pytest.approx(1.3)


def test_rates_files(tmp_path):
    bench_output = tmp_path / "gpu.json"  # the layout bench/gpu.py --out writes
    bench_output.write_text(json.dumps({"device": "x", "rates": RATES.model_dump(), "measurements": []}))
    loaded = load_rates(str(bench_output))
    assert loaded.model_dump(exclude={"measured"}) == RATES.model_dump(exclude={"measured"})
    assert loaded.measured == ("unet_forwards_per_s", "vae_images_per_s", "label_images_per_s")
    assert loaded.origin("unet_forwards_per_s") == "measured"
    assert loaded.origin("open_vocabulary_images_per_s") == "Mask R-CNN's rate at its FLOP, measured"
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"unet_forwards_per_s": 1, "vae_images_per_s": 2, "label_images_per_s": 3}))
    assert load_rates(str(bare)).vae_images_per_s == 2


def test_a_stage_the_rates_file_lacks_takes_the_public_anchor_at_its_size(tmp_path):
    """A sweep that measured the generator at 256 px: the labeler is the anchor's, 4x as fast at a quarter
    of the pixels, and the estimate says which rate is which."""
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"rates": {"source": "bench/gpu.py on H200", "image_size": 256,
                                             "unet_forwards_per_s": 400.0, "vae_images_per_s": 90.0}}))
    rates = load_rates(str(partial))
    assert rates.label_images_per_s == pytest.approx(4 * DEFAULT_RATES.label_images_per_s)
    assert rates.origin("unet_forwards_per_s") == "measured" and rates.origin("label_images_per_s") == "public anchor"
    recipe = load_recipe("voc-oracle-one")
    text = format_estimate(estimate(recipe, 100, rates, gpus=1), recipe)
    assert "U-Net 400/s (measured)" in text and "VAE 90/s (measured)" in text and "(public anchor)" in text
    assert "(measured)" not in format_estimate(estimate(recipe, 100, DEFAULT_RATES, gpus=1), recipe)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"unet_forwards_per_s": -1, "vae_images_per_s": 2, "label_images_per_s": 3}))
    for path, words in ((bad, "unet_forwards_per_s"), (tmp_path / "missing.json", "cannot read")):
        with pytest.raises(ConfigError, match=words) as info:
            load_rates(str(path))
        assert "\n" not in str(info.value)


def test_estimate_job_prints_and_starts_nothing(tmp_path):
    """The real job, VOC 10k and COCO 110k: exits 0 without Ray, models or writes; COCO/VOC = plan sizes."""
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"rates": RATES.model_dump()}))
    out = tmp_path / "never-written"
    script = f"""
import ray
from jobs import build_dataset
for recipe in ("voc-synthetic-one", "coco-synthetic-one"):
    rc = build_dataset.main(["--recipe", recipe, "--estimate", "--gpus", "8", "--rates", {str(rates)!r},
                             "--out", {str(out)!r}, "--usd-per-gpu-hour", "2"])
    assert rc == 0, rc
assert not ray.is_initialized()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    voc, coco = result.stdout.split("Estimate for ")[1:]
    assert "10,000 samples" in voc and "118,500 samples" in coco
    hours = [float(block.split("total")[1].split("GPU-hours")[0]) for block in (voc, coco)]
    assert hours[1] / hours[0] == pytest.approx(118_500 / 10_000, rel=0.01)
    assert f"{10_000 * 1.1 / 3600:.2f} GPU-hours" in voc  # 50 guided steps at 100/s + a 10/s decode


def test_estimate_bad_input_is_one_line(tmp_path, capsys):
    from jobs import build_dataset

    for argv, words in ((["--estimate", "--gpus", "0"], "--gpus"),
                        (["--estimate", "--rates", str(tmp_path / "nope.json")], "cannot read rates"),
                        (["--estimate", "--generator.steps", "0"], "steps")):
        assert build_dataset.main(argv + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert not (tmp_path / "out").exists()
