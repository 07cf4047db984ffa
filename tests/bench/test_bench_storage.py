"""bench/storage.py smoke test: the tiny U-Net at 64x64 through the factory's own writer."""

from __future__ import annotations

import json

from bench import storage


def test_every_product_is_measured_and_smaller_than_fp32_pickles(tmp_path):
    out = tmp_path / "storage.json"
    result = storage.main(["--tiny", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    products = result["products"]
    assert set(products) == {"oracle set", "triplet set, tensors", "triplet set, latent", "synthetic seg set"}
    for row in products.values():
        assert 0 < row["ours_bytes"] < row["reference_fp32_pickle_bytes"]
    # Captured features: fp16 values, zstd-compressed, in the tensors row and not in the others.
    size = result["image_size"]
    values = sum(channels * int(r) ** 2 for r, channels in result["feature_channels"].items())
    features = products["triplet set, tensors"]["ours_bytes"] - products["oracle set"]["ours_bytes"]
    assert 0.5 * 2 * values < features < 1.05 * 2 * values
    latent = products["triplet set, latent"]["ours_bytes"] - products["oracle set"]["ours_bytes"]
    assert 0 < latent < 1.05 * 2 * result["latent_values"]
    # The reference pickled fp32 image, label, masks and both guidance branches.
    assert products["triplet set, tensors"]["reference_fp32_pickle_bytes"] > 2 * 4 * values + 3 * 4 * size ** 2
