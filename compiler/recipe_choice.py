"""The recipe a compile uses when the user names none, decided from the model itself.

Today: a model that is already quantized (Q/DQ on its weights, or onnxruntime's integer ops)
gets `prequantized` — its own scales lowered as they are, never quantized twice — and any
other model the default `w8a8`. The choice and its reason go to the terminal and report.json.
"""

from __future__ import annotations

DEFAULT_RECIPE = "w8a8"


def choose_recipe(model_path) -> tuple[str, str]:
    """(recipe name, why) for a compile without --recipe."""
    from qcompile.passes.adopt_qdq import quantized_layers

    from .model_io import load_model
    held = quantized_layers(load_model(model_path))
    if held:
        return "prequantized", (f"the model is already quantized ({len(held)} layers hold quantized weights, e.g. "
                                f"{next(iter(held))}): its own scales are lowered as they are")
    return DEFAULT_RECIPE, "the default recipe (no --recipe given)"
