"""bench/oracle_offset.py: the factory's pasting puts the oracle's masks on the drawn objects; torchvision's
truncated boxes put them half a pixel up and left."""

from bench.oracle_offset import main, measure


def test_exact_boxes_remove_the_half_pixel_offset():
    exact, truncated = measure(32).values()
    assert all(abs(d) <= 0.1 for d in exact.offset) and all(d < -0.3 for d in truncated.offset)
    assert exact.mean_iou > truncated.mean_iou


def test_it_prints_a_row_per_way_of_pasting(capsys):
    assert main(["--images", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].startswith("exact boxes") and lines[2].startswith("torchvision's paste")
