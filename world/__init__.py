"""The mini world: a procedural world of coloured shapes small enough to learn on a CPU.

Every model of the mission is real and trained on it (a Stable Diffusion generator, a
Mask R-CNN oracle), so the whole chain can be run and measured end to end where no
weights can be downloaded. ``draw`` makes its images, ``benchmark`` its held-out "real"
set, ``generator`` and ``oracle`` train its models, ``evaluate`` measures them (bench/procedural.py
builds triplet sets of its drawings, featurized by the trained generator).
"""
