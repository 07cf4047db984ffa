"""Segmenter model: tiny forward/loss/backward, semantic inference, targets, ignored pixels,
frozen batch norm, backbone weights, the text head and names added at test time, checkpoints
(local and S3), and the real R101 size."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import safetensors.torch
import torch
from torchvision.models.resnet import Bottleneck, ResNet
from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

from factory.core.checkpoints import CheckpointError, load_optimizer_state
from factory.core.vocab import VOC
from segmenter.checkpoint import load_segmenter_checkpoint, save_segmenter_checkpoint
from segmenter.config import SegmenterModelConfig
from segmenter.model import IGNORED_LOGIT, Segmenter, batch_targets, load_backbone_weights, semantic_targets
from segmenter.text import TEMPLATE, encode_class_names

K = 20  # VOC classes; labels 0..20


def _tiny(seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(SegmenterModelConfig.tiny(K + 1))


def _labels() -> torch.Tensor:
    labels = torch.zeros(2, 32, 32, dtype=torch.uint8)
    labels[0, :16] = 3
    labels[1, 20:] = 7
    labels[1, :, :8] = 255
    return labels


def test_tiny_forward_loss_backward():
    model = _tiny().train()
    masks, classes = batch_targets(_labels(), K + 1)
    outputs = model(torch.randn(2, 3, 32, 32), masks, classes)
    assert outputs.class_queries_logits.shape == (2, 8, K + 2)  # + "no object"
    assert outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model(torch.randn(2, 3, 32, 32)).loss is None  # no targets, no loss
    ignored = batch_targets(torch.full((2, 32, 32), 255, dtype=torch.uint8), K + 1)  # nothing to match
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32), *ignored).loss)


def test_a_fresh_models_queries_differ():
    # With transformers' own query init (std 0.02) the queries' outputs differ by 8e-5 of their
    # spread: from scratch they stayed alike and training never predicted a class.
    model = _tiny().eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 64))
    for logits in (outputs.class_queries_logits, outputs.masks_queries_logits):
        assert logits.std(dim=1).mean() > 1e-3 * logits.std()


def test_world_preset_halves_every_stride_and_keeps_it_in_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = Segmenter(SegmenterModelConfig.world(K + 1)).eval()
    with torch.no_grad():
        outputs = model.maskformer(pixel_values=torch.randn(2, 3, 64, 64), output_hidden_states=True)
    assert [tuple(f.shape[-2:]) for f in outputs.encoder_hidden_states] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert outputs.class_queries_logits.shape == (2, 24, K + 2)
    assert outputs.masks_queries_logits.shape[-2:] == (32, 32)  # tiny's: 16 x 16
    save_segmenter_checkpoint(str(tmp_path / "w"), model, None, METADATA)
    loaded = load_segmenter_checkpoint(str(tmp_path / "w"))[0].eval()
    assert not loaded.config.stem_pool
    with torch.no_grad():
        again = loaded(torch.randn(2, 3, 64, 64)).masks_queries_logits
    assert again.shape == outputs.masks_queries_logits.shape


def test_semantic_logits_shape_and_labels():
    model = _tiny().eval()
    with torch.no_grad():
        scores = model.semantic_logits(torch.randn(2, 3, 48, 40))
    assert scores.shape == (2, K + 1, 48, 40) and (scores >= 0).all()
    predicted = scores.argmax(1)
    assert 0 <= int(predicted.min()) and int(predicted.max()) <= K


def test_targets_from_label_map_exclude_ignore():
    label = torch.tensor([[0, 0, 3], [255, 3, 7]], dtype=torch.uint8)
    masks, classes = semantic_targets(label, K + 1)
    assert classes.tolist() == [0, 3, 7] and classes.dtype == torch.long
    assert masks.dtype == torch.float32 and masks.shape == (3, 2, 3)
    assert masks[1].tolist() == [[0, 0, 1], [0, 1, 0]]
    assert masks[:, 1, 0].sum() == 0  # the 255 pixel is in no mask
    assert (masks.sum(0) + (label == 255)).eq(1).all()  # every other pixel in exactly one
    empty_masks, empty_classes = semantic_targets(torch.full((4, 4), 255, dtype=torch.uint8), K + 1)
    assert empty_masks.shape == (0, 4, 4) and empty_classes.numel() == 0
    with pytest.raises(ValueError, match="outside the model's labels"):
        semantic_targets(torch.tensor([[0, 21]], dtype=torch.uint8), K + 1)


def test_ignored_pixels_add_no_loss_and_no_gradient(monkeypatch):
    model = _tiny()
    masks, classes = batch_targets(_labels(), K + 1)

    def loss_of(mask_logits: torch.Tensor) -> torch.Tensor:
        # Predicted masks at a quarter of the label size, as MaskFormer's.
        torch.manual_seed(1)
        outputs = MaskFormerForInstanceSegmentationOutput(
            masks_queries_logits=mask_logits, class_queries_logits=torch.randn(2, 8, K + 2),
            auxiliary_logits=[{"masks_queries_logits": mask_logits * 2, "class_queries_logits": torch.randn(2, 8, K + 2)}])
        monkeypatch.setattr(model, "_predict", lambda pixel_values, auxiliary: outputs)
        return model(torch.zeros(2, 3, 32, 32), masks, classes).loss

    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8, 8, requires_grad=True)
    loss = loss_of(logits)
    loss.backward()
    # Image 1's label columns 0..7 are 255: bilinear upsampling takes predicted column 0 to
    # label columns 0..5 only, so nothing there may count.
    assert logits.grad[1, :, :, 0].abs().max() == 0 and logits.grad[1, :, :, 1:].abs().max() > 0
    changed = logits.detach().clone()
    changed[1, :, :, 0] = 50.0  # confident masks where the label says nothing
    torch.testing.assert_close(loss_of(changed), loss.detach())
    changed[1, :, :, 2] = 50.0  # where it does say something
    assert not torch.isclose(loss_of(changed), loss.detach())


SEEN_1 = [VOC.lookup(name).index for name in VOC.seen(1)]
DOG = VOC.lookup("dog").index  # unseen in split 1


def _text_model(seed: int = 0) -> Segmenter:
    """A tiny text-head segmenter that knows split 1's seen classes, as an inductive run trains it."""
    torch.manual_seed(seed)
    model = Segmenter(SegmenterModelConfig.tiny(K + 1, head="text", text_encoder="tiny", text_template=TEMPLATE,
                                                text_dim=32))
    model.add_class_embeddings(SEEN_1, encode_class_names("tiny", VOC, VOC.seen(1)))
    return model


def test_text_head_logits_and_loss_over_known_classes():
    model = _text_model().train()
    assert model.known_classes == SEEN_1
    masks, classes = batch_targets(_labels(), K + 1)  # classes 0, 3 and 7: seen in split 1
    outputs = model(torch.randn(2, 3, 32, 32), masks, classes)
    logits = outputs.class_queries_logits
    assert logits.shape == (2, 8, K + 2)  # background, 20 classes, "no object": the closed head's layout
    assert (logits[..., DOG] == IGNORED_LOGIT).all()  # a class never named is out of the prediction space
    assert (logits[..., SEEN_1 + [0, K + 1]].abs() <= 100.01).all()  # cosine / 0.01 for the rest
    outputs.loss.backward()
    head = model.maskformer.class_predictor
    assert head.projection.weight.grad is not None and head.background.grad is not None
    assert not head.class_embeddings.requires_grad  # CLIP's embeddings stay frozen


def test_an_unseen_name_added_at_test_time_enters_the_prediction_space():
    model = _text_model().eval()
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        before = model.semantic_logits(pixels)
    assert before.shape == (2, K + 1, 48, 40) and (before[:, DOG] == 0).all()
    assert not (before.argmax(1) == DOG).any()

    # The name "dog", embedded at test time, made to match query 0's segment embedding exactly.
    with torch.no_grad():
        hidden = model.maskformer.model(pixels[:1]).transformer_decoder_last_hidden_state
        target = model.maskformer.class_predictor.projection(hidden)[0, 0]
        model.add_class_embeddings([DOG], target[None])
        after = model.semantic_logits(pixels[:1])
        logits = model(pixels[:1]).class_queries_logits
    assert DOG in model.known_classes and (after[:, DOG] > 0).all()
    assert int(logits[0, 0].argmax()) == DOG  # cosine 1: the query now says "dog"
    assert (logits[..., SEEN_1] > IGNORED_LOGIT).all()  # the seen classes stay in it

    with pytest.raises(ValueError, match="only the text head takes class embeddings"):
        _tiny().add_class_embeddings([DOG], target[None])


def test_text_head_config_needs_its_fields():
    with pytest.raises(ValueError, match="head 'text' needs text_encoder, text_template and text_dim"):
        SegmenterModelConfig.tiny(K + 1, head="text", text_encoder="tiny")
    with pytest.raises(ValueError, match="belong to head 'text'"):
        SegmenterModelConfig.tiny(K + 1, text_dim=32)
    old = SegmenterModelConfig.tiny(K + 1).model_dump(mode="json")
    del old["head"], old["text_encoder"], old["text_template"], old["text_dim"]
    assert SegmenterModelConfig.model_validate(old).head == "closed"  # checkpoints from before the text head


def test_frozen_backbone_norm_keeps_statistics():
    torch.manual_seed(0)
    config = SegmenterModelConfig.tiny(K + 1).model_copy(update={"frozen_backbone_norm": True})
    model = Segmenter(config).train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(n.training for n in norms) and model.maskformer.class_predictor.training
    assert not any(p.requires_grad for n in norms for p in n.parameters())
    before = norms[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(norms[0].running_mean, before)


def _bottleneck_config() -> SegmenterModelConfig:
    """A ResNet-50-wide backbone with one block per stage: the real layout, quick to build."""
    return SegmenterModelConfig.tiny(K + 1).model_copy(update={
        "backbone_layer_type": "bottleneck", "backbone_widths": [256, 512, 1024, 2048], "stem_width": 64})


def test_backbone_weights_from_torchvision_and_transformers(tmp_path):
    torch.manual_seed(0)
    reference = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    for module in reference.modules():  # non-trivial statistics, so that a misplaced one shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    safetensors.torch.save_file(reference.state_dict(), tmp_path / "torchvision.safetensors")
    model = Segmenter(_bottleneck_config()).eval()
    load_backbone_weights(model, str(tmp_path / "torchvision.safetensors"))

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone(x).feature_maps[-1]
        r = reference
        theirs = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # transformers' ResNet layout (microsoft/resnet-*): a folder with model.safetensors.
    folder = tmp_path / "hf"
    folder.mkdir()
    state = {f"resnet.{k}": v for k, v in model.backbone.state_dict().items()}
    safetensors.torch.save_file({**state, "classifier.1.weight": torch.zeros(10, 2048)}, folder / "model.safetensors")
    fresh = Segmenter(_bottleneck_config())
    load_backbone_weights(fresh, str(folder))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[key], value)

    with pytest.raises(CheckpointError, match="do not fit the tiny ResNet"):
        load_backbone_weights(_tiny(), str(tmp_path / "torchvision.safetensors"))


def _trained_step():
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    masks, classes = batch_targets(_labels(), K + 1)
    model(torch.randn(2, 3, 32, 32), masks, classes).loss.backward()
    optimizer.step()
    return model, optimizer


METADATA = {"iteration": 1, "setting": "inductive", "split": 1, "seen": ["aeroplane"], "unseen": ["dog"],
            "vocabulary": {"name": "voc", "classes": []}}


def _assert_round_trip(uri: str, model: Segmenter, optimizer) -> None:
    loaded, metadata = load_segmenter_checkpoint(uri)
    assert not loaded.training and metadata["iteration"] == 1 and metadata["setting"] == "inductive"
    assert metadata["unseen"] == ["dog"] and SegmenterModelConfig.model_validate(metadata["model"]) == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-4, weight_decay=1e-4)
    load_optimizer_state(uri, fresh, metadata)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert float(fresh.state_dict()["state"][0]["step"]) == 1.0


def test_checkpoint_round_trip_local(tmp_path):
    model, optimizer = _trained_step()
    uri = str(tmp_path / "run" / "last")
    save_segmenter_checkpoint(uri, model, optimizer, METADATA)
    assert sorted(p.name for p in Path(uri).iterdir()) == [
        "checkpoint.json", "model-00000001.safetensors", "optimizer-00000001.safetensors"]
    _assert_round_trip(uri, model, optimizer)

    # The next save replaces the weight files only once its checkpoint.json is written.
    save_segmenter_checkpoint(uri, model, None, {**METADATA, "iteration": 2})
    assert sorted(p.name for p in Path(uri).iterdir()) == ["checkpoint.json", "model-00000002.safetensors"]
    (Path(uri) / "model-00000002.safetensors").write_bytes(safetensors.torch.save({"x": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_segmenter_checkpoint(uri)
    (Path(uri) / "checkpoint.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="is not a segmenter-checkpoint/1"):
        load_segmenter_checkpoint(uri)


def test_text_head_checkpoint_keeps_its_embeddings(tmp_path):
    model = _text_model()
    save_segmenter_checkpoint(str(tmp_path / "last"), model, None, METADATA)
    loaded, _ = load_segmenter_checkpoint(str(tmp_path / "last"))
    assert loaded.config.head == "text" and loaded.known_classes == SEEN_1
    assert torch.equal(loaded.maskformer.class_predictor.class_embeddings,
                       model.maskformer.class_predictor.class_embeddings)


def test_checkpoint_round_trip_s3(bucket, s3_endpoint):
    model, optimizer = _trained_step()
    uri = f"s3://{bucket}/segmenter/run/last"
    save_segmenter_checkpoint(uri, model, optimizer, METADATA)
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="segmenter/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "segmenter/run/last/checkpoint.json", "segmenter/run/last/model-00000001.safetensors",
        "segmenter/run/last/optimizer-00000001.safetensors"]
    _assert_round_trip(uri, model, optimizer)


def test_real_resnet101_maskformer_forward():
    torch.manual_seed(0)
    model = Segmenter(SegmenterModelConfig.real(K + 1)).eval()
    blocks = [len(stage.layers) for stage in model.backbone.encoder.stages]
    assert blocks == [3, 4, 23, 3] and model.maskformer.config.decoder_config.num_queries == 100
    assert 55e6 < sum(p.numel() for p in model.parameters()) < 65e6
    with torch.no_grad():
        scores = model.semantic_logits(torch.randn(2, 3, 224, 224))
    assert scores.shape == (2, K + 1, 224, 224) and torch.isfinite(scores).all()
