import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from factory.detection.paste import paste_masks


def test_masks_are_pasted_as_torchvision_pastes_them_at_the_exact_box():
    masks = torch.rand(2, 1, 28, 28)
    # Padded by a cell (28 -> 30 cells), these boxes span whole pixels, where torchvision's paste is exact.
    whole = torch.tensor([[1.0, 1.0, 29.0, 29.0], [15.0, 29.0, 43.0, 57.0]])
    assert torch.allclose(paste_masks(masks, whole, (64, 64)), paste_masks_in_image(masks, whole, (64, 64)), atol=1e-5)
    # A box half a pixel right and down moves its mask as far (torchvision's paste truncates the box: none).
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for shift in (0.25, 0.5, 0.75):
        pasted = paste_masks(masks[:1], whole[:1] + shift, (64, 64))[0, 0]
        centroid = torch.stack([(pasted * ys).sum(), (pasted * xs).sum()]) / pasted.sum()
        still = paste_masks(masks[:1], whole[:1], (64, 64))[0, 0]
        assert torch.allclose(centroid - torch.stack([(still * ys).sum(), (still * xs).sum()]) / still.sum(),
                              torch.tensor([shift, shift]), atol=0.02)
