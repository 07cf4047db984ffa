"""The open-vocabulary oracle: every instance of a prompt class, found by the class's name.

Two routes behind ``Detector``, so that label.py's rules apply unchanged:

- SAM 3 (``Sam3Model``): a text concept in, every instance's mask and score out.
- A text-prompted detector (``Owlv2ForObjectDetection`` or ``GroundingDinoForObjectDetection``)
  whose boxes Segment Anything (``SamModel`` or ``Sam2Model``) turns into masks; the box
  score is the instance score ("Grounded SAM").

Each image is asked for its own prompt classes, each class by its natural name and every
synonym; an instance found by any of them is labelled with the class's vocabulary index.
Which route and which architectures follow from the saved models' configs (``model_type``),
so a recipe names folders, not kinds. The tiny random models at the end (``save_tiny_sam3``,
``save_tiny_detector_and_sam``) go through the same loading path in tests and bench/gpu.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_convert, clip_boxes_to_image
from transformers import (
    AutoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    Owlv2ForObjectDetection,
    Owlv2Processor,
    Sam2Model,
    Sam2Processor,
    Sam3Model,
    Sam3Processor,
    SamModel,
    SamProcessor,
)
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from factory.core.devices import pick_dtype
from factory.core.options import ConfigError
from factory.core.storage import local_copy
from factory.core.vocab import ClassInfo
from factory.detection.detections import Detections
from factory.pipeline.sections import LabelerConfig

# model_type -> (model, processor): what each saved folder may be.
DETECTORS = {"owlv2": (Owlv2ForObjectDetection, Owlv2Processor),
             "grounding-dino": (GroundingDinoForObjectDetection, GroundingDinoProcessor)}
SEGMENTERS = {"sam": (SamModel, SamProcessor), "sam2": (Sam2Model, Sam2Processor)}
SAM3 = "sam3"
MAX_INSTANCES = 100  # per image, best scores first: Mask R-CNN's box_detections_per_img


def class_queries(classes: Sequence[ClassInfo]) -> tuple[list[str], np.ndarray]:
    """The texts an image is asked for, each class by its natural name and then its synonyms, and
    the vocabulary index that labels what each text finds (a text shared by two classes: the first's)."""
    texts, indices = [], []
    for info in classes:
        for text in (info.natural, *info.synonyms):
            if text not in texts:
                texts.append(text)
                indices.append(info.index)
    return texts, np.array(indices, np.int64)


def _empty(height: int, width: int) -> Detections:
    return Detections(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, height, width), np.float32))


def _best(scores: torch.Tensor, low: float, limit: int) -> torch.Tensor:
    """Indices of the candidates at or above ``low``, at most ``limit``, best first."""
    order = scores.argsort(descending=True)
    return order[scores[order] >= low][:limit]


class Sam3Detector:
    """SAM 3: one image encoding per image, then one DETR-style decoding per (image, text) pair."""

    def __init__(self, model: Sam3Model, processor: Sam3Processor, config: LabelerConfig,
                 max_instances: int = MAX_INSTANCES):
        self.model, self.processor = model.eval(), processor
        self.low, self.max_instances = config.candidate_threshold, max_instances

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, classes: list[list[ClassInfo]]) -> list[Detections]:
        height, width = images.shape[1:3]
        queries = [class_queries(c) for c in classes]
        texts = [text for image_texts, _ in queries for text in image_texts]
        if not texts:
            return [_empty(height, width) for _ in images]
        device, dtype = self.model.device, self.model.dtype
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, dtype)
        vision = self.model.get_vision_features(pixel_values=pixels)
        # Each (image, text) pair is one prompt: repeat the image's features rather than re-encode it.
        owner = torch.tensor([i for i, (image_texts, _) in enumerate(queries) for _ in image_texts], device=device)
        pairs = Sam3VisionEncoderOutput(fpn_hidden_states=tuple(f[owner] for f in vision.fpn_hidden_states),
                                        fpn_position_encoding=tuple(p[owner] for p in vision.fpn_position_encoding))
        tokens = self.processor(text=texts, return_tensors="pt").to(device)
        out = self.model(vision_embeds=pairs, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        # As Sam3Processor.post_process_instance_segmentation: query score x the text's presence score.
        scores = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid()).float()  # (pairs, queries)
        found, start = [], 0
        for image_texts, indices in queries:
            rows = slice(start, start + len(image_texts))
            start += len(image_texts)
            pair_scores = scores[rows]
            keep = _best(pair_scores.flatten(), self.low, self.max_instances)
            if not len(keep):
                found.append(_empty(height, width))
                continue
            masks = out.pred_masks[rows].flatten(0, 1)[keep].float()  # low-resolution logits (K, h, w)
            masks = F.interpolate(masks[None], (height, width), mode="bilinear", align_corners=False)[0].sigmoid()
            text_of = (keep // pair_scores.shape[1]).cpu().numpy()
            found.append(Detections(classes=indices[text_of], scores=pair_scores.flatten()[keep].cpu().numpy(),
                                    masks=masks.cpu().numpy()))
        return found


class GroundedSamDetector:
    """Boxes from a text-prompted detector, masks from Segment Anything prompted by those boxes.

    Candidates at or above the lowest threshold label.py looks at go through class-aware NMS at
    ``nms_threshold`` (OWLv2 answers once per image patch, Grounding DINO once per query, so
    one object comes back as many overlapping boxes), then the best ``max_instances`` to SAM.
    """

    def __init__(self, detector: Owlv2ForObjectDetection | GroundingDinoForObjectDetection,
                 detector_processor: Owlv2Processor | GroundingDinoProcessor,
                 sam: SamModel | Sam2Model, sam_processor: SamProcessor | Sam2Processor, config: LabelerConfig,
                 max_instances: int = MAX_INSTANCES):
        self.detector, self.detector_processor = detector.eval(), detector_processor
        self.sam, self.sam_processor = sam.eval(), sam_processor
        self.low, self.nms_threshold = config.candidate_threshold, config.nms_threshold
        self.max_instances = max_instances
        self.find_boxes = {"owlv2": self._owlv2_boxes, "grounding-dino": self._grounding_dino_boxes}[
            detector.config.model_type]

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, classes: list[list[ClassInfo]]) -> list[Detections]:
        height, width = images.shape[1:3]
        queries = [class_queries(c) for c in classes]
        boxes = [torch.zeros(0, 4)] * len(images)
        scores, labels = [torch.zeros(0)] * len(images), [np.zeros(0, np.int64)] * len(images)
        asked = [i for i, (texts, _) in enumerate(queries) if texts]
        if asked:
            found = self.find_boxes(images[asked], [queries[i][0] for i in asked])
            for i, (image_boxes, image_scores, text) in zip(asked, found):
                image_boxes = clip_boxes_to_image(image_boxes.float().cpu(), (height, width))
                image_scores, index = image_scores.float().cpu(), torch.from_numpy(queries[i][1])[text.cpu()]
                keep = (image_scores >= self.low).nonzero()[:, 0]
                keep = keep[batched_nms(image_boxes[keep], image_scores[keep], index[keep], self.nms_threshold)]
                keep = keep[:self.max_instances]  # batched_nms sorts by score
                boxes[i], scores[i], labels[i] = image_boxes[keep], image_scores[keep], index[keep].numpy()
        masks = self.segment(images, boxes)
        return [Detections(classes=labels[i], scores=scores[i].numpy(), masks=masks[i]) for i in range(len(images))]

    def _owlv2_boxes(self, images: np.ndarray, texts: list[list[str]]) -> list[tuple[torch.Tensor, ...]]:
        """Per image: one box per image patch, its best text's score and that text's position."""
        inputs = self.detector_processor(text=texts, images=list(images), return_tensors="pt").to(self.detector.device)
        out = self.detector(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"].to(self.detector.dtype))
        logits = out.logits.float()  # (images, patches, most texts of an image)
        for i, image_texts in enumerate(texts):  # the processor pads shorter lists with " ": never an answer
            logits[i, :, len(image_texts):] = -torch.inf
        best, text = logits.sigmoid().max(dim=-1)
        # OWLv2 pads each image to a square at the bottom right: boxes are fractions of the longer side
        boxes = box_convert(out.pred_boxes.float(), "cxcywh", "xyxy") * max(images.shape[1:3])
        return list(zip(boxes, best, text))

    def _grounding_dino_boxes(self, images: np.ndarray, texts: list[list[str]]) -> list[tuple[torch.Tensor, ...]]:
        """Per image: one box per decoder query, scored for each text by the mean probability of
        its tokens (mmdetection's positive maps), its best text's score and position."""
        prompts, spans = zip(*(_grounding_prompt(image_texts) for image_texts in texts))
        inputs = self.detector_processor(images=list(images), text=list(prompts), padding="longest",
                                         return_tensors="pt").to(self.detector.device)
        out = self.detector(pixel_values=inputs["pixel_values"].to(self.detector.dtype),
                            pixel_mask=inputs["pixel_mask"], input_ids=inputs["input_ids"],
                            attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
        offsets = self.detector_processor.tokenizer(list(prompts), padding="longest",
                                                    return_offsets_mapping=True)["offset_mapping"]
        probabilities = out.logits.float().sigmoid()  # (images, queries, tokens up to max_text_len)
        height, width = images.shape[1:3]
        boxes = box_convert(out.pred_boxes.float(), "cxcywh", "xyxy") * torch.tensor(
            [width, height, width, height], device=out.pred_boxes.device)
        found, tokens = [], probabilities.shape[-1]
        for i, (image_spans, image_offsets) in enumerate(zip(spans, offsets)):
            positive = torch.zeros(len(image_spans), tokens, device=probabilities.device)  # text x token
            for t, (begin, end) in enumerate(image_offsets[:tokens]):
                for k, (first, last) in enumerate(image_spans):
                    if end > begin and first <= begin < last:  # special tokens have empty offsets
                        positive[k, t] = 1.0
            positive /= positive.sum(dim=1, keepdim=True).clamp(min=1)
            best, text = (probabilities[i] @ positive.T).max(dim=-1)
            found.append((boxes[i], best, text))
        return found

    def segment(self, images: np.ndarray, boxes: list[torch.Tensor]) -> list[np.ndarray]:
        """Soft masks (K, H, W) in [0, 1] for each image's boxes."""
        height, width = images.shape[1:3]
        masks = [np.zeros((0, height, width), np.float32)] * len(images)
        todo = [i for i, image_boxes in enumerate(boxes) if len(image_boxes)]
        if not todo:
            return masks
        # SAM takes as many boxes for every image: repeat an image's last box, drop its masks after.
        count = max(len(boxes[i]) for i in todo)
        prompts = [boxes[i].tolist() + [boxes[i][-1].tolist()] * (count - len(boxes[i])) for i in todo]
        inputs = self.sam_processor(images=list(images[todo]), input_boxes=prompts, return_tensors="pt")
        out = self.sam(pixel_values=inputs["pixel_values"].to(self.sam.device, self.sam.dtype),
                       input_boxes=inputs["input_boxes"].to(self.sam.device, self.sam.dtype), multimask_output=False)
        # SAM pads its input and must be told the resized size to crop; SAM 2 resizes without padding.
        sizes = {"reshaped_input_sizes": inputs["reshaped_input_sizes"]} if "reshaped_input_sizes" in inputs else {}
        logits = self.sam_processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                       binarize=False, **sizes)
        for i, image_logits in zip(todo, logits):
            masks[i] = image_logits[:len(boxes[i]), 0].sigmoid().numpy()
        return masks


def _grounding_prompt(texts: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's one caption for many texts ("a cat. a dog."), and each text's characters in it."""
    prompt, spans = "", []
    for text in texts:
        spans.append((len(prompt), len(prompt) + len(text)))
        prompt += text.lower() + ". "
    return prompt.strip(), spans


def model_type(path: str) -> str:
    return AutoConfig.from_pretrained(path).model_type


def load_open_vocabulary(config: LabelerConfig, device: torch.device) -> Sam3Detector | GroundedSamDetector:
    """The labeler that ``config.weights`` (and ``config.sam``) make: each a model id, a local
    folder or an s3:// prefix of a ``save_pretrained`` folder; float16 on CUDA, float32 on CPU."""
    dtype = pick_dtype("auto", device)
    path = local_copy(config.weights)
    kind = model_type(path)

    def load(architecture: tuple, folder: str):
        model_class, processor_class = architecture
        model = model_class.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(device)
        return model, processor_class.from_pretrained(folder)

    if kind == SAM3:
        if config.sam is not None:
            raise ConfigError(f"labeler.weights {config.weights} is SAM 3, which makes its own masks: "
                              f"remove labeler.sam")
        return Sam3Detector(*load((Sam3Model, Sam3Processor), path), config)
    if kind not in DETECTORS:
        raise ConfigError(f"labeler.weights {config.weights} is a {kind} model; open_vocabulary takes "
                          f"sam3, {' or '.join(DETECTORS)}")
    if config.sam is None:
        raise ConfigError(f"labeler.weights {config.weights} is a {kind} detector: set labeler.sam to a SAM or "
                          f"SAM 2 model for its masks")
    sam_path = local_copy(config.sam)
    sam_kind = model_type(sam_path)
    if sam_kind not in SEGMENTERS:
        raise ConfigError(f"labeler.sam {config.sam} is a {sam_kind} model; it takes {' or '.join(SEGMENTERS)}")
    return GroundedSamDetector(*load(DETECTORS[kind], path), *load(SEGMENTERS[sam_kind], sam_path), config)


# ------------------------------------------------- tiny random models (tests, bench/gpu.py --small)

TINY_IMAGE = 112  # what the tiny models resize every image to


def tiny_clip_tokenizer(max_length: int):
    # Offline: a byte-level BPE whose class words are single tokens, as in the tiny generator.
    from factory.core.vocab import COCO, SHAPES, VOC
    from factory.diffusion.tiny import PROMPT_WORDS, bpe_tokenizer

    words = set(PROMPT_WORDS)
    for info in VOC.classes + COCO.classes + SHAPES.classes:
        words.update(info.natural.split())
    return bpe_tokenizer(words, max_length)


def _bert_tokenizer():
    from transformers import BertTokenizer

    from factory.core.vocab import COCO, SHAPES, VOC

    words = {word for info in VOC.classes + COCO.classes + SHAPES.classes for word in info.natural.split()}
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    # WordPiece: unknown words spell out in letters, as in BERT's real vocabulary
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *letters, *(f"##{c}" for c in letters), *sorted(words)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=256)


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_sam3(seed: int = 0) -> tuple[Sam3Model, Sam3Processor]:
    """SAM 3 in miniature (2-layer ViT at 112 px, 5 queries), random weights from ``seed``."""
    from transformers import Sam3Config, Sam3ImageProcessor
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    tokenizer = tiny_clip_tokenizer(32)
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    config = Sam3Config(
        vision_config=Sam3VisionConfig(
            backbone_config=Sam3ViTConfig(**small, num_hidden_layers=2, image_size=TINY_IMAGE, patch_size=14,
                                          window_size=4, global_attn_indexes=[1]),
            fpn_hidden_size=32, scale_factors=[2.0, 1.0]),
        text_config={**small, "vocab_size": len(tokenizer), "projection_dim": 32, "num_hidden_layers": 2,
                     "max_position_embeddings": 32, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        geometry_encoder_config=Sam3GeometryEncoderConfig(**small, num_layers=1),
        detr_encoder_config=Sam3DETREncoderConfig(**small, num_layers=1),
        detr_decoder_config=Sam3DETRDecoderConfig(**small, num_layers=1, num_queries=5),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2))
    processor = Sam3Processor(Sam3ImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}), tokenizer)
    return _seeded(lambda: Sam3Model(config), seed), processor


def tiny_owlv2(seed: int = 0) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    """OWLv2 in miniature (2-layer towers, 112 px in 16 px patches: 49 boxes)."""
    from transformers import Owlv2Config, Owlv2ImageProcessor

    tokenizer = tiny_clip_tokenizer(16)  # OWL's text tower reads 16 tokens
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = Owlv2Config(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 16,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**small, "image_size": TINY_IMAGE, "patch_size": 16}, projection_dim=32)
    processor = Owlv2Processor(Owlv2ImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}), tokenizer)
    return _seeded(lambda: Owlv2ForObjectDetection(config), seed), processor


def tiny_grounding_dino(seed: int = 0) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """Grounding DINO in miniature (a 4-stage Swin of width 8, a 1-layer BERT, 10 queries)."""
    from transformers import GroundingDinoConfig, GroundingDinoImageProcessor, SwinConfig

    tokenizer = _bert_tokenizer()
    config = GroundingDinoConfig(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, encoder_n_points=2, decoder_n_points=2,
        use_timm_backbone=False, max_text_len=32,
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=TINY_IMAGE, out_indices=[2, 3, 4]),
        text_config={"model_type": "bert", "vocab_size": len(tokenizer), "hidden_size": 8, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 32})
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": TINY_IMAGE, "longest_edge": TINY_IMAGE})
    return _seeded(lambda: GroundingDinoForObjectDetection(config), seed), GroundingDinoProcessor(image_processor,
                                                                                                  tokenizer)


def tiny_sam(seed: int = 0) -> tuple[SamModel, SamProcessor]:
    """SAM in miniature (2-layer ViT at 112 px in 16 px patches)."""
    from transformers import SamConfig, SamImageProcessor

    config = SamConfig(
        # SAM's own vision init (std 1e-10) would make every random mask 0.5 everywhere
        vision_config={"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": TINY_IMAGE, "patch_size": 16, "window_size": 4, "global_attn_indexes": [1],
                       "num_pos_feats": 16, "mlp_dim": 64, "initializer_range": 0.02},
        prompt_encoder_config={"hidden_size": 32, "image_size": TINY_IMAGE, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "iou_head_hidden_dim": 32})
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": TINY_IMAGE},
                                               pad_size={"height": TINY_IMAGE, "width": TINY_IMAGE}))
    return _seeded(lambda: SamModel(config), seed), processor


def tiny_sam2(seed: int = 0) -> tuple[Sam2Model, Sam2Processor]:
    """SAM 2 in miniature (a 4-stage Hiera of width 12 at 128 px)."""
    from transformers import Sam2Config, Sam2ImageProcessor
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    size = 128  # Hiera's stride 32 needs a multiple of 32
    backbone = Sam2HieraDetConfig(hidden_size=12, image_size=size, blocks_per_stage=[1, 1, 2, 1],
                                  embed_dim_per_stage=[12, 24, 48, 96], num_attention_heads_per_stage=[1, 1, 1, 1],
                                  window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3])
    config = Sam2Config(
        vision_config=Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[96, 48, 24, 12],
                                       backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=32),
        prompt_encoder_config={"hidden_size": 32, "image_size": size, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "iou_head_hidden_dim": 32},
        image_size=size)
    processor = Sam2Processor(Sam2ImageProcessor(size={"height": size, "width": size},
                                                 mask_size={"height": 32, "width": 32}))
    return _seeded(lambda: Sam2Model(config), seed), processor


def _save(model_and_processor: tuple, folder: Path) -> str:
    model, processor = model_and_processor
    model.save_pretrained(folder)  # safetensors
    processor.save_pretrained(folder)
    return str(folder)


def save_tiny_sam3(folder: str | Path, seed: int = 0) -> str:
    """A tiny random SAM 3 saved as ``labeler.weights`` reads it; returns the folder."""
    return _save(tiny_sam3(seed), Path(folder))


def save_tiny_detector_and_sam(folder: str | Path, detector: str = "owlv2", sam: str = "sam",
                               seed: int = 0) -> tuple[str, str]:
    """A tiny random detector (owlv2 or grounding-dino) and SAM (sam or sam2) in two subfolders of
    ``folder``; returns (labeler.weights, labeler.sam)."""
    detectors = {"owlv2": tiny_owlv2, "grounding-dino": tiny_grounding_dino}
    segmenters = {"sam": tiny_sam, "sam2": tiny_sam2}
    return (_save(detectors[detector](seed), Path(folder) / detector),
            _save(segmenters[sam](seed), Path(folder) / sam))
