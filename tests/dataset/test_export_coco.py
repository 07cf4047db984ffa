import cv2
import numpy as np

from factory.dataset.export_coco import connected_components


def test_connected_components_match_opencv():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((40, 50)) < rng.uniform(0.2, 0.6)
        labels, count = connected_components(mask)
        expected_count, expected = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        assert count == expected_count - 1
        assert ((labels > 0) == mask).all()
        # the same partition: each of our regions is one OpenCV region and vice versa
        pairs = set(zip(labels[mask].tolist(), expected[mask].tolist()))
        assert len(pairs) == count
    assert connected_components(np.eye(4, dtype=bool))[1] == 1  # diagonal neighbours touch
    assert connected_components(np.zeros((3, 3), bool))[1] == 0
