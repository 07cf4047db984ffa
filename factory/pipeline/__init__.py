"""The build: a recipe, its plan, the model stages (generate, label or annotate, a second
labeler's agreement, quality), the Ray Data pipeline that streams them into a dataset, and its cost."""

from factory.core.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "cost": ("estimate", "format_estimate"),
    "checks": ("BuildError",),
    "labelers": ("LABELERS", "Labeler"),
    "pipeline": ("prepare_build", "run_build"),
    "plan": ("Sample", "build_plan", "replan"),
    "recipe": ("Recipe", "load_recipe"),
    "stages": ("StageSpec", "model_stages"),
})
