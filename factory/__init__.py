"""dataset-factory: synthetic semantic-segmentation datasets made with text-to-image diffusion, on Ray.

Layers, each importing only those before it (tests/test_layers.py checks):

    factory.core       shared base: storage, typed options, errors, vocabularies, pairs,
                       checkpoints, devices, model start-up, Ray plumbing
    factory.diffusion  Stable Diffusion internals: pipelines, U-Net feature capture, token
                       positions, DAAM, CLIP quality       (imports core)
    factory.dataset    the dataset format and its consumers: layout, schema, the stage batch,
                       codecs, writing, reading, card, preview, export, inspection, verification
                                                           (imports core)
    factory.detection  detectors built in code: Mask R-CNN, its weights, exact mask pasting
                                                           (imports core)
    grounding, segmenter, world
                       the two methods, and the mini world: drawings, its drawn benchmark, the
                       training of its generator and oracle
                                                           (import core, diffusion, dataset, detection)
    factory.pipeline   recipe, plan, model stages, the Ray pipeline, cost (imports all above)
    jobs, bench        entry points                        (import anything)
"""
