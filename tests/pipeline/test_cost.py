"""The cost model: every figure follows from the recipe, its generator's counted FLOPs, the plan size, the rates
and the GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory.core.options import ConfigError
from factory.diffusion.families import FAMILIES
from factory.pipeline import cost
from factory.pipeline.cost import (
    COUNTED,
    DEFAULT_RATES,
    FEATURE_BYTES_512,
    FLUX_DEV,
    LATENT_BYTES_512,
    MASKRCNN_BENCH_TFLOP,
    REFERENCE,
    SD15,
    SD35_LARGE,
    SDXL_BASE,
    Rates,
    bytes_per_sample,
    counted_generator,
    estimate,
    format_estimate,
    in_flight_bytes,
    load_rates,
    tflops,
)
from factory.pipeline.labelers.open_vocabulary import OPEN_VOCABULARY_TFLOP
from factory.pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RATES = Rates(source="test", image_size=512, unet_forwards_per_s=100.0, vae_images_per_s=10.0, label_images_per_s=40.0)
NEW_RECIPES = ("sdxl-oracle", "sd35-open-vocabulary", "flux-open-vocabulary")


def prompt_seconds(rates: Rates = RATES) -> float:
    """SD 1.5's text encoder on one prompt, at the FLOP/s of SD 1.5's U-Net rate."""
    return SD15.text / tflops(rates)[0]


def generate_seconds(recipe, rates: Rates = RATES) -> float:
    """A recipe's generator from the formula: its counted passes at the FLOP/s SD 1.5's rates imply."""
    g, counted = recipe.generator, counted_generator(recipe.generator.model)[0]
    denoiser, vae = tflops(rates)
    passes = 1 if not counted.family.guided_pairs or g.guidance_scale <= 1 else 2
    return (g.steps * passes * counted.denoiser.at(g.height, g.width) + passes * counted.text) / denoiser \
        + counted.vae.at(g.height, g.width) / vae


def test_gpu_hours_are_samples_over_rates():
    recipe = load_recipe("voc-oracle-one")  # detector-labelled: generate and label stages
    e = estimate(recipe, 10_000, RATES, gpus=4)
    g = recipe.generator
    # SD 1.5 at the rates' own size: two evaluations a guided step, a decode, the prompt and the empty one encoded
    generate = 2 * g.steps / RATES.unet_forwards_per_s + 1 / RATES.vae_images_per_s + 2 * prompt_seconds()
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
    assert estimate(no_guidance, 100, RATES, 1).seconds_per_sample["generate"] == pytest.approx(
        base - unet / 2 - prompt_seconds())  # no empty prompt either
    # Four times the pixels: the counted FLOPs at 1024, more than 4x (self-attention grows with their square).
    larger = estimate(double_side, 100, RATES, 1).seconds_per_sample["generate"]
    assert larger == pytest.approx(generate_seconds(double_side))
    assert larger == pytest.approx(unet * SD15.denoiser.at(1024, 1024) / SD15.denoiser.at(512, 512)
                                   + SD15.vae.at(1024, 1024) / SD15.vae.at(512, 512) / RATES.vae_images_per_s
                                   + 2 * prompt_seconds())
    assert larger > 4 * base


def test_counted_flops_grow_faster_than_pixels():
    """A pass's TFLOP is a function of the pixel count, more than linear in it (self-attention); SD 1.5's U-Net
    evaluation is bench/gpu.py's count (docs/performance.md, GPU stages)."""
    for counted in COUNTED:
        side = counted.family.size
        assert counted.denoiser.at(side // 2, side * 2) == pytest.approx(counted.denoiser.at(side, side))
        assert counted.denoiser.at(2 * side, 2 * side) > 4 * counted.denoiser.at(side, side)
    assert SD15.denoiser.at(512, 512) == pytest.approx(0.803, abs=5e-4)


def test_each_family_costs_its_counted_flops():
    """At the same FLOP/s, generators cost their counted TFLOP per image: SDXL at 1024 more than SD 1.5 at 512,
    FLUX.1 one evaluation per step whatever its guidance, SD 3.5 a guided pair."""
    sd15, sdxl = load_recipe("voc-oracle-one"), load_recipe("sdxl-oracle")
    seconds = {name: estimate(recipe, 1, DEFAULT_RATES, gpus=1).seconds_per_sample["generate"]
               for name, recipe in (("sd15", sd15), ("sdxl", sdxl))}
    tflop = {name: counted.tflop_per_image(r.generator.steps, r.generator.guidance_scale, r.generator.height,
                                           r.generator.width)
             for name, counted, r in (("sd15", SD15, sd15), ("sdxl", SDXL_BASE, sdxl))}
    assert seconds["sdxl"] / seconds["sd15"] == pytest.approx(tflop["sdxl"] / tflop["sd15"])
    assert seconds["sdxl"] > seconds["sd15"] and seconds["sd15"] == pytest.approx(1 / 1.3)
    for name in NEW_RECIPES:
        recipe = load_recipe(name)
        assert estimate(recipe, 1, RATES, 1).seconds_per_sample["generate"] == pytest.approx(generate_seconds(recipe))

    flux = load_recipe("flux-open-vocabulary")
    g, (denoiser, vae) = flux.generator, tflops(RATES)
    one_pass = ((g.steps * FLUX_DEV.denoiser.at(1024, 1024) + FLUX_DEV.text) / denoiser
                + FLUX_DEV.vae.at(1024, 1024) / vae)
    for guidance in (1.0, 3.5, 7.0):  # distilled guidance: an input of one pass, never a pair
        guided = load_recipe("flux-open-vocabulary", {"generator.guidance_scale": guidance})
        assert estimate(guided, 1, RATES, 1).seconds_per_sample["generate"] == pytest.approx(one_pass)
    sd35 = load_recipe("sd35-open-vocabulary")
    unguided = load_recipe("sd35-open-vocabulary", {"generator.guidance_scale": 1.0})
    pair = estimate(sd35, 1, RATES, 1).seconds_per_sample["generate"]
    single = estimate(unguided, 1, RATES, 1).seconds_per_sample["generate"]
    assert pair - single == pytest.approx((sd35.generator.steps * SD35_LARGE.denoiser.at(1024, 1024)
                                           + SD35_LARGE.text) / denoiser)


def test_the_new_recipes_name_counted_models_read_without_a_download(monkeypatch):
    def no_reading(model):
        raise AssertionError(f"read {model}")
    monkeypatch.setattr(cost, "read_generator", no_reading)
    assert [counted_generator(load_recipe(name).generator.model) for name in NEW_RECIPES] == [
        (SDXL_BASE, None), (SD35_LARGE, None), (FLUX_DEV, None)]


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda family: family.key)
def test_another_generator_is_timed_as_its_familys_counted_model(tmp_path, family):
    """A saved pipeline that is no counted model by its id: its family from its model_index.json, a note."""
    from factory.diffusion.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / family.key, family)
    recipe = load_recipe("voc-oracle-one", {"generator.model": folder, "generator.height": 1024,
                                            "generator.width": 1024})
    assert counted_generator(folder)[0] is REFERENCE[family]
    e = estimate(recipe, 1, RATES, gpus=1)
    assert e.generator is REFERENCE[family]
    assert e.seconds_per_sample["generate"] == pytest.approx(generate_seconds(recipe))
    assert any(f"generator {folder} is timed as {REFERENCE[family].name}" in note for note in e.notes)
    assert f"generator {family.title} ({folder})" in format_estimate(e, recipe)


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
    assert e.total_gpu_hours == pytest.approx(10_000 * (100 / 100.0 + 1 / 10.0 + 2 * prompt_seconds()) / 3600)


@pytest.mark.parametrize("route, evaluations, vae", [("inversion", 2 * 50, 2), ("noised", 1, 1)])
def test_real_images_cost_their_routes_u_net_calls(route, evaluations, vae):
    """Inversion: steps calls up and steps down without guidance, an encode and a decode; noised: one call."""
    recipe = load_recipe("shapes-annotate", {"generator.steps": 50, "generator.height": 512, "generator.width": 512,
                                             "source.route": route})
    e = estimate(recipe, 1000, RATES, gpus=1)
    assert e.seconds_per_sample == {"featurize+label": pytest.approx(
        evaluations / RATES.unet_forwards_per_s + vae / RATES.vae_images_per_s + prompt_seconds())}


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
    assert "timing    measured: the rates file's SD 1.5 rates" in text
    anchored = format_estimate(estimate(recipe, 100, DEFAULT_RATES, gpus=1), recipe)
    assert "(measured)" not in anchored
    assert "SD 1.5's counted FLOPs at the public A100 anchor's" in anchored and "(not measured)" in anchored
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"unet_forwards_per_s": -1, "vae_images_per_s": 2, "label_images_per_s": 3}))
    for path, words in ((bad, "unet_forwards_per_s"), (tmp_path / "missing.json", "cannot read")):
        with pytest.raises(ConfigError, match=words) as info:
            load_rates(str(path))
        assert "\n" not in str(info.value)


def test_a_rates_file_measured_on_sd15_times_other_families_by_their_flop_ratio(tmp_path):
    """bench/gpu.py measures SD 1.5: a FLUX.1 evaluation takes its counted TFLOP over the FLOP/s that implies."""
    measured = tmp_path / "gpu.json"
    measured.write_text(json.dumps({"rates": {**RATES.model_dump(), "image_size": 256}}))
    rates = load_rates(str(measured))
    assert tflops(rates)[0] == pytest.approx(100.0 * SD15.denoiser.at(256, 256))
    flux = load_recipe("flux-open-vocabulary")
    e = estimate(flux, 100, rates, gpus=1)
    ratio = FLUX_DEV.denoiser.at(1024, 1024) / SD15.denoiser.at(256, 256)
    evaluation = 1 / (RATES.unet_forwards_per_s / ratio)  # the measured rate scaled by the FLOP ratio
    decode = FLUX_DEV.vae.at(1024, 1024) / SD15.vae.at(256, 256) / RATES.vae_images_per_s
    assert e.seconds_per_sample["generate"] == pytest.approx(
        flux.generator.steps * evaluation + decode + FLUX_DEV.text / tflops(rates)[0])
    assert any(f"measured SD 1.5's U-Net: FLUX.1-dev's transformer evaluation at 1024x1024 counts {ratio:.3g}x" in note
               for note in e.notes)
    text = format_estimate(e, flux)
    assert "generator FLUX.1 (black-forest-labs/FLUX.1-dev)" in text
    assert "FLUX.1-dev's counted FLOPs at the FLOP/s measured on SD 1.5" in text
    sd15 = estimate(load_recipe("voc-oracle-one"), 100, rates, gpus=1)
    assert not any("measured SD 1.5's U-Net" in note for note in sd15.notes)


def test_default_rates_time_every_family_at_the_anchors_flops():
    for name in NEW_RECIPES:
        recipe = load_recipe(name)
        text = format_estimate(estimate(recipe, 10, DEFAULT_RATES, gpus=1), recipe)
        family = counted_generator(recipe.generator.model)[0].family
        assert f"generator {family.title} ({recipe.generator.model})" in text
        assert "counted FLOPs at the public A100 anchor's" in text and "(not measured)" in text


def test_estimate_job_prints_and_starts_nothing(tmp_path):
    """The real job, VOC 10k and COCO 110k: exits 0 without Ray, models or writes; COCO/VOC = plan sizes."""
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"rates": RATES.model_dump()}))
    out = tmp_path / "never-written"
    script = f"""
import ray
from jobs import build_dataset
for recipe in ("voc-synthetic-one", "coco-synthetic-one", *{NEW_RECIPES!r}):
    rc = build_dataset.main(["--recipe", recipe, "--estimate", "--gpus", "8", "--rates", {str(rates)!r},
                             "--out", {str(out)!r}, "--usd-per-gpu-hour", "2"])
    assert rc == 0, rc
assert not ray.is_initialized()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    voc, coco, *new = result.stdout.split("Estimate for ")[1:]
    assert "10,000 samples" in voc and "118,500 samples" in coco
    hours = [float(block.split("total")[1].split("GPU-hours")[0]) for block in (voc, coco)]
    assert hours[1] / hours[0] == pytest.approx(118_500 / 10_000, rel=0.01)
    assert f"{10_000 * (1.1 + 2 * prompt_seconds()) / 3600:.2f} GPU-hours" in voc  # 50 guided steps at 100/s + a decode
    for name, block in zip(NEW_RECIPES, new, strict=True):  # the job prints what the cost model computes
        recipe = load_recipe(name)
        samples = int(block.split(" samples")[0].split(": ")[1].replace(",", ""))
        e = estimate(recipe, samples, RATES, gpus=8, usd_per_gpu_hour=2)
        assert block.startswith(name) and f"total     {e.total_gpu_hours:.2f} GPU-hours" in block


def test_estimate_bad_input_is_one_line(tmp_path, capsys):
    from jobs import build_dataset

    for argv, words in ((["--estimate", "--gpus", "0"], "--gpus"),
                        (["--estimate", "--rates", str(tmp_path / "nope.json")], "cannot read rates"),
                        (["--estimate", "--generator.steps", "0"], "steps"),
                        (["--estimate", "--generator.model", str(tmp_path / "no-generator")], "model not found")):
        assert build_dataset.main(argv + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert not (tmp_path / "out").exists()
