"""Inputs and the task metric for ddddocr's YOLOX character detector (models/zoo.py ``ddddocr_det``).

Why: the detector finds the characters of click-captcha-like pictures (a handful of large,
rotated glyphs on a busy photo). Random noise would calibrate nothing real, so we render such
pictures with Pillow and feed them exactly as ddddocr 1.6.1 does (core/detection_engine.py
``preproc``): the BGR picture resized to fit 416×416 keeping its aspect ratio, pasted at the
top-left of a grey (114) canvas, HWC→CHW, float32 **0–255, no normalisation**.

Three sets, each sample from its own ``default_rng([seed, i])``:

* ``calib`` (32, seed A) and ``eval`` (100, seed B): one style -- DejaVu glyphs, textured
  colour backgrounds, square pictures;
* ``other`` (100, seed C): another style that no choice was made on -- STIX / Computer Modern
  glyphs, dark or busy backgrounds, wide pictures, outlines, JPEG artefacts, uneven light
  (the scene helpers of tools/ppocr_data.py).

The task metric (``box_agreement``) decodes both outputs the way ddddocr does
(``demo_postprocess``: grid offsets × stride, exp(size) × stride; score = objectness × class;
class-agnostic NMS at IoU 0.45, score > 0.1), matches the quantized model's boxes to the fp32
model's greedily at IoU ≥ 0.5, and reports the mean per-sample F1 (1.0 where both find
nothing) and the mean absolute error of the matched boxes' four edges, in input pixels.

CLI: ``python tools/ddddocr_data.py [--out DIR] [--preview DIR]`` (default DIR:
``$QCOMPILE_CACHE/data``).
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppocr_data  # noqa: E402  (fonts, backgrounds and finishing shared with the PP-OCR sets)

GEN_VERSION = 1
SIZE = 416
SEEDS = {"calib": 424242, "eval": 31337, "other": 8088}
COUNTS = {"calib": 32, "eval": 100, "other": 100}
STRIDES = (8, 16, 32)
_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt2345678"


def render_picture(rng: np.random.Generator, style: str) -> np.ndarray:
    """A click-captcha-like picture: 3-7 large rotated glyphs on a photo-like ground. uint8 HxWx3 RGB."""
    other = style == "other"
    h, w = (int(rng.integers(150, 260)), int(rng.integers(300, 480))) if other else \
        (int(rng.integers(300, 400)),) * 2
    if other:
        bg, dark = ppocr_data._scene_bg(rng, h, w)
    else:
        tex = ppocr_data._smooth_noise(rng, h, w)[..., None]
        bg, dark = np.clip(rng.uniform(90, 220, 3) + rng.uniform(40, 110) * (tex - 0.5), 0, 255), False
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    font_of = ppocr_data._other_font if other else ppocr_data._font
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 8))):
        for _try in range(30):
            size = int(rng.integers(28, 70))
            glyph = _GLYPHS[int(rng.integers(len(_GLYPHS)))]
            layer = ppocr_data._scene_text_layer(rng, glyph, font_of(int(rng.integers(1 << 16)), size),
                                                 float(rng.uniform(-45, 45)))
            spot = ppocr_data.place(rng, layer.size, (h, w), placed, edge=2, gap=0)
            if spot is None:
                continue
            ink = ppocr_data._scene_ink(rng, dark) if other else \
                tuple(int(v) for v in rng.integers(0, 256, 3))
            img.paste(Image.new("RGB", layer.size, ink), spot[:2], layer)
            break
    if other:
        return ppocr_data._scene_finish(rng, img)
    return ppocr_data._finish(rng, img, (1.0, 6.0))


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 3x416x416: ddddocr's letterbox (top-left, grey 114), BGR, 0-255."""
    h, w = rgb.shape[:2]
    r = min(SIZE / h, SIZE / w)
    nh, nw = int(h * r), int(w * r)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    resized = np.asarray(Image.fromarray(bgr).resize((nw, nh), Image.BILINEAR), np.uint8)
    canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
    canvas[:nh, :nw] = resized
    return canvas.transpose(2, 0, 1).astype(np.float32)


def make_sets(out_dir: str | os.PathLike | None = None, *, force: bool = False,
              splits: tuple[str, ...] = tuple(SEEDS)) -> dict[str, Path]:
    """Write ``ddddocr_det_<split>.npz`` (key ``images``) + a .json sidecar per split; reuse
    files whose sidecar matches (generation is deterministic)."""
    out = Path(out_dir) if out_dir else ppocr_data.default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in splits:
        n, seed = COUNTS[split], SEEDS[split]
        path = out / f"ddddocr_det_{split}.npz"
        meta = {"model": "ddddocr_det", "split": split, "n": n, "seed": seed, "gen_version": GEN_VERSION,
                "style": "other" if split == "other" else "captcha", "pillow": Image.__version__,
                "preprocess": "letterbox 416 top-left on 114, BGR, float 0-255"}
        if not ppocr_data.cached_set(path, meta, force):
            x = np.stack([preprocess(render_picture(np.random.default_rng([seed, i]),
                                                    "other" if split == "other" else "captcha")) for i in range(n)])
            ppocr_data.write_set(path, meta, images=x)
        paths[split] = path
    return paths


# --------------------------------------------------------------------- metric
@lru_cache(maxsize=None)
def _grid() -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in STRIDES:
        n = SIZE // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strides).astype(np.float64)


def detections(raw: np.ndarray, score_thr: float = 0.1, nms_thr: float = 0.45) -> np.ndarray:
    """One sample's [3549, 6] output -> [k, 5] boxes (x1, y1, x2, y2, score) after ddddocr's decode and NMS."""
    grid, stride = _grid()
    p = np.asarray(raw, np.float64)
    if p.shape[0] != grid.shape[0]:
        raise ValueError(f"expected {grid.shape[0]} anchors for a {SIZE}x{SIZE} input, got {p.shape[0]}")
    xy = (p[:, :2] + grid) * stride
    wh = np.exp(np.clip(p[:, 2:4], -20, 20)) * stride
    score = p[:, 4] * p[:, 5:].max(axis=1)
    keep = score > score_thr
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)[keep]
    score = score[keep]
    order, chosen = np.argsort(-score), []
    while order.size:
        i = order[0]
        chosen.append(i)
        rest = order[1:]
        iou = _iou(boxes[i], boxes[rest])
        order = rest[iou <= nms_thr]
    return np.concatenate([boxes[chosen], score[chosen, None]], axis=1) if chosen else np.zeros((0, 5))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a against each row of b (ddddocr's +1 pixel convention)."""
    if b.size == 0:
        return np.zeros(0)
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.maximum(0.0, x2 - x1 + 1) * np.maximum(0.0, y2 - y1 + 1)
    area = lambda z: (z[..., 2] - z[..., 0] + 1) * (z[..., 3] - z[..., 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def box_agreement(ref: np.ndarray, got: np.ndarray, iou_thr: float = 0.5) -> tuple[float, float]:
    """(mean per-sample F1 of `got`'s boxes against `ref`'s, mean absolute error of the matched
    pairs' four edges in pixels; nan when nothing matched). Batch on axis 0."""
    f1s, errs = [], []
    for r, g in zip(np.asarray(ref), np.asarray(got)):
        a, b = detections(r), detections(g)
        if len(a) == 0 and len(b) == 0:
            f1s.append(1.0)
            continue
        free, hits = np.ones(len(b), bool), 0
        for box in a:                               # greedy, the reference's highest score first
            iou = np.where(free, _iou(box, b[:, :4]), 0.0)
            j = int(np.argmax(iou)) if len(b) else -1
            if j >= 0 and iou[j] >= iou_thr:
                free[j] = False
                hits += 1
                errs.append(float(np.abs(box[:4] - b[j, :4]).mean()))
        f1s.append(2 * hits / (len(a) + len(b)))
    return float(np.mean(f1s)), (float(np.mean(errs)) if errs else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate the ddddocr detector's calib/eval/other npz sets.")
    ap.add_argument("--out", default=None, help=f"output dir (default {ppocr_data.default_out_dir()})")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--preview", metavar="DIR", help="also save a few PNGs of each style")
    args = ap.parse_args(argv)
    for split, p in make_sets(args.out, force=args.force).items():
        print(f"ddddocr_det {split:5s} {p}  ({p.stat().st_size / 2**20:.1f} MiB)")
    if args.preview:
        pv = Path(args.preview)
        pv.mkdir(parents=True, exist_ok=True)
        for split in SEEDS:
            for i in range(3):
                rgb = render_picture(np.random.default_rng([SEEDS[split], i]), "other" if split == "other" else "captcha")
                Image.fromarray(rgb).save(pv / f"ddddocr_{split}_{i}.png")
        print(f"previews in {pv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
