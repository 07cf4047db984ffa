"""The dataset card: a README.md beside manifest.json in the style of Hugging Face dataset cards.

Made from the manifest alone (and the Parquet schema, for the optional capture columns):
a YAML header that `datasets` and the Hub read (features, one `train` split with its
size, the `data/*.parquet` files), then how the data was made (generator, labeler or
annotator, their thresholds, prompts, seeds, versions; for real images: their source, the
class lists asked, the prompt, the route into the U-Net and how they were resized), the counts,
how to load it, and its limits. `preview.png` is shown by a relative link.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from factory.core.conventions import TINY
from factory.core.options import fill_template
from factory.core.storage import Location
from factory.core.vocab import VOCABULARIES
from factory.dataset.layout import CARD_FILE, DATA_DIR, PREVIEW_FILE
from factory.dataset.schema import SCHEMA, huggingface_metadata

COLUMNS = {
    "sample_id": "deterministic id: plan index and a hash of the recipe",
    "index": "position in the plan",
    "prompt": "the text given to the generator",
    "classes": "canonical class names in the prompt",
    "class_words": "how each class is worded in the prompt",
    "class_indices": "label-map index of each class",
    "seed": "the sample's noise seed",
    "image": "the generated image (PNG or JPEG)",
    "label": "palette PNG of label indices: 0 background, class index, 255 ignore",
    "masks": "1-bit PNG per class: the union of its instances, before overlaps are resolved",
    "scores": "best instance score per class (0 when missing)",
    "instances": "merged instances per class",
    "found": "whether the labeler found each class",
    "width": "image width",
    "height": "image height",
    "generator": "model that drew the image",
    "labeler": "model that labelled it",
    "timestep": "diffusion timestep of the captured U-Net call",
    "latent": "the captured U-Net call's latent, fp16 bytes",
    "daam": "DAAM cross-attention heat map per class (latent grid, min-max normalised), fp16 bytes",
    "quality": "CLIP image-quality score",
    "agreement": "IoU of the second labeler's mask with this labeler's, per class",
    "presence": "the grounding module's presence score per class; below the card's threshold the class was judged "
                "absent",
    "source_image": "the image's name in the source (file name, image id, or sample id)",
    "psnr": "dB of the image regenerated from its DDIM inversion against the image",
    "source_height": "the image's height in the source, before it was resized",
    "source_width": "the image's width in the source, before it was resized",
}
REAL_COLUMNS = {  # what the columns mean in a set of real images
    "sample_id": "deterministic id: the image's index and a hash of the recipe",
    "index": "a number of the image's own: a hash of its file name and content (or of its id in the source)",
    "prompt": "the text naming the image's classes, under which it went into the U-Net",
    "classes": "canonical names of the classes the image was asked about",
    "seed": "the noise seed of the noised route",
    "image": "the source image, resized to the generator's size (PNG or JPEG)",
    "generator": "the model whose U-Net featurized the image",
}


def _meaning(column: str, real: bool = False) -> str:
    if column.startswith(("features_", "ufeatures_")):
        return "captured U-Net features (conditional / unconditional), fp16 bytes"
    return (real and REAL_COLUMNS.get(column)) or COLUMNS.get(column, "")


def yaml_features(schema: pa.Schema) -> list[dict]:
    """The Hub's YAML form of the features stored in the Parquet metadata (`Image` -> image,
    `List(x)` -> list: x)."""
    features = json.loads(huggingface_metadata(schema)[b"huggingface"])["info"]["features"]

    def dtype(feature: dict) -> str:
        return "image" if feature["_type"] == "Image" else feature["dtype"]

    return [{"name": name, "list": dtype(f["feature"])} if f["_type"] == "List" else {"name": name, "dtype": dtype(f)}
            for name, f in features.items()]


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "n>10M"


def card_header(manifest: dict, schema: pa.Schema = SCHEMA) -> dict:
    written = manifest["counts"]["written"]
    size = sum(entry["bytes"] for entry in manifest["files"])
    return {
        "pretty_name": manifest["name"],
        "license": "other",  # the generator's licence binds its outputs: see "Licence"
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "tags": [*([] if (manifest["recipe"].get("source") or {}).get("images") else ["synthetic"]),
                 "stable-diffusion", "dataset-factory"],
        "size_categories": [_size_category(written)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        "dataset_info": {
            "features": yaml_features(schema),
            "splits": [{"name": "train", "num_bytes": size, "num_examples": written}],
            "download_size": size,
            "dataset_size": size,
        },
    }


def _table(rows: list[tuple], head: tuple) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


_ON_MISSING = {"drop": "A sample with a prompt class not found was dropped (`on_missing: drop`).",
               "ignore": "A prompt class not found was kept, marked in `found`, with every unclaimed pixel 255 "
                         "(`on_missing: ignore`).",
               "absent": "A class not found was taken as absent from the image, marked in `found` "
                         "(`on_missing: absent`)."}


def _agreement(agreement: dict | None) -> list[str]:
    """The second labeler's agreement with the labels, per class (manifest "agreement")."""
    if not agreement:
        return []
    min_iou, action = agreement["min_iou"], agreement["action"]
    rule = (f"Samples with a class below IoU {min_iou} were {'dropped' if action == 'drop' else 'kept'}"
            + ("." if action == "drop" else ", that class's pixels made 255.")) if min_iou else "Nothing was filtered."
    return ["### Label agreement", "",
            f"`{agreement['labeler']}` labelled every image again; per class, the IoU of its mask with the label's "
            f"(1.0 when both are empty), over every sample made, dropped ones too. {rule}", "",
            *_table([(name, c["samples"], f"{c['mean']:.3f}", f"{c['median']:.3f}", c["below"])
                     for name, c in agreement["classes"].items()],
                    ("class", "samples", "mean IoU", "median IoU", f"below {min_iou}")), ""]


def _presence(presence: dict | None) -> list[str]:
    """How often the grounding module judged each class present (manifest "presence")."""
    if not presence:
        return []
    threshold = presence["threshold"]
    return ["### Presence", "",
            f"The grounding module's presence head scored every class it was asked about; below {threshold} the "
            f"class was judged absent and got no pixels. Per class, over every sample made (dropped ones too), "
            f"how often it was judged present and absent, and the spread of its scores (10th, 50th and 90th "
            f"percentile). No judge was asked: a class judged present in nearly every image it was named for, "
            f"or a spread near the threshold, is worth a look.", "",
            *_table([(name, c["samples"], c["present"], c["absent"], f"{c['p10']:.2f}", f"{c['median']:.2f}",
                      f"{c['p90']:.2f}") for name, c in presence["classes"].items()],
                    ("class", "samples", "judged present", "judged absent", "p10", "median", "p90")), ""]


def _follows(follows: dict | None) -> list[str]:
    """Which set this one shares its images with (manifest "follows", recipe ``follow``)."""
    if not follows:
        return []
    return [f"Same images as `{follows['dataset']}`: only the labels differ. That set (`{follows['name']}`, recipe "
            f"key `{follows['content_key']}`) has this plan, and each sample it wrote was made here once, with its "
            "prompt, attempt, seed and `sample_id`, never dropped or replaced: a join on `sample_id` pairs each "
            "image's labels of the two sets. A class this labeler missed is handled as `on_missing` says below.", ""]


def _vocabulary_name(recipe: dict) -> str:
    spec = recipe["vocabulary"]
    return f"`{spec}`" if isinstance(spec, str) else f"`{spec['name']}` (user-defined, defined in the recipe)"


def _classes(vocabulary: dict) -> list[str]:
    """The class table, and the seen/unseen splits of a user-defined vocabulary."""
    classes = vocabulary["classes"]
    synonyms = any(c.get("synonyms") for c in classes)  # older manifests list index, name, natural only
    lines = _table([(c["index"], c["name"], c["natural"], *([", ".join(c["synonyms"])] if synonyms else []))
                    for c in classes], ("index", "name", "in prompts", *(["also asked as"] if synonyms else [])))
    if vocabulary.get("unseen") and vocabulary["name"] not in VOCABULARIES:
        lines += ["", "Unseen classes of each split: " + "; ".join(
            f"{k}: {', '.join(split)}" for k, split in enumerate(vocabulary["unseen"], start=1)) + "."]
    return lines


# What the generator's sampler was (recipe generator.scheduler; cards of builds before it: DDIM).
_SAMPLERS = {"ddim": "DDIM {} steps (eta 0)", "dpm++": "DPM-Solver++ 2M, {} steps", "lcm": "LCM, {} steps",
             "flow": "flow-matching Euler, {} steps"}
# The generator family's licence binds the images (factory.diffusion.families names the families).
_LICENCES = {
    "sd": "for Stable Diffusion v1.x, CreativeML OpenRAIL-M",
    "sdxl": "for SDXL 1.0, CreativeML Open RAIL++-M",
    "sd3": "for Stable Diffusion 3.5, the Stability AI Community License: free below USD 1M of annual revenue, an "
           "enterprise licence above",
    "flux": "for FLUX.1 [dev], the FLUX.1 [dev] Non-Commercial License: no commercial use; for FLUX.1 [schnell], "
            "Apache 2.0",
}


def _generator_line(gen: dict, models: dict, generator: dict) -> str:
    sampler = _SAMPLERS[gen.get("scheduler", "ddim")].format(gen["steps"])
    guidance = "distilled guidance" if generator.get("family") == "flux" else "guidance scale"
    family = f" ({generator['title']})" if generator else ""
    return (f"- **Generator**: `{models['generator']}`{family}, {sampler}, {guidance} {gen['guidance_scale']}, "
            f"{gen['width']}x{gen['height']}, dtype `{gen['dtype']}`.")


def _making(recipe: dict, models: dict, generator: dict) -> list[str]:
    gen, lab = recipe["generator"], recipe["labeler"]
    prompts, writer = recipe["prompts"], recipe["writer"]
    annotator = recipe.get("annotator") or {}
    source = recipe.get("source") or {}
    lines = ["## How it was made", ""]
    if source.get("images"):
        lines += _real_images(recipe)
    else:
        lines.append(_generator_line(gen, models, generator))
    annotated = bool(annotator.get("checkpoint") or annotator.get("daam"))
    if source.get("images") and not annotated:
        lines.append("- **Labels**: each image's own masks, resized with it (nearest).")
    elif annotated:
        ignore = annotator.get("ignore_below")
        what = ("DAAM, the papers' baseline: the generator's cross-attention heat map of each class word over "
                "every step, min-max normalised" if annotator.get("daam") else
                f"the grounding module, labelling from the generator's own U-Net features: `{annotator['checkpoint']}`")
        lines.append(f"- **Annotator** ({what}); a pixel belongs to a class above score {annotator['threshold']}"
                     + (f", unsure below it down to {ignore} (255)" if ignore is not None else "") + ". "
                     + _ON_MISSING[annotator["on_missing"]])
    else:
        ignore = lab.get("ignore_threshold")
        lines.append(f"- **Labeler**: `{models['labeler']}` (instance segmentation). Every instance of a prompt class "
                     f"scoring at least {lab['score_threshold']} is merged into its class mask, overlaps go to the "
                     f"higher score" + (f", instances scoring in [{ignore}, {lab['score_threshold']}) become 255"
                                        if ignore is not None else "") +
                     f"; soft masks binarised at {lab['mask_threshold']}, NMS IoU {lab['nms_threshold']}. "
                     + _ON_MISSING[lab["on_missing"]])
    if not source.get("images"):
        lines += [f"- **Prompts**: one class `{prompts['one']}`, two classes `{prompts['two']}`"
              + (f", scene prompts from `{prompts['file']}`" if prompts.get("file") else "")
                  + (f", more templates for {', '.join(f'`{n}`' for n in prompts['per_class'])}"
                     if prompts.get("per_class") else "") + ".",
                  f"- **Plan**: vocabulary {_vocabulary_name(recipe)}, classes `{recipe['classes']}`"
                  + (f" of split {recipe['split']}" if recipe.get("split") else "")
                  + f", {recipe['per_class']} per class and {recipe['per_pair']} per co-appearing pair (pairs: "
                  f"`{recipe['pairs']}`), plan seed {recipe['seed']}"
                  + (f", first {recipe['num_samples']} samples kept" if recipe.get("num_samples") else "")
                  + ". Each row's `seed` column is its noise seed: a sample is reproducible from its prompt and seed."]
    lines += [f"- **Encoding**: images as {writer['image_format'].upper()}, label maps as palette PNGs "
              f"(VOC colours), {writer['rows_per_file']} rows per Parquet file."]
    capture, quality = recipe.get("capture") or {}, recipe.get("quality") or {}
    if capture.get("features", "none") != "none" or capture.get("attention"):
        lines.append(f"- **Capture**: U-Net `{capture['features']}` at {capture['step']} steps before the end"
                     + (", DAAM heat maps per class" if capture.get("attention") else "") + ".")
    if quality.get("model"):
        lines.append(f"- **Quality**: CLIP score by `{quality['model']}`.")
    return lines


_RESIZE = {
    "squash": "resized whole to {size}, stretched where its aspect ratio is not the generator's (`source.resize: "
              "squash`, the default)",
    "crop": "scaled to cover {size} and cut to it around its centre, losing the ends of its longer side "
            "(`source.resize: crop`)",
    "pad": "scaled to fit inside {size} whole, the rest filled with black (`source.resize: pad`; 255, ignore, "
           "in label maps from masks)",
}
_ROUTE = {"inversion": "DDIM-inverted under its prompt and regenerated, the U-Net features captured on the way "
                       "(Li et al. 2023, supplementary C.3)",
          "noised": "its VAE latent noised to the capture step and passed once through the U-Net (as ODISE, "
                    "Xu et al. 2023)"}


def _real_images(recipe: dict) -> list[str]:
    """How real images were made into a dataset: where from, which classes each was asked about,
    the prompt, the route into the U-Net, and how each was resized."""
    gen, prompts, source = recipe["generator"], recipe["prompts"], recipe["source"]
    size = f"{gen['width']}x{gen['height']}"
    resize = _RESIZE[source.get("resize", "squash")].format(size=size)  # older manifests: squash, the only way then
    if source["format"] != "folder":
        lists = "each image's own list: the classes its masks (or tags) in the source show"
    elif source.get("classes_file"):
        lists = f"each image's own list, from `{source['classes_file']}`"
    else:
        lists = f"one list for every image, `{recipe['classes']}`"
    many = fill_template(prompts["one"], prompts["two"], ["{0}", "{1}", "{2}"])
    return [f"- **Images**: real, from `{source['images']}` ({source['format']}"
            + (f", {source['split']}" if source.get("split") else "") + f"), one sample each (`source_image`); "
            f"each {resize}; `source_height` and `source_width` hold its size before.",
            f"- **Classes asked**: {lists}; vocabulary {_vocabulary_name(recipe)}"
            + (f", split {recipe['split']}" if recipe.get("split") else "") + ". An image's `index`, `sample_id` "
            "and `seed` come from its file name and content (or its id in the source), not from its place in the "
            "listing: adding images and running the same command again annotates just the new ones.",
            f"- **Prompt**: each image's classes named in one prompt: `{prompts['one']}` for one class, "
            f"`{prompts['two']}` for two, `{many}` and so on for more.",
            f"- **Route**: each image {_ROUTE[source['route']]}, through `{gen['model']}` with DDIM {gen['steps']} "
            f"steps, without guidance; the `seed` column is the noised route's noise."]


LIMITATIONS = """## Limitations and biases

- **Synthetic images.** Every image is drawn by the generator from a short template prompt: it
  inherits the generator's training-data biases (which people, places and styles a class
  "looks like"), favours centred, canonical views, and does not follow the distribution of
  real photographs. Models trained on it should be evaluated on real images.
- **Machine labels.** Label maps come from a model, not from people: missed instances,
  loose boundaries and wrong classes occur. Pixels the labeler was unsure of are 255
  (ignore), never background; use `ignore_index=255`.
- **Selection.** Samples whose prompt class was not found may be dropped and replaced by
  another seed (see the counts): the set over-represents images where the class is easy to recognise.
- **Two-object prompts** often yield one object, or a blend of both; `found` and `scores`
  say what the labeler saw.
"""
TINY_MODELS = """- **Tiny models.** This build used a `tiny` generator or labeler (random weights, for tests):
  its images are noise, not photographs."""
TINY_FEATURES = """- **Tiny models.** This build used a `tiny` generator or annotator (random weights, for tests):
  its labels are noise."""


def _real_limitations(recipe: dict) -> str:
    """The limits of a set of real images: its labels, the classes asked, the route, the resizing."""
    gen, source, annotator = recipe["generator"], recipe["source"], recipe.get("annotator") or {}
    resize = _RESIZE[source.get("resize", "squash")].format(size=f"{gen['width']}x{gen['height']}")
    route = "DDIM inversion" if source["route"] == "inversion" else "a noised latent"
    if annotator.get("checkpoint") or annotator.get("daam"):
        labels = [
            "- **Machine labels.** Label maps come from a model, not from people: missed objects, loose\n"
            "  boundaries and wrong classes occur. Pixels the annotator was unsure of are 255 (ignore),\n"
            "  never background; use `ignore_index=255`.",
            "- **Only the classes asked.** Each image was labelled for the classes of its list alone: an\n"
            "  object of any other class is background, and a class of the list that was not found is\n"
            "  handled as `on_missing` says above.",
            f"- **Real images through a generator's U-Net.** The annotator reads the features the generator\n"
            f"  gives these images ({route}), not those of images it drew itself, which a grounding module is\n"
            "  trained on: expect lower label quality than on generated images, most on images unlike the\n"
            "  generator's own. Check a sample against ground truth where some exists."]
    else:
        labels = ["- **The source's labels.** Label maps are the source's own masks, resized with the image\n"
                  "  (nearest): as right as the source's annotations, and coarser at this size."]
    return "\n".join(["## Limitations and biases", "", *labels,
                      f"- **Resized.** Each image was {resize}; images and labels are at that size, not the image's "
                      "own.", ""])


def dataset_card(manifest: dict, schema: pa.Schema = SCHEMA, *, preview: bool | None = None) -> str:
    """README.md text for a finished dataset. `schema`: of its Parquet files (the capture
    columns are optional); `preview`: whether preview.png exists (default: the recipe asked)."""
    recipe, counts = manifest["recipe"], manifest["counts"]
    if preview is None:
        preview = bool(recipe["writer"].get("preview_samples")) and bool(manifest["files"])
    name, written = manifest["name"], counts["written"]
    models = manifest["models"]
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(counts["dropped"].items())) or "none"
    source = (recipe.get("source") or {}).get("images")
    tiny = TINY in (models["generator"], models["labeler"])
    if source:
        limitations = _real_limitations(recipe) + (TINY_FEATURES if tiny else "")
    else:
        limitations = LIMITATIONS + (TINY_MODELS if tiny else "")
    made = (f"real images of `{source}`, featurized as `{models['generator']}`" if source
            else f"images drawn by `{models['generator']}`")
    lines = ["---", yaml.safe_dump(card_header(manifest, schema), sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"A {'' if source else 'synthetic '}semantic-segmentation dataset made by dataset-factory: {written} "
             f"{made}, of the `{manifest['vocabulary']['name']}` classes, labelled by `{models['labeler']}`, "
             f"built {manifest.get('created', 'at an unknown time')}.", "", *_follows(manifest.get("follows"))]
    if preview:
        lines += [f"![Samples beside their label maps]({PREVIEW_FILE})", ""]
    lines += ["## Counts", "",
              *_table([(counts["planned"], counts["attempted"], written, dropped, counts["given_up"],
                        len(manifest["files"]))],
                      ("planned", "attempted", "written", "dropped", "given up", "Parquet files")), "",
              ("Each image of the source was planned once, never replaced. " if source else
               "Each sample of the followed set was made once, never replaced. " if manifest.get("follows") else
               f"Each planned prompt was tried with up to {recipe['attempts']} seeds until one sample was kept; "
               "a prompt whose every attempt was dropped is given up. ") +
              "Per class (a two-class sample counts for both):", "",
              *_table([(name, c["planned"], c["attempted"], c["kept"], c["given_up"])
                       for name, c in manifest["per_class"].items()],
                      ("class", "planned", "attempted", "kept", "given up")), "",
              *_provenance(manifest["labels"]), "",
              *_agreement(manifest.get("agreement")),
              *_presence(manifest.get("presence")),
              "## Loading", "",
              "```python",
              "from datasets import load_dataset",
              'ds = load_dataset("<this folder>", split="train")  # its files from this card\'s `configs`',
              f'ds = load_dataset("parquet", data_files="<this folder or s3:// prefix>/{DATA_DIR}/*.parquet", '
              'split="train")',
              'ds[0]["image"], ds[0]["label"]  # PIL images; np.array(label) gives the class indices',
              "```", "",
              "`pandas.read_parquet`, DuckDB and `factory.reader` (PyTorch, Ray Data) read the same files.", "",
              "## Columns", "",
              *_table([(f"`{f['name']}`", f.get("dtype") or f"list of {f['list']}", _meaning(f["name"], bool(source)))
                       for f in yaml_features(schema)], ("column", "type", "meaning")), "",
              "## Classes", "",
              "Label-map values: 0 background, 255 ignore, and:", "",
              *_classes(manifest["vocabulary"]), "",
              *_making(recipe, models, manifest.get("generator") or {}), "",
              "## Versions", "",
              *_table(sorted(manifest["versions"].items()), ("package", "version")), "",
              f"Recipe content key `{manifest.get('content_key')}`, plan digest `{manifest['plan']['digest']}`; "
              "the full recipe is in `manifest.json`.", "",
              limitations, "",
              "## Licence", "",
              (f"Images are the source's (`{source}`): its licence applies to their use, and the labeler's to "
               "the labels." if source else
               f"Images are outputs of the generator: its licence "
               f"({_LICENCES[(manifest.get('generator') or {}).get('family', 'sd')]}) applies to their use, and the "
               f"labeler's to the labels."), ""]
    return "\n".join(lines)


_CLASS_LISTS = {
    "prompt": "Each image's class list (the classes it is labelled for) is its prompt's classes.",
    "user": "Each image's class list (the classes it is labelled for) was given by the user: the source's "
            "`classes_file`, or the recipe's classes for every image.",
    "ground_truth": "Each image's class list (the classes it is labelled for) comes from the source's ground truth, "
                    "its masks or tags, which say which images show each class: not for zero-shot training on the "
                    "classes it lists, whoever labelled the pixels.",
}


def _provenance(labels: dict) -> list[str]:
    """Whether the labels may train a zero-shot model: which classes the labeler was trained on,
    and where each image's class list came from."""
    # A manifest written before the record has no class_lists: its card says nothing of them.
    lists = [_CLASS_LISTS[labels["class_lists"]]] if "class_lists" in labels else []
    return ["## Label provenance", "", _labelled_by(labels), *([""] + lists if lists else [])]


def _labelled_by(labels: dict) -> str:
    if labels.get("chosen_by"):
        return (f"Labelled by `{labels['labeler']}`, and which labels were kept was decided by their agreement with "
                f"`{labels['chosen_by']}`, a labeler that knows every class: not for zero-shot training on any of "
                f"them.")
    trained = [name for name, known in labels["trained"].items() if known]
    untrained = [name for name, known in labels["trained"].items() if not known]
    if labels["kind"] == "oracle":
        return (f"Labelled by an oracle (`{labels['labeler']}`) that was trained on every class it labels: "
                "not for zero-shot training on any of them (an upper bound only).")
    if labels["kind"] == "masks":
        return (f"Labelled by the source's own masks (`{labels['labeler']}`), annotations of every class: "
                "not for zero-shot training on any of them.")
    if labels["kind"] == "daam":
        return "Labelled by DAAM, which trains on no class: zero-shot for every class (a baseline)."
    split = "" if labels["trained_split"] is None else f" (the seen classes of split {labels['trained_split']})"
    return (f"Labelled by the grounding module `{labels['labeler']}`, which was trained on {len(trained)} of this "
            f"dataset's classes{split}, matched by the words that name them, not by their names: "
            f"{', '.join(trained) or 'none'}. Labels of the other classes ({', '.join(untrained) or 'none'}) come from a "
            "model that never saw them: zero-shot for a segmenter whose unseen classes are among them.")


def write_card(location: Location, manifest: dict) -> str:
    """Writes README.md (atomically) beside manifest.json; returns its URL."""
    schema = SCHEMA
    if manifest["files"]:  # the capture columns a build added
        with location.fs.open_input_file(location.path(manifest["files"][0]["path"])) as handle:
            schema = pq.read_schema(handle)
    preview = location.exists(PREVIEW_FILE)
    location.write_bytes(CARD_FILE, dataset_card(manifest, schema, preview=preview).encode())
    return location.url(CARD_FILE)
