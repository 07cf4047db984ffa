"""bench/schedule.py: the mixture labelled by the shipped module, its images labelled again by the oracle,
the oracle reference trained per seed as the mission trains it, and the curve published with its picture."""

from __future__ import annotations

import bench.schedule as bench
from segmenter.evaluate import BACKGROUND_KEYS


def test_the_curve_of_each_seed_is_reported_and_published(monkeypatch, tmp_path):
    builds, trained = {}, []

    def build(recipe, out, scale, overrides):
        builds[recipe] = (out, scale, overrides)
        return {"written": 9, "planned": 10, "given_up": 1}

    def train(work, name, iterations, seed):
        trained.append((name, iterations, seed))
        return str(work / "segmenters" / name.lower() / f"seed-{seed}" / "last")

    def curve(work, name, seed, last, final):
        return [{"iteration": 5 * k, "harmonic": 40.0 + k + seed / 5} for k in range(1, 9)]

    final = {key: {"seen": 1.0, "unseen": 1.0, "harmonic": 1.0} for key in BACKGROUND_KEYS.values()}
    for name, fake in {"build": build, "train_segmenter": train, "training_curve": curve,
                       "protocol_ii": lambda *args: final, "write_benchmark": lambda *args, **kwargs: None}.items():
        monkeypatch.setattr(bench, name, fake)
    monkeypatch.setattr(bench, "init_ray", lambda **kwargs: None)
    page = tmp_path / "docs" / "schedule.md"
    assert bench.main(["--work", str(tmp_path / "w"), "--iterations", "40", "--seeds", "2", "--publish", str(page)]) == 0

    mixture, oracle = builds["shapes-synthetic-mixture"], builds["shapes-oracle"]
    assert mixture[1] == oracle[1] == 1.0 and mixture[2] == {"annotator.checkpoint": "models/shapes-grounding"}
    assert oracle[2] == {"follow": str(mixture[0])}  # the same images, the oracle's labels
    assert trained == [("Oracle", 40, 0), ("Oracle", 40, 1)]
    text = page.read_text()
    assert "| 40 | 48.1 ± 0.1 |" in text and "moved 2.0 points (criterion: < 1): not plateaued" in text
    assert "![The oracle reference's training curve](images/oracle-curve.png)" in text
    assert (page.parent / "images" / "oracle-curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "oracle 9/10" in (tmp_path / "w" / "report.md").read_text()
