"""The recipe a compile uses when the user names none (or `--recipe auto`), decided from the
model's structure, the target and whether calibration data was given — never from names.

The table is data: per target family and model family, the recipe that measured best here
with calibration data and the one that needs none (docs/benchmarks: MiniLM w8a8-smooth
18.5 dB vs w8a8 13.9; SmolLM2 w8a8-group +0.54 % perplexity, the best W8A8; CNNs: w8a8 is at
least as fast as onnxruntime's static QDQ on three of four wheel CNNs, ahead of it in fidelity
on all four's held-out data, and compiles in 1.2-1.4x its time; `w8a8-cnn` is more accurate on
PP-OCR det/rec and the YOLOX detector but slower on det/cls, worse on cls's unseen pages and
4-9x slower to compile, so it stays a recipe one names). A model that is already quantized
gets `prequantized`. The choice and its reason go to the terminal and report.json.
"""

from __future__ import annotations

AUTO = "auto"
# target family -> model family -> (with --calib, without)
AUTO_RECIPES = {
    "cpu": {"decoder": ("w8a8-group", "w8a8-group"), "encoder": ("w8a8-smooth", "w8a8-dynamic"),
            "cnn": ("w8a8", "w8a8"), "other": ("w8a8", "w8a8-dynamic")},
    # Ascend: static per-tensor int8 activations only (no per-group or dynamic): weight-only without data
    "ascend": {"decoder": ("w8a8-smooth", "w8a16"), "encoder": ("w8a8-smooth", "w8a16"),
               "cnn": ("w8a8", "w8a16"), "other": ("w8a8", "w8a16")},
}
_WHY = {"decoder": "a decoder (KV cache or causal-LM I/O)", "encoder": "a transformer encoder (attention + norms)",
        "cnn": "a CNN (mostly Conv layers)", "other": "a model of linear layers"}


def choose_recipe(model_path, target: str = "cpu", has_calibration: bool = True) -> tuple[str, str]:
    """(recipe name, why) for a compile without --recipe or with --recipe auto."""
    from qcompile.passes.adopt_qdq import quantized_layers

    from .model_io import load_model
    from .model_kind import model_family
    model = load_model(model_path)
    held = quantized_layers(model)
    if held:
        return "prequantized", (f"the model is already quantized ({len(held)} layers hold quantized weights, e.g. "
                                f"{next(iter(held))}): its own scales are lowered as they are")
    family = model_family(model)
    table = AUTO_RECIPES["ascend" if target.startswith("ascend") else "cpu"]
    with_data, without = table[family]
    name = with_data if has_calibration else without
    return name, f"auto: {_WHY[family]} for {target.split(':')[0]}" + ("" if has_calibration else ", no --calib")
