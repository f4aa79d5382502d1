"""The LLM benchmark's peers that are not onnxruntime.quantization: onnxruntime-genai's model
builder (+ its runtime) and llama.cpp (through llama-cpp-python, on the original GGUF).

Every heavy step runs in a fresh measured child (`child.py KIND SPEC`, `measure.run_measured`)
so wall time and peak RSS compare with qcompile's own rows; no function here raises, each
returns {"status": "ok"|"error", "error", "wall_s", "peak_rss_mb", ...}.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_CMAKE_ARGS = "-DGGML_NATIVE=ON"


def _cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else ``$QCOMPILE_CACHE``, else ``~/.cache/qcompile`` (as models/zoo.py)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QCOMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile"


def _tail(text: str, n: int = 25, chars: int = 3000) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])[-chars:]


# ------------------------------------------------------------ llama.cpp install
def llamacpp_install(cache_dir=None, *, timeout: float = 5400, base_python: str = sys.executable) -> dict:
    """llama-cpp-python built from its sdist into its own venv,
    ``<cache>/peers/llama_cpp_venv`` (the project venv stays clean); reused when its marker
    file says it was built and `import llama_cpp` still works. Never raises.

    Returns status, python (the venv's interpreter), reused, wall_s / peak_rss_mb of the build
    (pip, measured), cmake_args, version, and on failure the build log's tail in `error`."""
    from .measure import run_measured
    root = _cache_root(cache_dir) / "peers"
    venv = root / "llama_cpp_venv"
    python = venv / "bin" / "python"
    marker = venv / ".qcompile-llama-cpp.json"
    log = root / "llama_cpp_build.log"
    base = dict(python=str(python), venv=str(venv), version=LLAMA_CPP_VERSION, cmake_args=LLAMA_CPP_CMAKE_ARGS,
                log=str(log))
    try:
        if marker.is_file() and python.is_file():
            check = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True, timeout=120)
            if check.returncode == 0:
                info = json.loads(marker.read_text())
                return {**base, **info, "status": "ok", "error": None, "reused": True,
                        "import_version": check.stdout.strip()}
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if not python.is_file():
            r = subprocess.run([base_python, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                return {**base, "status": "error", "reused": False, "wall_s": time.perf_counter() - t,
                        "peak_rss_mb": None, "error": "python -m venv failed: " + _tail(r.stderr or r.stdout)}
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CPP_CMAKE_ARGS,
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        cmd = [str(python), "-m", "pip", "install", "--no-cache-dir", "--verbose",
               f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
        r = run_measured(cmd, timeout=timeout, env=env, log_path=log, mem_limit_mb=None)
        ok = not r["error"]
        if ok:
            check = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True, timeout=120)
            if check.returncode != 0:
                ok, r["error"] = False, "built, but `import llama_cpp` fails: " + _tail(check.stderr)
        info = dict(build_wall_s=r["wall_s"], build_peak_rss_mb=r["peak_rss_mb"], command=shlex.join(cmd),
                    cmake_args=LLAMA_CPP_CMAKE_ARGS, built=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if ok:
            marker.write_text(json.dumps(info, indent=1))
            return {**base, **info, "status": "ok", "error": None, "reused": False,
                    "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
        err = (r["error"] or "") + "\n--- build log tail:\n" + _tail(r["stderr"] + "\n" + r["stdout"], 40)
        return {**base, **info, "status": "error", "reused": False, "wall_s": r["wall_s"],
                "peak_rss_mb": r["peak_rss_mb"], "error": err[-4000:]}
    except Exception as exc:  # noqa: BLE001 - never raise: the bench records a failure row
        return {**base, "status": "error", "reused": False, "wall_s": None, "peak_rss_mb": None,
                "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"}


# ------------------------------------------------------------ onnxruntime-genai
GENAI_BUILDER = "onnxruntime_genai.models.builder"

# What the builder (onnxruntime-genai 0.18.0, models/builder.py, builders/base.py,
# quantization/quant_config.py) does by default for `-e cpu`, read from its source; the graph
# facts each build finds are in `notes["graph"]`.
GENAI_CPU_DEFAULTS = {
    "accuracy_level": "4 for -e cpu (and webgpu), 0 otherwise (quant_config.py: "
                      "extra_options.get('accuracy_level', 4 if ep in ('cpu','webgpu') else 0)): "
                      "MatMulNBits quantizes its activations to int8 per block (w4a8 compute)",
    "block_size": "32 unless `--extra_options block_size=N` (0.18 reads `block_size`; the "
                  "`int4_block_size` spelling is not read by 0.18 and silently leaves 32)",
    "weights": "symmetric int4 RTN (algo_config default: MatMulNBitsQuantizer with no algo config), "
               "op_types_to_quantize=('MatMul',) (+ 'Gather' when embeddings are shared)",
    "attention": "GroupQueryAttention (CPU fp32/int4) with RoPE fused into it (do_rotary=1, no "
                 "position_ids input), past/present KV share one buffer of max_length",
    "qkv": "packed: one MatMul/MatMulNBits for Q,K,V per layer (fuse_qkv defaults to true)",
    "embeddings": "shared_embeddings defaults to the config's tie_word_embeddings (true for "
                  "SmolLM2): int4 -> one GatherBlockQuantized table shared with the int4 lm_head "
                  "MatMulNBits; fp32 -> one float table for the Gather and the lm_head",
}


def _builder_cmd(python: str, source, out_dir, precision: str, block_size, cache_dir, extra_options=None) -> list[str]:
    cmd = [python, "-m", GENAI_BUILDER, "-i", str(source), "-o", str(out_dir), "-p", precision,
           "-e", "cpu", "-c", str(cache_dir)]
    extra = {**({"block_size": int(block_size)} if block_size is not None else {}), **(extra_options or {})}
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    return cmd


def genai_graph_notes(model_onnx) -> dict:
    """What a genai-built model.onnx holds: op-type counts, the MatMulNBits settings, the
    attention op, whether Q/K/V are packed, how embeddings and lm_head are stored."""
    import onnx
    m = onnx.load(str(model_onnx), load_external_data=False)
    ops: dict[str, int] = {}
    nbits: dict[str, set] = {"block_size": set(), "accuracy_level": set(), "bits": set()}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name in nbits:
                    nbits[a.name].add(int(a.i))
    by_name = {n.name: n for n in m.graph.node}
    embed = next((n for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                  and "embed" in n.name), None)
    head = next((n for n in m.graph.node if "lm_head" in n.name and n.op_type in ("MatMul", "MatMulNBits")), None)
    inits = {t.name for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}

    def weight_of(node):
        """The initializer a node's data/weight input comes from (through Transpose/Cast/Reshape)."""
        if node is None:
            return None
        for name in node.input:
            seen = 0
            while name and name not in inits and name in producer and seen < 4 and \
                    producer[name].op_type in ("Transpose", "Cast", "Reshape", "Identity"):
                name, seen = producer[name].input[0], seen + 1
            if name in inits:
                return name if seen == 0 else f"{name} via {seen} op(s)"
        return None
    embed_w, head_w = weight_of(embed), weight_of(head)
    gqa = next((n for n in m.graph.node if n.op_type == "GroupQueryAttention"), None)
    notes = dict(
        op_counts=dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        inputs=[i.name for i in m.graph.input][:4] + (["..."] if len(m.graph.input) > 4 else []),
        matmulnbits={k: sorted(v) for k, v in nbits.items()} if ops.get("MatMulNBits") else None,
        attention=gqa.op_type if gqa else next((o for o in ("MultiHeadAttention", "Attention") if o in ops), None),
        gqa_do_rotary=next((a.i for a in gqa.attribute if a.name == "do_rotary"), 0) if gqa else None,
        packed_qkv=any("qkv_proj" in name for name in by_name),
        embedding=f"{embed.op_type} ({embed_w})" if embed else None,
        lm_head=f"{head.op_type} ({head_w})" if head else None,
        tied_embedding_lm_head=bool(embed_w and head_w and embed_w.split(" via ")[0] == head_w.split(" via ")[0]),
    )
    return notes


def _dir_onnx_mb(out_dir: Path) -> float:
    return sum(p.stat().st_size for p in Path(out_dir).iterdir()
               if p.is_file() and (p.name.endswith(".onnx") or p.name.endswith(".onnx.data"))) / 1e6


def hf_checkpoint(gguf, ckpt_dir, *, python: str = sys.executable, timeout: float = 1800) -> dict:
    """A GGUF dequantized to an fp32 Hugging Face checkpoint folder (config, safetensors,
    tokenizer) with transformers (`gguf_file=`), in a measured child; reused when
    `ckpt_dir/config.json` exists. Why: genai's builder reads its config and tokenizer with
    AutoConfig/AutoTokenizer (a folder or a hub name) and its own GGUF loader takes the GGUF
    tensors' raw bytes (no dequantization of Q4_1 blocks), so a quantized GGUF is converted first.
    `python` needs torch + transformers + gguf (the project's `export` extra)."""
    from .measure import child_command, child_result, run_measured
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "config.json").is_file() and any(ckpt_dir.glob("*.safetensors")):
        return dict(status="ok", error=None, checkpoint=str(ckpt_dir), reused=True, wall_s=None, peak_rss_mb=None)
    r = run_measured(child_command(python, "llm_ckpt", dict(gguf=str(gguf), out=str(ckpt_dir))), timeout=timeout)
    rep = child_result(r["stdout"]) or {}
    err = rep.get("error") or r["error"]
    return dict(status="error" if err else "ok", error=err, checkpoint=str(ckpt_dir), reused=False,
                wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"], **{k: v for k, v in rep.items() if k != "error"})


def hf_checkpoint_in_child(spec: dict) -> dict:
    try:
        import torch
        import transformers
        gguf, out = Path(spec["gguf"]), Path(spec["out"])
        where = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tok = transformers.AutoTokenizer.from_pretrained(**where)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
        # transformers marks a GGUF-loaded model as quantized (its GGUF quantizer) and refuses to
        # save it, though the weights it holds are dequantized fp32: copy them, strictly, into a
        # plain model of the same config and check both give the same logits.
        cfg = transformers.AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                                   if k != "quantization_config"})
        model = type(loaded)(cfg).to(torch.float32).eval()
        model.load_state_dict(loaded.state_dict(), strict=True)
        ids = torch.tensor([[1, 504, 3458, 282, 260, 1028, 30, 378]])
        with torch.no_grad():
            a, b = loaded(ids).logits, model(ids).logits
        diff = float((a - b).abs().max() / a.abs().max())
        if diff > 1e-6:
            raise RuntimeError(f"the re-built model differs from the GGUF-loaded one (max rel. {diff:.2e})")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        return dict(architecture=cfg.architectures, tie_word_embeddings=bool(cfg.tie_word_embeddings),
                    bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, max_rel_diff=diff,
                    transformers=transformers.__version__, torch=torch.__version__)
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc()
        return dict(error=f"{type(exc).__name__}: {exc}"[:800])


def genai_build(source, out_dir, *, precision: str, block_size: int | None = None, python: str = sys.executable,
                timeout: float = 3600, checkpoint_dir=None, extra_options: dict | None = None) -> dict:
    """onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder ... -e cpu`),
    measured as one child. `source`: a Hugging Face checkpoint folder, or a GGUF file, which is
    first dequantized to one (`hf_checkpoint`, into `checkpoint_dir`, default
    `<out_dir>.hfckpt`; see there why; its time is `convert`, not part of wall_s).
    `precision`: fp32 | int4 (| int8 | fp16 ...); `block_size`: the MatMulNBits block (builder
    default 32); `extra_options`: more builder `--extra_options` KEY=VALUE (e.g. accuracy_level=1;
    0.18 ignores unknown keys, such as the old `int4_block_size`, silently). Never raises. Returns status, error, wall_s, peak_rss_mb, out (the builder's
    folder), model (its model.onnx), size_mb (all .onnx + .onnx.data), command, notes."""
    import tempfile
    from .measure import run_measured
    out_dir = Path(out_dir)
    res = dict(status="error", error=None, wall_s=None, peak_rss_mb=None, out=str(out_dir), model=None,
               size_mb=None, precision=precision, block_size=block_size, extra_options=extra_options or {},
               command=None, convert=None, notes=None)
    try:
        src = Path(source)
        if not src.exists():
            res["error"] = f"source not found: {src} (a Hugging Face checkpoint folder or a .gguf)"
            return res
        if src.is_file() and src.suffix == ".gguf":
            ckpt = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + ".hfckpt")
            conv = hf_checkpoint(src, ckpt, python=python)
            res["convert"] = conv
            if conv["status"] != "ok":
                res["error"] = "GGUF -> HF checkpoint failed: " + str(conv["error"])
                return res
            src = ckpt
        if out_dir.exists():
            import shutil
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="qc-genai-") as cache:
            cmd = _builder_cmd(python, src, out_dir, precision, block_size, cache, extra_options)
            res["command"] = shlex.join(cmd).replace(cache, "TMP_CACHE")
            r = run_measured(cmd, timeout=timeout, log_path=out_dir.parent / f"{out_dir.name}.build.log",
                             env=dict(os.environ, TMPDIR=cache, HF_HUB_OFFLINE="1"))
        res.update(wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"], log=str(out_dir.parent / f"{out_dir.name}.build.log"))
        model = out_dir / "model.onnx"
        if r["error"] or not model.is_file():
            res["error"] = r["error"] or "the builder wrote no model.onnx"
            return res
        notes = dict(builder_defaults_cpu=GENAI_CPU_DEFAULTS, graph=genai_graph_notes(model))
        try:
            gcfg = json.loads((out_dir / "genai_config.json").read_text())
            dec = gcfg["model"]["decoder"]
            notes["genai_config"] = dict(session_options=dec.get("session_options"), inputs=dec.get("inputs"),
                                         context_length=gcfg["model"].get("context_length"),
                                         search=gcfg.get("search"))
        except (OSError, KeyError, ValueError) as exc:
            notes["genai_config"] = f"unreadable: {exc}"
        res.update(status="ok", model=str(model), size_mb=_dir_onnx_mb(out_dir), notes=notes)
        return res
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
        return res


# ------------------------------------------------------------ perplexity, decode speed
EVAL_KINDS = ("genai", "llamacpp", "onnx")
DECODE_KINDS = ("genai", "llamacpp", "onnx")


def _python_for(kind: str, python) -> tuple[str | None, str | None]:
    """(interpreter, error): llama.cpp's kinds run in its own venv (llamacpp_install)."""
    if python:
        return str(python), None
    if kind == "llamacpp":
        inst = llamacpp_install()
        return (inst["python"], None) if inst["status"] == "ok" else (None, "llama.cpp not installed: " + str(inst["error"]))
    return sys.executable, None


def _lm_metrics_file() -> str | None:
    """compiler/lm_metrics.py (the `qcompile.lm_metrics` module), for children whose venv lacks qcompile."""
    try:
        import qcompile.lm_metrics as lm
        return lm.__file__
    except ImportError:
        p = Path(__file__).resolve().parents[2] / "compiler" / "lm_metrics.py"
        return str(p) if p.is_file() else None


def _run_child(kind: str, spec: dict, python: str, timeout: float, log_path=None) -> dict:
    from .measure import child_command, child_result, run_measured
    r = run_measured(child_command(python, kind, spec), timeout=timeout, log_path=log_path)
    rep = child_result(r["stdout"]) or {}
    err = rep.pop("error", None) or r["error"]
    return dict(status="error" if err else "ok", error=err, wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"], **rep)


def lm_eval(kind: str, model, windows_npz, *, reference_argmax=None, threads: int = 2, python=None,
            argmax_out=None, timeout: float = 3600) -> dict:
    """Perplexity of `model` over the windows of `windows_npz` (`input_ids` [n, seq]; every row
    an independent window from position 0, no BOS added), in a measured child.

    kind: `genai` (a genai-built folder, run through og.Generator: append_tokens(window) then
    get_output("logits"), all positions), `llamacpp` (a GGUF: Llama(n_ctx=512, logits_all=True),
    each window evaluated from a reset state), `onnx` (a qcompile-layout ONNX in onnxruntime: the
    reference). Scores positions 1..seq-1 with `qcompile.lm_metrics.token_nll` (logits at t
    predict token t+1). With `reference_argmax` (.npy [n, seq-1] int64) also top1_agreement;
    `argmax_out` writes this model's argmax [n, seq-1] there. `threads` intra-op threads.
    Returns status, error, wall_s, peak_rss_mb, perplexity, tokens, nll_sum, top1_agreement,
    window_nll (per window mean), other_cpu (share of the box others took). Never raises."""
    if kind not in EVAL_KINDS:
        return dict(status="error", error=f"unknown kind {kind!r} (one of {EVAL_KINDS})", wall_s=None, peak_rss_mb=None)
    py, err = _python_for(kind, python)
    if err:
        return dict(status="error", error=err, wall_s=None, peak_rss_mb=None, kind=kind)
    spec = dict(kind=kind, model=str(model), windows=str(windows_npz), threads=int(threads),
                reference_argmax=str(reference_argmax) if reference_argmax else None,
                argmax_out=str(argmax_out) if argmax_out else None, lm_metrics=_lm_metrics_file())
    try:
        return {"kind": kind, "model": str(model), **_run_child("llm_eval", spec, py, timeout)}
    except Exception as exc:  # noqa: BLE001
        return dict(status="error", error=f"{type(exc).__name__}: {exc}", wall_s=None, peak_rss_mb=None, kind=kind)


def decode_tps(kind: str, model, prompt_ids, *, steps: int = 64, threads: int = 2, python=None, rounds: int = 3,
               timeout: float = 1800) -> dict:
    """Greedy decode speed in a measured child: after the prompt's prefill and the first token
    (taken from the prefill's logits; both untimed), `steps` timed steps, each one one-token
    forward + greedy pick, EOS ignored; best of `rounds` fresh generators in one process.
    genai: og.Generator (do_sample False, min_length = max_length = prompt + 1 + steps) and its
    generate_next_token loop; llamacpp: Llama(n_ctx=512, logits_all=False) eval([token]) +
    Llama.sample(temp=0) (llama.cpp's greedy sampler). Returns tok_s (= steps / best time),
    round_s, generated_ids (the best round's tokens, first one included), other_cpu, ... Never raises."""
    if kind not in DECODE_KINDS:
        return dict(status="error", error=f"unknown kind {kind!r} (one of {DECODE_KINDS})", wall_s=None, peak_rss_mb=None)
    py, err = _python_for(kind, python)
    if err:
        return dict(status="error", error=err, wall_s=None, peak_rss_mb=None, kind=kind)
    spec = dict(kind=kind, model=str(model), prompt=[int(t) for t in prompt_ids], steps=int(steps),
                threads=int(threads), rounds=int(rounds))
    try:
        return {"kind": kind, "model": str(model), **_run_child("llm_decode", spec, py, timeout)}
    except Exception as exc:  # noqa: BLE001
        return dict(status="error", error=f"{type(exc).__name__}: {exc}", wall_s=None, peak_rss_mb=None, kind=kind)


# ------------------------------------------------------------ in the children
def _load_token_nll(path: str | None):
    try:
        from qcompile.lm_metrics import token_nll
        return token_nll
    except ImportError:
        import importlib.util
        if not path:
            raise
        spec = importlib.util.spec_from_file_location("qcompile.lm_metrics", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod         # its dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod.token_nll


def _genai_model(model_dir: str, threads: int):
    import onnxruntime_genai as og
    cfg = og.Config(model_dir)
    cfg.clear_providers()           # CPU
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og, og.Model(cfg)


class _GenaiScorer:
    """All positions' logits of a window: og.Generator.append_tokens, then get_output('logits')."""

    def __init__(self, model_dir: str, threads: int):
        self.og, self.model = _genai_model(model_dir, threads)

    def __call__(self, ids):
        import numpy as np
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.asarray(ids, np.int32)[None])
        logits = np.asarray(gen.get_output("logits"))
        del gen
        if logits.ndim != 3 or logits.shape[1] != len(ids):
            raise RuntimeError(f"genai get_output('logits') has shape {logits.shape}, not [1, {len(ids)}, vocab]")
        return logits[0]


class _LlamaScorer:
    def __init__(self, gguf: str, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=True, verbose=False)

    def __call__(self, ids):
        import numpy as np
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32, copy=True)


def _register_generated_kernels(so, model_path: str) -> None:
    """A compiled model's generated-kernel library (OUT/kernels/), registered as a user would."""
    from .evaluate import generated_library
    library = generated_library(model_path)
    if library is not None:
        so.register_custom_ops_library(str(library))


class _OrtScorer:
    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        _register_generated_kernels(so, path)
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}

    def __call__(self, ids, extra=None):
        import numpy as np
        seq = len(ids)
        feeds = {}
        for name, inp in self.inputs.items():
            if name == "input_ids":
                feeds[name] = np.asarray(ids, np.int64)[None]
            elif name == "attention_mask":
                feeds[name] = np.ones((1, seq), np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(seq, dtype=np.int64)[None]
            elif name.startswith("past"):   # an int8 KV cache (kv_cache pass) takes int8 past tensors
                dtype = np.int8 if inp.type == "tensor(int8)" else np.float32
                feeds[name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype)
            else:
                raise RuntimeError(f"input {name!r} is not one a text window fills")
        return self.sess.run(["logits"], feeds)[0][0]


def lm_eval_in_child(spec: dict) -> dict:
    import math

    import numpy as np

    from .measure import CpuWatch, vm_hwm_mb
    try:
        token_nll = _load_token_nll(spec.get("lm_metrics"))
        with np.load(spec["windows"]) as z:
            ids = np.asarray(z["input_ids"], np.int64)
        ref = np.load(spec["reference_argmax"]) if spec.get("reference_argmax") else None
        if ref is not None and ref.shape != (ids.shape[0], ids.shape[1] - 1):
            raise ValueError(f"reference_argmax {ref.shape} does not match windows {ids.shape}")
        t = time.perf_counter()
        kind = spec["kind"]
        scorer = {"genai": _GenaiScorer, "llamacpp": _LlamaScorer, "onnx": _OrtScorer}[kind](spec["model"], spec["threads"])
        load_s = time.perf_counter() - t
        nll_sum, tokens, agree, window_nll = 0.0, 0, 0, []
        argmax = np.zeros((ids.shape[0], ids.shape[1] - 1), np.int64)
        t = time.perf_counter()
        with CpuWatch() as watch:
            for i, row in enumerate(ids):
                logits = scorer(row)
                nll, valid = token_nll(logits[None], row[None], None)
                s, n = float(nll[valid].sum()), int(valid.sum())
                nll_sum, tokens = nll_sum + s, tokens + n
                window_nll.append(s / n)
                argmax[i] = logits[:-1].argmax(-1)
                if ref is not None:
                    agree += int((argmax[i] == ref[i])[valid[0]].sum())
        if spec.get("argmax_out"):
            np.save(spec["argmax_out"], argmax)
        return dict(perplexity=math.exp(nll_sum / tokens), tokens=tokens, nll_sum=nll_sum,
                    top1_agreement=agree / tokens if ref is not None else None, windows=int(ids.shape[0]),
                    window_nll=[round(v, 5) for v in window_nll], load_s=load_s, eval_s=time.perf_counter() - t,
                    other_cpu=watch.other_frac, maxrss_mb=vm_hwm_mb(), argmax_out=spec.get("argmax_out"))
    except BaseException as exc:  # noqa: BLE001 - report, do not hide
        traceback.print_exc()
        return dict(error=f"{type(exc).__name__}: {exc}"[:800])


def decode_in_child(spec: dict) -> dict:
    import numpy as np

    from .measure import CpuWatch, vm_hwm_mb
    try:
        prompt, steps, threads = list(spec["prompt"]), spec["steps"], spec["threads"]
        times, seqs = [], []
        t = time.perf_counter()
        if spec["kind"] == "genai":
            og, model = _genai_model(spec["model"], threads)
            how = "og.Generator: append_tokens(prompt) + generate_next_token() untimed, then `steps` timed generate_next_token()"
        elif spec["kind"] == "onnx":
            import onnxruntime as ort

            from .latency import _Decoder
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            _register_generated_kernels(so, spec["model"])
            sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
            how = ("onnxruntime session: prefill (past length 0) untimed, then `steps` timed one-token runs feeding "
                   "present.* back as past_key_values.*, greedy")
        else:
            from llama_cpp import Llama
            llm = Llama(model_path=spec["model"], n_ctx=512, n_threads=threads, n_threads_batch=threads,
                        logits_all=False, verbose=False)
            how = "Llama: reset(); eval(prompt); sample(temp=0) untimed, then `steps` timed eval([token]); sample(temp=0)"
        load_s = time.perf_counter() - t
        with CpuWatch() as watch:
            for _ in range(spec["rounds"]):
                if spec["kind"] == "onnx":
                    dec = _Decoder(sess, np.asarray(prompt, np.int64)[None])
                    dec.prefill()
                    out = [int(dec.outs["logits"][0, -1].argmax())]
                    t = time.perf_counter()
                    for _ in range(steps):
                        dec.step()
                        out.append(int(dec.outs["logits"][0, -1].argmax()))
                    dt = time.perf_counter() - t
                elif spec["kind"] == "genai":
                    total = len(prompt) + 1 + steps
                    params = og.GeneratorParams(model)
                    params.set_search_options(do_sample=False, max_length=total, min_length=total)
                    gen = og.Generator(model, params)
                    gen.append_tokens(np.asarray(prompt, np.int32)[None])     # prefill
                    gen.generate_next_token()                                  # token 1: the prefill's logits
                    t = time.perf_counter()
                    for _ in range(steps):
                        gen.generate_next_token()
                    dt = time.perf_counter() - t
                    out = [int(x) for x in gen.get_sequence(0)][len(prompt):]
                    if not gen.is_done() or len(out) != steps + 1:
                        raise RuntimeError(f"genai generated {len(out)} tokens, expected {steps + 1}")
                    del gen
                else:
                    llm.reset()
                    llm.eval(prompt)                                           # prefill
                    tok = llm.sample(temp=0.0, repeat_penalty=1.0)            # token 1: the prefill's logits
                    out = [int(tok)]
                    t = time.perf_counter()
                    for _ in range(steps):
                        llm.eval([tok])
                        tok = llm.sample(temp=0.0, repeat_penalty=1.0)
                        out.append(int(tok))
                    dt = time.perf_counter() - t
                times.append(dt)
                seqs.append(out)
        best = int(np.argmin(times))
        return dict(tok_s=steps / times[best], step_ms=1e3 * times[best] / steps, round_s=times, steps=steps,
                    prompt_len=len(prompt), generated_ids=seqs[best], same_tokens_every_round=all(s == seqs[0] for s in seqs),
                    how=how, load_s=load_s, other_cpu=watch.other_frac, maxrss_mb=vm_hwm_mb())
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc()
        return dict(error=f"{type(exc).__name__}: {exc}"[:800])
