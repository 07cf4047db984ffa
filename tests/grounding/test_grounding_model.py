import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from factory.diffusion.features import FeatureCapture, feature_channels
from factory.diffusion.pipelines import sdxl_unet
from grounding.config import (
    REAL_SD15_CHANNELS,
    REAL_SDXL_CHANNELS,
    GroundingModelConfig,
    ModelSection,
    grounding_model_config,
)
from grounding.losses import grounding_loss, presence_loss
from grounding.model import GroundingModule


def _inputs(cfg: GroundingModelConfig, batch: int, slots: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = {r: torch.randn(batch, c, r, r, generator=g) for r, c in cfg.feature_channels.items()}
    embeddings = torch.randn(batch, slots, cfg.text_dim, generator=g)
    return features, embeddings


def _module(cfg: GroundingModelConfig, train: bool = False) -> GroundingModule:
    torch.manual_seed(0)
    return GroundingModule(cfg).train(train)


def test_config_defaults_and_checks():
    cfg = GroundingModelConfig.real()
    assert cfg.fuse_resolution == 64  # the largest feature resolution, as in the reference code
    assert sum(cfg.reduce_channels.values()) == cfg.fused_dim == 240
    assert GroundingModelConfig.real(fuse_resolution=512).fuse_resolution == 512
    with pytest.raises(ValidationError, match="reduce_channels"):
        GroundingModelConfig.tiny(reduce_channels={16: 8})
    with pytest.raises(ValidationError, match="below the largest"):
        GroundingModelConfig.tiny(fuse_resolution=16)
    with pytest.raises(ValidationError, match="extra"):
        GroundingModelConfig.tiny(unknown=1)


def test_tiny_forward_shape():
    cfg = GroundingModelConfig.tiny()
    features, embeddings = _inputs(cfg, batch=2, slots=3)
    class_mask = torch.tensor([[True, True, False], [True, False, False]])
    logits = _module(cfg)(features, embeddings, class_mask)
    assert logits.shape == (2, 3, 32, 32) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_fuse_resolution_above_features():
    cfg = GroundingModelConfig.tiny(fuse_resolution=64, mask_resolution=128)
    features, embeddings = _inputs(cfg, batch=1, slots=1)
    module = _module(cfg)
    assert module.encode_visual(features).shape == (1, 16, 64, 64)
    assert module(features, embeddings, torch.ones(1, 1, dtype=torch.bool)).shape == (1, 1, 128, 128)


def test_real_config_forward_shape():
    cfg = GroundingModelConfig.real(mask_resolution=64)
    assert cfg.feature_channels == REAL_SD15_CHANNELS
    features, embeddings = _inputs(cfg, batch=1, slots=2)
    with torch.no_grad():
        logits = _module(cfg)(features, embeddings, torch.tensor([[True, False]]))
    assert logits.shape == (1, 2, 64, 64)
    assert torch.isfinite(logits).all()


def test_sdxl_preset_reads_sdxls_capture():
    """The preset's channels are what the capture takes from SDXL's U-Net at 1024 px (its config on the
    meta device: shapes, no weights), and the module fuses them to 1024-pixel masks (meta as well)."""
    cfg = GroundingModelConfig.sdxl()
    with torch.device("meta"):
        unet, module = sdxl_unet(), GroundingModule(cfg)
        latent, text = torch.empty(1, 4, 128, 128), torch.empty(1, 77, cfg.text_dim)
        added = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)}
        embeddings, class_mask = torch.empty(1, 2, cfg.text_dim), torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad(), FeatureCapture(unet, call=0, batch=1) as capture:  # a timestep the capture can read
        unet(latent, 10, encoder_hidden_states=text, added_cond_kwargs=added)
    assert feature_channels(capture.features) == cfg.feature_channels == REAL_SDXL_CHANNELS
    assert sum(cfg.reduce_channels.values()) == cfg.fused_dim == 240 and cfg.fuse_resolution == 128
    assert module(capture.features, embeddings, class_mask).shape == (1, 2, 1024, 1024)
    # Training sizes it from its data: an SDXL set's features and text width, the preset's other sizes.
    trained = grounding_model_config(ModelSection(preset="sdxl", presence="none"), REAL_SDXL_CHANNELS, 2048, 1024)
    assert trained == cfg
    with pytest.raises(ValueError, match=r"preset real fuses 4 feature resolutions, the dataset has \[32, 64, 128\]"):
        grounding_model_config(ModelSection(preset="real"), REAL_SDXL_CHANNELS, 2048, 1024)


def test_padded_slots_do_not_change_real_slots():
    cfg = GroundingModelConfig.tiny()
    module = _module(cfg)
    features, embeddings = _inputs(cfg, batch=2, slots=3)
    class_mask = torch.tensor([[True, True, False], [True, False, False]])
    logits = module(features, embeddings, class_mask)

    garbage = embeddings.clone()
    garbage[~class_mask] = 100 * torch.randn(int((~class_mask).sum()), cfg.text_dim)
    assert torch.allclose(module(features, garbage, class_mask)[class_mask], logits[class_mask], atol=1e-5)

    # Without any padding: sample 0 keeps its two classes, sample 1 its one.
    first = {r: f[:1] for r, f in features.items()}
    second = {r: f[1:] for r, f in features.items()}
    unpadded_0 = module(first, embeddings[:1, :2], torch.ones(1, 2, dtype=torch.bool))
    unpadded_1 = module(second, embeddings[1:, :1], torch.ones(1, 1, dtype=torch.bool))
    assert torch.allclose(unpadded_0, logits[:1, :2], atol=1e-5)
    assert torch.allclose(unpadded_1, logits[1:, :1], atol=1e-5)

    assert not module.predict(features, embeddings, class_mask)[~class_mask].any()


def test_sample_without_real_slots_stays_finite():
    cfg = GroundingModelConfig.tiny()
    features, embeddings = _inputs(cfg, batch=2, slots=2)
    logits = _module(cfg)(features, embeddings, torch.tensor([[True, False], [False, False]]))
    assert torch.isfinite(logits).all()


def test_slot_order_does_not_matter():
    cfg = GroundingModelConfig.tiny()
    module = _module(cfg)
    features, embeddings = _inputs(cfg, batch=1, slots=3)
    class_mask = torch.tensor([[True, True, False]])
    order = torch.tensor([2, 0, 1])
    logits = module(features, embeddings, class_mask)
    permuted = module(features, embeddings[:, order], class_mask[:, order])
    assert torch.allclose(permuted, logits[:, order], atol=1e-5)


def test_batch_equals_one_by_one_in_eval_mode():
    cfg = GroundingModelConfig.tiny()
    module = _module(cfg)
    features, embeddings = _inputs(cfg, batch=3, slots=2)
    class_mask = torch.tensor([[True, True], [True, False], [True, True]])
    batched = module(features, embeddings, class_mask)
    for i in range(3):
        single = module({r: f[i:i + 1] for r, f in features.items()}, embeddings[i:i + 1], class_mask[i:i + 1])
        assert torch.allclose(single, batched[i:i + 1], atol=1e-5)


def test_gradients_reach_every_parameter():
    cfg = GroundingModelConfig.tiny(decoder_layers=2)
    module = _module(cfg, train=True)
    features, embeddings = _inputs(cfg, batch=2, slots=2)
    class_mask = torch.ones(2, 2, dtype=torch.bool)
    targets = (torch.rand(2, 2, 32, 32) > 0.5).float()
    grounding_loss(module(features, embeddings, class_mask), targets, class_mask, "bce+logcosh_dice").backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# A synthetic grounding task: each class has a random text embedding and a random
# channel signature; features carry a class's signature inside its object's
# rectangle, plus noise. Samples have one or two classes in two slots.
def _task_batch(cfg: GroundingModelConfig, n: int, g: torch.Generator, classes: int = 4):
    task = torch.Generator().manual_seed(123)  # the same classes for every batch
    class_embeddings = torch.randn(classes, cfg.text_dim, generator=task)
    signatures = {r: torch.randn(classes, c, generator=task) for r, c in cfg.feature_channels.items()}

    size = cfg.mask_resolution
    chosen = torch.rand(n, classes, generator=g).argsort(dim=1)[:, :2]
    class_mask = torch.stack([torch.ones(n, dtype=torch.bool), torch.rand(n, generator=g) < 0.5], dim=1)
    corner = torch.randint(0, size - 12, (n, 2, 2), generator=g)
    side = torch.randint(6, 13, (n, 2, 2), generator=g)
    axis = torch.arange(size)
    inside = (axis >= corner[..., None]) & (axis < (corner + side)[..., None])  # (n, 2, y|x, size)
    masks = (inside[:, :, 0, :, None] & inside[:, :, 1, None, :] & class_mask[:, :, None, None]).float()

    features = {}
    for r, signature in signatures.items():
        region = F.adaptive_avg_pool2d(masks, r)
        noise = 0.5 * torch.randn(n, signature.shape[1], r, r, generator=g)
        features[r] = torch.einsum("bohw,boc->bchw", region, signature[chosen]) + noise
    return features, class_embeddings[chosen], class_mask, masks


@pytest.fixture
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy machine the
    # thread hand-offs make each step tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learns_synthetic_task(one_thread):
    cfg = GroundingModelConfig.tiny()
    module = _module(cfg, train=True)
    # A higher learning rate than the paper's 1e-4 keeps this test short.
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        features, embeddings, class_mask, masks = _task_batch(cfg, 8, g)
        loss = grounding_loss(module(features, embeddings, class_mask), masks, class_mask, "bce+logcosh_dice")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    module.eval()
    features, embeddings, class_mask, masks = _task_batch(cfg, 64, torch.Generator().manual_seed(2))
    predicted = module.predict(features, embeddings, class_mask)
    truth = masks.bool()
    intersection = (predicted & truth).flatten(2).sum(-1)[class_mask]
    union = (predicted | truth).flatten(2).sum(-1)[class_mask]
    assert (intersection / union).mean() > 0.8


def test_the_presence_loss_does_not_move_the_masks():
    """The region head reads the masks' probabilities detached: presence trains the decoder and the
    visual encoder it shares, never the mask embeddings' own head."""
    cfg = GroundingModelConfig.tiny(presence="region")
    module = _module(cfg, train=True)
    features, embeddings = _inputs(cfg, batch=2, slots=2)
    class_mask = torch.ones(2, 2, dtype=torch.bool)
    _, presence = module(features, embeddings, class_mask, with_presence=True)
    presence_loss(presence, torch.tensor([[True, False], [False, True]]), class_mask).backward()
    assert all(p.grad is None for p in module.mask_mlp.parameters())
    for head in (module.presence_mlp, module.region_proj, module.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("head", ["query", "region", "match"])
def test_learns_presence_on_synthetic_task(one_thread, head):
    """Both slots are named, the second object is drawn in half the samples: the head learns which
    named classes are there, and predict gives an absent one no mask."""
    cfg = GroundingModelConfig.tiny(presence=head)
    module = _module(cfg, train=True)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        features, embeddings, present, masks = _task_batch(cfg, 8, g)
        named = torch.ones_like(present)
        logits, presence = module(features, embeddings, named, with_presence=True)
        loss = grounding_loss(logits, masks, present, "bce+logcosh_dice") + presence_loss(presence, present, named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    module.eval()
    features, embeddings, present, masks = _task_batch(cfg, 64, torch.Generator().manual_seed(2))
    named = torch.ones_like(present)
    with torch.no_grad():
        _, presence = module(features, embeddings, named, with_presence=True)
    assert ((presence > 0) == present).float().mean() > 0.9
    predicted = module.predict(features, embeddings, named)
    assert not predicted[~present].any()  # an absent class judged absent gets no pixels
