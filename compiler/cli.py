"""The `qcompile` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import (EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, ModelError,
                     QCompileError, Terminated, UsageError)

SUBCOMMANDS = ("inspect", "targets", "recipes", "passes", "verify")

EPILOG = """examples:
  qcompile model.onnx --target cpu --recipe w8a8 --calib calib.npz -o out/
  qcompile det.onnx --target cpu --input-shape x:1,3,640,640 --calib imgs/ --verify-data eval.npz -o out/
  qcompile model.onnx --target cpu --recipe my_recipe.yaml --dump-after quantize -o out/
  qcompile verify original.onnx out/model.onnx --data eval.npz
  qcompile inspect model.onnx --target ascend310b --input-shape x:1,3,640,640
  qcompile targets | recipes | passes

outputs (every target): OUT/model.onnx (+ model.onnx.data when external),
  OUT/report.json, OUT/report.html, OUT/recipe.resolved.yaml

exit codes:
""" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def _compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile", description="Compile an ONNX model for quantized deployment.",
                                epilog=EPILOG + "\n\nsubcommands: " + ", ".join(SUBCOMMANDS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"qcompile {__version__}")
    p.add_argument("model", help="input ONNX model (external data next to it)")
    p.add_argument("--target", default="cpu", help="target, e.g. cpu or cpu:avx2 (see `qcompile targets`)")
    p.add_argument("--recipe", help="built-in recipe name, a .yaml path, or auto (the default: chosen from the model's "
                                    "structure and the target; see `qcompile recipes`)")
    p.add_argument("--calib", help="calibration data: .npz (one array per input, batch on axis 0) or a folder")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D,D,...",
                   help="pin a dynamic input shape (repeatable)")
    p.add_argument("-o", "--output", default="out", help="output directory (default ./out)")
    p.add_argument("--verify-data", help="held-out data for verification (default: the calibration data)")
    p.add_argument("--verify-samples", type=int, default=64, help="samples used by verification (default 64)")
    p.add_argument("--no-verify", action="store_true", help="skip verification")
    p.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="save the graph after PASS into OUT/dumps/ (repeatable; 'all' for every pass)")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in OUT/model.onnx.data (automatic for models over 2 GB)")
    p.add_argument("--max-loss", metavar="METRIC>=VALUE",
                   help="accuracy budget, e.g. cosine>=0.995 or sqnr>=30: fall back the noisiest layers to float "
                        "(and try other calibration methods) until it holds; the best model found is written")
    p.add_argument("--max-trials", type=int, default=8, help="compiles the --max-loss search may run (default 8)")
    p.add_argument("--max-size", type=float, metavar="MB",
                   help="mixed precision: choose per layer between the two --mix-schemes (or float) to keep the "
                        "measured error lowest with the quantized weights within MB megabytes")
    p.add_argument("--mix-schemes", default="w4a16,w8a16", metavar="LOW,HIGH",
                   help="the two schemes --max-size chooses between (default w4a16,w8a16)")
    p.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE", dest="settings",
                   help="override one recipe key, e.g. --set quantize.weight.group_size=128 (repeatable; checked "
                        "like the recipe; lands in recipe.resolved.yaml)")
    p.add_argument("--custom-ops", action="append", default=[], metavar="LIB.so",
                   help="onnxruntime custom-op library for ops of the model onnxruntime lacks, registered in every "
                        "session the compile opens (repeatable)")
    p.add_argument("--max-memory", metavar="GB",
                   help="keep the compile's memory under GB: activations are streamed block by block, rewritten "
                        "weights spilled to disk (for models larger than memory)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="compute calibration statistics (ranges, GPTQ Hessians, SmoothQuant/AWQ statistics) in N "
                        "processes, each streaming every Nth batch; under --max-memory each gets 1/N of the bound "
                        "(default 1; with --ray, one task per CPU of the cluster)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run those statistics as tasks on the Ray cluster at ADDRESS (HOST:PORT, ray://HOST:PORT), "
                        "or 'auto' for a local one (pip install 'qcompile[ray]')")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or table")
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    return p


def _cmd_compile(argv: list[str]) -> int:
    args = _compile_parser().parse_args(argv)
    if args.verify_samples < 1:
        raise UsageError(f"--verify-samples must be at least 1, got {args.verify_samples}")
    if not os.path.exists(args.model):  # before loading onnx & co.: a typo answers at once
        raise ModelError(f"model file not found: {args.model}")
    from .driver import compile_model, compile_with_budget, compile_with_size_budget
    from .memory_plan import parse_max_memory
    from .model_io import parse_input_shapes
    from .sharding import Sharding
    from .report import print_summary

    common = dict(target=args.target, calib=args.calib, input_shapes=parse_input_shapes(args.input_shape),
                  verify=not args.no_verify, verify_data=args.verify_data, verify_samples=args.verify_samples,
                  dump_after=tuple(args.dump_after), progress=not args.quiet,
                  external_data=True if args.external_data else None, custom_ops=tuple(args.custom_ops),
                  settings=tuple(args.settings), max_memory=parse_max_memory(args.max_memory),
                  sharding=Sharding(args.workers if args.workers is not None else (0 if args.ray else 1), args.ray))
    if args.max_size is not None:
        if args.max_loss is not None:
            raise UsageError("--max-size and --max-loss are separate searches; use one")
        low, _, high = args.mix_schemes.partition(",")
        if not low or not high:
            raise UsageError(f"--mix-schemes {args.mix_schemes!r} is not LOW,HIGH", hint="e.g. w4a16,w8a16")
        result = compile_with_size_budget(args.model, max_size_mb=args.max_size, low=low.strip(), high=high.strip(),
                                          output_dir=args.output, **common)
    elif args.max_loss is not None:
        from .budget import parse_budget
        result = compile_with_budget(args.model, budget=parse_budget(args.max_loss), max_trials=args.max_trials,
                                     output_dir=args.output, recipe=args.recipe, **common)
    else:
        result = compile_model(args.model, recipe=args.recipe, output_dir=args.output, **common)
    if not args.quiet:
        print_summary(result.report)
        Console().print(f"wrote {', '.join(str(f) for f in result.files)}")
    return 0


def _cmd_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qcompile inspect",
                                description="What a compile would find and do with a model, before any calibration: "
                                            "inputs and dynamic dims, opset, external data, ops onnxruntime lacks, "
                                            "and per layer its MACs and what the target would do with it.")
    p.add_argument("model")
    p.add_argument("--target", default="cpu")
    p.add_argument("--recipe", help="as for a compile (default: chosen from the model)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D,D,...")
    p.add_argument("--json", help="also write the inspection as JSON here")
    args = p.parse_args(argv)
    if not os.path.exists(args.model):
        raise ModelError(f"model file not found: {args.model}")
    import json

    from .inspect_model import inspect, print_inspection
    from .model_io import parse_input_shapes
    info = inspect(args.model, target=args.target, recipe=args.recipe,
                   input_shapes=parse_input_shapes(args.input_shape))
    print_inspection(info)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


def _cmd_targets(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="qcompile targets", description="List compile targets.").parse_args(argv)
    from .hostinfo import detect_isa
    from .targets import list_targets
    table = Table(title="targets")
    for col in ("target", "description", "weights", "activations", "opset", "variants"):
        table.add_column(col)
    for name, d in list_targets().items():
        variants = list(d.get("variants", {}))
        host = f" (host: {detect_isa(variants)})" if d.get("detect") == "host_isa" else ""
        table.add_row(name, d.get("summary", ""), ", ".join(d["dtypes"]["weight"]) + " " +
                      "/".join(d["granularity"]["weight"]), ", ".join(d["dtypes"]["activation"]) + " " +
                      "/".join(d["granularity"]["activation"]),
                      f"{d['opset']['min']}..{d['opset']['max']}" if d["opset"].get("max") else f">= {d['opset']['min']}",
                      ", ".join(variants) + host)
    Console().print(table)
    return 0


def _cmd_recipes(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="qcompile recipes", description="List built-in recipes.").parse_args(argv)
    from .recipe_files import builtin_recipes, description
    _print_names("built-in recipes", "recipe", ((n, description(p)) for n, p in sorted(builtin_recipes().items())))
    return 0


def _cmd_passes(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="qcompile passes", description="List registered passes.").parse_args(argv)
    from .pass_catalog import all_passes
    _print_names("passes", "pass", ((name, spec.summary) for name, spec in all_passes().items()))
    return 0


def _print_names(title: str, column: str, rows) -> None:
    table = Table(title=title)
    table.add_column(column)
    table.add_column("description")
    for name, text in rows:
        table.add_row(name, text)
    Console().print(table)


def _cmd_verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qcompile verify",
                                description="Compare a compiled model against its original in onnxruntime. A deploy "
                                            "graph with target ops (Ascend) is checked through its reference "
                                            "lowering, as the compile checked it.")
    p.add_argument("original")
    p.add_argument("compiled")
    p.add_argument("--data", help="inputs (.npz or folder); synthetic when omitted")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--custom-ops", action="append", default=[], metavar="LIB.so",
                   help="onnxruntime custom-op library for ops of the original onnxruntime lacks (repeatable)")
    p.add_argument("--max-memory", metavar="GB", help="run both models block by block within GB (docs/layerwise.md)")
    args = p.parse_args(argv)
    from .memory_plan import parse_max_memory
    max_memory = parse_max_memory(args.max_memory)
    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    import json
    import tempfile
    from pathlib import Path

    from .backends import reference_lowering
    from .backends.cpu.generated_kernels import library_beside
    from .calib_data import model_input_specs, open_dataset
    from .model_io import load_model, save_model
    from .op_support import check_custom_op_library, refuse_unknown_ops
    from .ort_session import custom_op_libraries
    from .report import print_summary, write_report
    from .verify import verify_models
    libraries = tuple(check_custom_op_library(lib) for lib in args.custom_ops)
    compiled, original = Path(args.compiled), Path(args.original)
    compiled_model, original_model = load_model(compiled), load_model(original)
    refuse_unknown_ops(original_model, original, libraries)
    generated = library_beside(compiled, compiled_model.metadata_props)   # the compile's kernels/ library
    if generated is not None:
        libraries += (str(generated),)
    beside = compiled.parent / "report.json"
    try:
        report = json.loads(beside.read_text()) if beside.is_file() else None
    except (OSError, ValueError):
        report = None
    data = open_dataset(args.data, model_input_specs(original_model), synthetic_samples=4, seed=1)
    lowered = reference_lowering(compiled_model, report)
    with tempfile.TemporaryDirectory() as tmp, custom_op_libraries(libraries):
        checked, label = compiled, compiled.name
        if lowered is not None:
            checked, label = Path(tmp) / "reference.onnx", f"{lowered[1]} of {compiled.name}"
            save_model(lowered[0], checked)
        else:
            refuse_unknown_ops(compiled_model, compiled, libraries)
        try:
            if max_memory is not None:
                from .memory_plan import MemoryPlan
                from .verify_blockwise import verify_blockwise
                result = verify_blockwise(original, checked, data, samples=args.samples,
                                          memory=MemoryPlan(max_memory, Path(tmp) / "scratch"))
            else:
                result = verify_models(original, checked, data, samples=args.samples)
        except QCompileError:
            raise
        except Exception as err:  # onnxruntime refusing a model: the user's input, not a bug
            raise ModelError(f"verification could not run the models in onnxruntime: "
                             f"{' '.join(str(err).split())[:400]}") from None
    result["checked"] = label
    print_summary({"target": "-", "recipe": "-", "layers": {}, "verification": result}, header=False)
    Console().print(f"checked: {label}")
    if args.json:
        write_report(Path(args.json), result)
    return 0


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises `Terminated` in the main thread for the length of one command, so staged
    output is discarded and the exit says so (the default action kills without cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s %(message)s")
    err = Console(stderr=True)
    try:
        with _sigterm_unwinds():
            if argv and argv[0] in SUBCOMMANDS:
                return globals()[f"_cmd_{argv[0]}"](argv[1:])
            return _cmd_compile(argv)
    except QCompileError as e:
        err.print(f"[bold red]error:[/bold red] {e.render()}", highlight=False, markup=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        return EXIT_INTERRUPTED
    except Terminated:
        err.print("terminated; nothing was written")
        return EXIT_TERMINATED
    except SystemExit as e:  # argparse
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    except Exception:
        path = "qcompile-crash.log"
        try:
            with open(path, "w") as f:
                traceback.print_exc(file=f)
        except OSError:
            path = None
        err.print("[bold red]internal error[/bold red]: this is a bug in qcompile, not in your input."
                  + (f" Details in {path}; please report it." if path else ""))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
