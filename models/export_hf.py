"""Export a local Hugging Face checkpoint to ONNX (the optional `export` extra).

    pip install 'qcompile[export]'          # torch (CPU) + transformers
    python models/export_hf.py CHECKPOINT_DIR OUT.onnx [--dynamo] [--opset 17]

Encoders (BERT/MiniLM) are exported with inputs `input_ids`, `attention_mask` and
output `last_hidden_state`, dynamic batch and sequence axes, readable node names
(TorchScript exporter: `/encoder/layer.0/attention/self/query/MatMul`). The
compiler itself never imports torch; only this script does. No hub access: the
checkpoint must be a local folder (for all-MiniLM-L6-v2, `models/zoo.py fetch minilm`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


class ExportError(Exception):
    """One clear message: what is missing and how to get it."""


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ExportError(f"exporting needs the 'export' extra ({err.name} is not installed): "
                          "pip install 'qcompile[export]'  (on this machine: pip install torch==2.13.0 transformers)"
                          ) from None
    return torch, transformers


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = 17,
                   dynamo: bool = False, check: bool = True) -> Path:
    """Export a BERT-style encoder; returns the ONNX path. `check` compares with PyTorch."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").exists():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json)")
    torch, transformers = _import_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(str(checkpoint), local_files_only=True,
                                                   attn_implementation="eager")
    model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wrapped = Encoder(model).eval()
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                  opset_version=opset, dynamo=dynamo)
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=512)
        kwargs["dynamic_shapes"] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        axes = {0: "batch", 1: "sequence"}
        kwargs["dynamic_axes"] = {"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes}
    with torch.no_grad():
        torch.onnx.export(wrapped, (ids, mask), str(out), **kwargs)
    _strip_scope(out, "/inner/")
    if check:
        err = max_relative_error(wrapped, out)
        if err > 1e-4:
            raise ExportError(f"exported ONNX differs from PyTorch: max relative error {err:.2e} > 1e-4")
    return out


def _strip_scope(path: Path, prefix: str) -> None:
    """Drop the wrapper module's scope from node names: `/inner/encoder/...` -> `/encoder/...`,
    the names users know from the exporter and write in recipe scopes."""
    import onnx
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.name.startswith(prefix):
            node.name = "/" + node.name[len(prefix):]
    onnx.save(model, str(path))


def max_relative_error(module, onnx_path: Path, seed: int = 1) -> float:
    """Largest |onnx - torch| / max|torch| on fresh inputs of another shape."""
    import onnxruntime as ort
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0
    with torch.no_grad():
        ref = module(ids, mask).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--dynamo", action="store_true", help="torch.export-based exporter instead of TorchScript")
    args = ap.parse_args(argv)
    try:
        path = export_encoder(args.checkpoint, args.out, opset=args.opset, dynamo=args.dynamo)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
