"""Behaviour fingerprint: what every built-in recipe compiles to, as hashes and numbers.

Why: a change to how the compiler is organised (not to what it computes) must leave its
outputs byte-identical. This compiles every built-in recipe for `cpu` and `ascend310b` on
the seeded builder models (small_cnn, bert_block, llama_block) and, with `--real`, on
PP-OCRv4 det and MiniLM, and records per compile the SHA-256 of every file in OUT/ except
report.json and report.html (which carry timings), the exit code and the first line of an error, and the
verification numbers. `--compare OLD.json` prints every difference against an earlier run
and exits 1 if there is one.

    python tools/fingerprint.py --out build/fingerprint.json [--real] [--compare OLD.json]

The cpu target is pinned to one ISA variant (`--cpu-variant`, default avx512_vnni) so two
runs on different hosts compare the same compile. The run re-executes itself with
PYTHONHASHSEED=0: onnxruntime's symbolic shape inference (run by `fuse`) names merged symbolic
dimensions in an order that follows Python's string hashing, so w8a8-fa3 graphs differ in their
`unk__N` dim names from one interpreter to the next (the same commit, seeds 0 and 1, 2026-12-02).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUILDERS = ("small_cnn", "bert_block", "llama_block")
_SKIP = {"report.json", "report.html"}


_RULE_TAG = "pkg.onnxscript.rewriter.rule_name"


def _files(out: Path) -> dict[str, str]:
    """SHA-256 per file; for each .onnx also `NAME#no-rule-names`, the hash without the node
    metadata in which onnxscript's rewriter names the rule that built a node (a renamed or
    merged rule changes only that)."""
    if not out.is_dir():
        return {}
    found = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name in _SKIP:
            continue
        name = str(p.relative_to(out))
        found[name] = _sha(p)
        if p.suffix == ".onnx":
            found[f"{name}#no-rule-names"] = _sha_without_rule_names(p)
    return found


def _sha_without_rule_names(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != _RULE_TAG]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _sha(path: Path) -> str:
    """SHA-256 of the file; for the resolved recipe with its `source:` path cut to the file name
    (a checkout elsewhere, or an installed copy, resolves the built-in recipes to other folders)."""
    data = path.read_bytes()
    if path.name == "recipe.resolved.yaml":
        data = re.sub(rb"(\n  source: )[^\n]*/([^/\n]+)\n", rb"\1\2\n", data)
    return hashlib.sha256(data).hexdigest()


def _numbers(out: Path) -> dict:
    """Verification outputs and per-layer statuses from report.json (what a user reads)."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    ver = report.get("verification") or {}
    layers = report.get("layers") or {}
    return {"outputs": ver.get("outputs"), "checked": ver.get("checked"),
            "layers": {k: {f: v.get(f) for f in ("status", "scheme", "reason", "kernel", "lowered_to")
                           if v.get(f) is not None} for k, v in sorted(layers.items())},
            "layer_errors": {k: (v.get("error") or {}).get("added_sqnr_db") for k, v in sorted(layers.items())
                             if v.get("error")}}


def compile_one(model: Path, args: list[str], out: Path) -> dict:
    from qcompile.cli import main as cli_main

    err = io.StringIO()
    started = time.perf_counter()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = cli_main([str(model), *args, "-o", str(out), "-q"])
    message = " ".join(err.getvalue().split())[:300] if code else ""
    return {"exit": code, "error": message, "files": _files(out), **_numbers(out),
            "seconds": round(time.perf_counter() - started, 1)}


def builder_cases(work: Path, cpu: str) -> list[tuple[str, Path, list[str]]]:
    from models import bert_block, llama_block, small_cnn
    from qcompile.recipe import builtin_recipes

    cases = []
    for name, module in (("small_cnn", small_cnn), ("bert_block", bert_block), ("llama_block", llama_block)):
        files = module.write(work / name)
        data = ["--calib", str(files["calib"]), "--verify-data", str(files["eval"]), "--verify-samples", "8"]
        for recipe in sorted(builtin_recipes()):
            for target in (cpu, "ascend310b"):
                cases.append((f"{name}/{recipe}/{target}", files["model"], ["--target", target, "--recipe", recipe,
                                                                             *data]))
    return cases


def real_cases(cpu: str) -> list[tuple[str, Path, list[str]]]:
    sys.path.insert(0, str(ROOT / "tools"))
    from sibling import load

    zoo = load("qc_zoo", ROOT / "models" / "zoo.py")
    ppd = load("qc_ppocr_data", ROOT / "tools" / "ppocr_data.py")
    from qcompile.recipe import builtin_recipes

    det = zoo.fetch("ppocr_det")
    sets = ppd.make_sets("ppocr_det", zoo.cache_root() / "data")
    shape = ["--input-shape", "x:1,3,640,640"]
    data = ["--calib", str(sets["calib"]), "--verify-data", str(sets["eval"]), "--verify-samples", "16"]
    cases = [(f"ppocr_det/{r}/{cpu}", det, ["--target", cpu, "--recipe", r, *shape, *data])
             for r in sorted(builtin_recipes())]
    cases += [(f"ppocr_det/{r}/ascend310b", det, ["--target", "ascend310b", "--recipe", r, *shape, *data])
              for r in ("w8a8", "w8a8-cnn", "w8a16")]
    try:
        from benchlib.setups import export_minilm
        minilm_data = load("qc_minilm_data", ROOT / "tools" / "minilm_data.py")
        ckpt = zoo.fetch("minilm")
        model = export_minilm(ckpt, sys.executable)
        msets = minilm_data.make_sets(ckpt, zoo.cache_root() / "data", n_calib=64, n_eval=200, seq=64)
        mdata = ["--calib", str(msets["calib"]), "--verify-data", str(msets["eval"]), "--verify-samples", "64"]
        for r in ("w8a8", "w8a8-smooth", "w8a8-fa3", "w4a16-gptq"):
            cases.append((f"minilm/{r}/{cpu}", model, ["--target", cpu, "--recipe", r, *mdata]))
        cases.append(("minilm/w8a8-smooth/ascend310b", model, ["--target", "ascend310b", "--recipe", "w8a8-smooth",
                                                               *mdata]))
    except Exception as exc:  # noqa: BLE001 - no torch / no export: say so, fingerprint the rest
        print(f"minilm skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    return cases


def _normalized(entry: dict) -> dict:
    """Error messages name the recipe file: compare them by file name, wherever it is installed."""
    return {**entry, "error": re.sub(r"\S*/recipes/", "recipes/", entry.get("error") or "")}


def compare(old: dict, new: dict) -> list[str]:
    diffs = []
    old = {k: _normalized(v) for k, v in old.items()}
    new = {k: _normalized(v) for k, v in new.items()}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            diffs.append(f"{key}: only in {'new' if a is None else 'old'}")
            continue
        ea, eb = a.get("error") or "", b.get("error") or ""
        if not (ea.startswith(eb) or eb.startswith(ea)):  # messages are cut at 300 characters
            diffs.append(f"{key}: error: {ea!r} -> {eb!r}")
        for field in ("exit", "files", "outputs", "checked", "layers", "layer_errors"):
            if a.get(field) != b.get(field):
                if field == "files":
                    names = sorted(n for n in set(a["files"]) | set(b["files"])
                                   if "#" not in n or (n in a["files"] and n in b["files"]))  # older runs lack '#'
                    changed = [n for n in names if a["files"].get(n) != b["files"].get(n)]
                    plain = [n for n in changed if "#" not in n]
                    rules_only = [n for n in plain if f"{n}#no-rule-names" in a["files"]
                                  and f"{n}#no-rule-names" not in changed]
                    if plain and rules_only == plain:
                        diffs.append(f"{key}: {plain} differ only in the rewriter's rule-name node metadata")
                    elif plain or [n for n in changed if f"{n.split('#')[0]}" in a["files"]]:
                        diffs.append(f"{key}: files differ: {changed}")
                elif field == "layers":
                    names = sorted(set(a["layers"] or {}) | set(b["layers"] or {}))
                    changed = [f"{n}: {(a['layers'] or {}).get(n)} -> {(b['layers'] or {}).get(n)}" for n in names
                               if (a["layers"] or {}).get(n) != (b["layers"] or {}).get(n)]
                    diffs.append(f"{key}: layers differ: {changed[:3]}")
                else:
                    diffs.append(f"{key}: {field}: {a.get(field)!r} -> {b.get(field)!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":  # see the module docstring
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="write the fingerprint JSON here")
    ap.add_argument("--real", action="store_true", help="also PP-OCRv4 det and MiniLM (minutes)")
    ap.add_argument("--only-real", action="store_true", help="PP-OCRv4 det and MiniLM only")
    ap.add_argument("--cpu-variant", default="avx512_vnni")
    ap.add_argument("--match", default="", help="only cases whose key contains this")
    ap.add_argument("--compare", help="an earlier fingerprint JSON: print the differences, exit 1 on any")
    args = ap.parse_args(argv)
    cpu = f"cpu:{args.cpu_variant}"
    result = {}
    with tempfile.TemporaryDirectory(prefix="qc-fingerprint-") as tmp:
        work = Path(tmp)
        cases = [] if args.only_real else builder_cases(work, cpu)
        if args.real or args.only_real:
            cases += real_cases(cpu)
        cases = [c for c in cases if args.match in c[0]]
        for i, (key, model, cli_args) in enumerate(cases):
            result[key] = compile_one(model, cli_args, work / "out" / f"{i:03d}")
            r = result[key]
            print(f"[{i + 1}/{len(cases)}] {key}: exit {r['exit']} {r['seconds']} s {r['error'][:80]}",
                  file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        if args.match:
            old = {k: v for k, v in old.items() if args.match in k}
        if not (args.real or args.only_real):
            old = {k: v for k, v in old.items() if k.split("/")[0] in BUILDERS}
        if args.only_real:
            old = {k: v for k, v in old.items() if k.split("/")[0] not in BUILDERS}
        diffs = compare(old, result)
        for d in diffs:
            print(d)
        print(f"{len(diffs)} difference(s) in {len(result)} compiles")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
