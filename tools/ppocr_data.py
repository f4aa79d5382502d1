"""Deterministic, realistic-looking inputs for the PP-OCR det / cls models.

Why: random-noise calibration data gives meaningless activation ranges and
meaningless accuracy numbers.  We render real text (Pillow + TTF fonts) so the
detector sees text-like structure and the classifier sees upright and
upside-down lines, then normalise exactly like the shipping runtime
(rapidocr-onnxruntime 1.4.4, from which models/zoo.py takes the models):

* images are handed to the models in **BGR** channel order (rapidocr's
  LoadImage converts PIL RGB -> BGR, and PaddleOCR reads with cv2 -> BGR);
* det: ``(img/255 - mean) / std``, HWC->CHW, float32.  rapidocr 1.4.4's
  config.yaml uses ``mean = std = [0.5, 0.5, 0.5]`` (the DetPreProcess default
  too); PaddleOCR's own deploy config uses ImageNet mean/std
  ``[0.485,0.456,0.406] / [0.229,0.224,0.225]``.  Default here: ``rapidocr``;
  ``--det-norm paddle`` gives the PaddleOCR variant;
* cls: TextClassifier.resize_norm_img: resize to height 48 keeping the aspect
  ratio (width = min(192, ceil(48*w/h))), ``(x/255 - 0.5)/0.5``, CHW, zero-pad on
  the right to 192 (zero *after* normalisation, like rapidocr).

Models: det, cls, and the rec recogniser (text lines as its 3x48x320 input:
height 48, ``(x/255-0.5)/0.5``, zeros on the right; task metric ``ctc_agreement``).

Output: ``<model>_calib.npz`` (32 samples, seed A) and ``<model>_eval.npz``
(100 samples, seed B, disjoint vocabulary) with one array per model input (key
``x``, batch on axis 0), plus a ``.json`` sidecar with the generation metadata
(and the 0/180 labels for cls).  Each sample uses its own RNG
``default_rng([seed, i])`` so sample i does not depend on the set size.

A third set, ``<model>_other.npz`` (100 samples, seed C), is rendered *differently*
("scenes" style): other fonts (STIX and Computer Modern, which matplotlib ships), a
wider size range, photo-like textured, dark and mid-grey backgrounds with light or
outlined text, larger rotations, heavier noise, JPEG artefacts, uneven lighting.
No recipe choice and no default was made on it: it answers whether a number
measured on the calibration style carries over to pages nobody tuned on.

CLI: ``python tools/ppocr_data.py --out DIR [--models ppocr_det,ppocr_cls]``
(default DIR: ``$QCOMPILE_CACHE/data`` or ``~/.cache/qcompile/data``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["MODELS", "DET_NORMS", "CALIB_SEED", "EVAL_SEED", "OTHER_SEED", "SPLITS", "REC_SHAPE", "default_out_dir",
           "place", "cached_set", "write_set", "render_det_image", "render_cls_crop", "render_det_scene",
           "render_cls_scene_crop",
           "det_preprocess", "cls_preprocess", "rec_preprocess", "make_rec_batch", "ctc_agreement",
           "make_det_batch", "make_cls_batch", "make_sets", "det_iou", "cls_agreement",
           "cls_accuracy", "main"]

GEN_VERSION = 1
CALIB_SEED = 20240611          # seed A
EVAL_SEED = 977                # seed B
OTHER_SEED = 5150              # seed C: the differently rendered third set
SPLITS = ("calib", "eval", "other")
DET_SIZE = (640, 640)          # H, W
CLS_SHAPE = (3, 48, 192)       # C, H, W  (rapidocr cls_image_shape)
REC_SHAPE = (3, 48, 320)       # C, H, W  (rapidocr rec_img_shape)
DET_NORMS = {
    "rapidocr": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "paddle": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MODELS = ("ppocr_det", "ppocr_cls", "ppocr_rec")

_WORDS = """
account address after again airport allow almost amount answer apple april
area around arrival artist august autumn avenue balance bank basket battery
beach before below bicycle bill black blue board bonus book border bottle
bread breakfast bridge brown budget building business butter button cable
camera candle capital card carpet castle center chair change charge cheese
chicken church circle city class clean clock cloud coffee color company
contact copper corner cotton country cream credit cup customer daily danger
date december delivery dental design desk dinner direct discount doctor door
double dream dress drive east edition electric energy engine entrance
evening event exit express factory family farm february field final finance
fire first floor flower forest fresh friday front fruit garden gate general
glass gold green guest hall harbor health heavy hello history holiday home
hotel house invoice island january july june kitchen label ladder lake
large lemon letter library light limit liquid local lunch machine main
manager market march medium member menu metal middle milk minute mobile
monday money month morning mountain museum music natural north notice
number ocean october office open orange order paper parking party payment
pencil people pepper phone photo pizza plant please pocket police price
print private public purple quality quarter question quick radio rain
receipt record river road room rose round saturday school season second
service shop silver simple single size small south speed spring square
station steel stone store street student summer sunday support table tax
taxi teacher ticket time today total tower town train travel tuesday
university valley village visitor voice water weekly welcome west window
winter yellow yesterday zone
""".split()


def default_out_dir() -> Path:
    env = os.environ.get("QCOMPILE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile"
    return root / "data"


# ----------------------------------------------------------------- fonts / text
@lru_cache(maxsize=None)
def _font_files() -> tuple[str, ...]:
    """DejaVu TTFs if installed (skip the math font: few Latin glyph shapes)."""
    roots = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts")]
    files = []
    for r in roots:
        if r.is_dir():
            files += [str(p) for p in r.rglob("DejaVu*.ttf") if "Math" not in p.name]
    return tuple(sorted(files))


@lru_cache(maxsize=512)
def _font(idx: int, size: int) -> ImageFont.FreeTypeFont:
    files = _font_files()
    if files:
        return ImageFont.truetype(files[idx % len(files)], size)
    return ImageFont.load_default(size=size)   # scalable in Pillow >= 10.1


def _vocab(split: str) -> list[str]:
    """Disjoint halves of the word list so calib and eval texts differ (other: all of it)."""
    return {"calib": _WORDS[0::2], "eval": _WORDS[1::2]}.get(split, _WORDS)


@lru_cache(maxsize=None)
def _other_font_files() -> tuple[str, ...]:
    """Fonts the calibration pages never use: matplotlib's STIX and Computer Modern faces."""
    import matplotlib
    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
             "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf")
    return tuple(str(root / n) for n in names if (root / n).is_file())


@lru_cache(maxsize=512)
def _other_font(idx: int, size: int) -> ImageFont.FreeTypeFont:
    files = _other_font_files()
    return ImageFont.truetype(files[idx % len(files)], size) if files else _font(idx, size)


def _token(rng: np.random.Generator, words: list[str]) -> str:
    kind = rng.choice(["word"] * 6 + ["int", "price", "date", "code", "pct", "time"])
    if kind == "word":
        w = words[rng.integers(len(words))]
        style = rng.integers(4)
        return w.upper() if style == 0 else w.capitalize() if style == 1 else w
    if kind == "int":
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
    if kind == "price":
        return f"{'$' if rng.random() < .5 else ''}{rng.integers(0, 2000)}.{rng.integers(0, 100):02d}"
    if kind == "date":
        return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == "code":
        letters = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, int(rng.integers(1, 4))))
        return f"{letters}-{rng.integers(10, 100000)}"
    if kind == "pct":
        return f"{rng.integers(0, 100)}.{rng.integers(0, 10)}%"
    return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"


def _line(rng: np.random.Generator, words: list[str], lo: int = 1, hi: int = 6) -> str:
    return " ".join(_token(rng, words) for _ in range(int(rng.integers(lo, hi + 1))))


def _light_bg(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Light, slightly tinted background with a gradient (float32 HxWx3, RGB)."""
    base = rng.uniform(185, 255, 3)
    tilt = rng.uniform(-35, 35, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(ang) * xx / max(w, 1) + np.sin(ang) * yy / max(h, 1))[..., None]
    return np.clip(base + tilt * t, 150, 255).astype(np.float32)


def _text_color(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.7:                       # dark grey/black ink
        g = int(rng.integers(0, 90))
        return tuple(int(np.clip(g + rng.integers(-15, 16), 0, 255)) for _ in range(3))
    c = rng.integers(0, 140, 3)                  # coloured but still darkish
    c[rng.integers(3)] = rng.integers(60, 200)
    return tuple(int(v) for v in c)


def _finish(rng: np.random.Generator, img: Image.Image, noise: tuple[float, float]) -> np.ndarray:
    """Optional slight blur, then Gaussian sensor noise; uint8 RGB."""
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, rng.uniform(*noise), a.shape).astype(np.float32)
    return np.clip(a, 0, 255).round().astype(np.uint8)


def place(rng: np.random.Generator, size: tuple[int, int], canvas: tuple[int, int],
          placed: list[tuple[int, int, int, int]], *, edge: int = 4, gap: int = 6):
    """Where a layer of `size` (w, h) goes on a `canvas` (h, w): a random spot `edge` pixels
    inside it whose box, widened by `gap`, overlaps nothing in `placed` -> (x, y, box), the box
    added to `placed`; None when it does not fit or overlaps (the caller draws again)."""
    (lw, lh), (h, w) = size, canvas
    if lw >= w - 2 * edge or lh >= h - 2 * edge:
        return None
    x, y = int(rng.integers(edge, w - lw - edge)), int(rng.integers(edge, h - lh - edge))
    box = (x - gap, y - gap, x + lw + gap, y + lh + gap)
    if any(box[0] < q[2] and q[0] < box[2] and box[1] < q[3] and q[1] < box[3] for q in placed):
        return None
    placed.append(box)
    return x, y, box


# ------------------------------------------------------------------- renderers
def render_det_image(rng: np.random.Generator, words: list[str],
                     size: tuple[int, int] = DET_SIZE) -> np.ndarray:
    """A 'document/sign' scene: 4-12 text lines, varied fonts/sizes/colours. uint8 HxWx3 RGB."""
    h, w = size
    img = Image.fromarray(_light_bg(rng, h, w).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):     # faint non-text clutter
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))
        fill = tuple(int(v) for v in rng.integers(170, 250, 3))
        (draw.rectangle if rng.random() < .5 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(4, 13))):
        for _try in range(25):
            fsize = int(rng.integers(14, 57))
            font = _font(int(rng.integers(1 << 16)), fsize)
            text = _line(rng, words, 1, 5)
            l, t, r, b = draw.textbbox((0, 0), text, font=font)
            tw, th = r - l, b - t
            angle = float(rng.uniform(-12, 12)) if rng.random() < 0.25 else 0.0
            pad = 4
            layer = Image.new("L", (tw + 2 * pad, th + 2 * pad), 0)
            ImageDraw.Draw(layer).text((pad - l, pad - t), text, font=font, fill=255)
            if angle:
                layer = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
            spot = place(rng, layer.size, size, placed)
            if spot is None:
                continue
            img.paste(Image.new("RGB", layer.size, _text_color(rng)), spot[:2], layer)
            break
    return _finish(rng, img, (1.0, 7.0))


def render_cls_crop(rng: np.random.Generator, words: list[str]) -> tuple[np.ndarray, int]:
    """A single text-line crop as det+crop would produce; label 1 = rotated 180 deg.

    Returns (uint8 HxWx3 RGB of variable size, label).
    """
    fsize = int(rng.integers(18, 49))
    font = _font(int(rng.integers(1 << 16)), fsize)
    text = _line(rng, words, 1, 6)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    l, t, r, b = probe.textbbox((0, 0), text, font=font)
    px, py = int(rng.integers(2, 10)), int(rng.integers(2, 9))
    cw, ch = r - l + 2 * px, b - t + 2 * py
    img = Image.fromarray(_light_bg(rng, ch, cw).astype(np.uint8), "RGB")
    ImageDraw.Draw(img).text((px - l, py - t), text, font=font, fill=_text_color(rng))
    label = int(rng.random() < 0.5)
    if label:
        img = img.rotate(180)
    return _finish(rng, img, (1.0, 6.0)), label


# ------------------------------------------------- "scenes": the third, unseen style
def _smooth_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 4) -> np.ndarray:
    """Multi-octave value noise in [0, 1] (HxW): stands in for photo texture (walls, wood, fabric)."""
    acc = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC), np.float32)
        acc += amp * up
        total += amp
        amp *= 0.5
    acc /= total
    return (acc - acc.min()) / max(float(np.ptp(acc)), 1e-6)


def _scene_bg(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, bool]:
    """(float32 HxWx3 RGB background, dark?) -- textured colour, dark, mid-grey or busy."""
    kind = rng.choice(["texture", "dark", "mid", "busy"], p=[0.35, 0.25, 0.2, 0.2])
    tex = _smooth_noise(rng, h, w)[..., None]
    if kind == "dark":
        base, spread = rng.uniform(10, 70, 3), rng.uniform(10, 50)
    elif kind == "mid":
        base, spread = rng.uniform(90, 160, 3), rng.uniform(20, 60)
    elif kind == "busy":
        base, spread = rng.uniform(40, 200, 3), rng.uniform(80, 160)
    else:
        base, spread = rng.uniform(60, 220, 3), rng.uniform(30, 90)
    tint = rng.uniform(0.6, 1.4, 3)
    bg = base + spread * (tex - 0.5) * tint
    if kind == "busy":                              # a second, independent colour field
        bg += 60 * (_smooth_noise(rng, h, w, 3)[..., None] - 0.5) * rng.uniform(-1, 1, 3)
    return np.clip(bg, 0, 255).astype(np.float32), bool(bg.mean() < 110)


def _scene_finish(rng: np.random.Generator, img: Image.Image) -> np.ndarray:
    """Uneven lighting, blur, heavy sensor noise and JPEG artefacts; uint8 RGB."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.8))))
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    light = 1.0 + rng.uniform(-0.45, 0.35) * (_smooth_noise(rng, h, w, 2)[..., None] - 0.5) * 2
    a = a * light * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25)
    a = a + rng.normal(0.0, rng.uniform(3.0, 14.0), a.shape).astype(np.float32)
    img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "RGB")
    if rng.random() < 0.7:
        import io
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(25, 80)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img, np.uint8)


def _scene_ink(rng: np.random.Generator, dark_bg: bool) -> tuple[int, int, int]:
    if dark_bg:                                    # light ink on dark ground
        return tuple(int(v) for v in rng.integers(170, 256, 3))
    if rng.random() < 0.5:
        return tuple(int(v) for v in rng.integers(0, 60, 3))
    c = rng.integers(0, 256, 3)                     # saturated sign colours
    c[rng.integers(3)] = rng.integers(0, 50)
    return tuple(int(v) for v in c)


def _scene_text_layer(rng, text, font, angle):
    """An L-mode mask of ``text`` (optionally outlined) rotated by ``angle``; None if empty."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    stroke = int(rng.integers(1, 4)) if rng.random() < 0.25 else 0
    l, t, r, b = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    pad = 4 + stroke
    layer = Image.new("L", (r - l + 2 * pad, b - t + 2 * pad), 0)
    ImageDraw.Draw(layer).text((pad - l, pad - t), text, font=font, fill=255, stroke_width=stroke,
                               stroke_fill=255)
    return layer.rotate(angle, resample=Image.BICUBIC, expand=True) if angle else layer


def render_det_scene(rng: np.random.Generator, words: list[str],
                     size: tuple[int, int] = DET_SIZE) -> np.ndarray:
    """A photo-like scene with 3-14 text lines in fonts, sizes, colours and lighting the
    calibration pages never show. uint8 HxWx3 RGB."""
    h, w = size
    bg, dark = _scene_bg(rng, h, w)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 7))):      # objects: boxes, discs, lines
        x0, y0 = int(rng.integers(-50, w)), int(rng.integers(-50, h))
        x1, y1 = x0 + int(rng.integers(30, 320)), y0 + int(rng.integers(30, 320))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif shape == 1:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.line([x0, y0, x1, y1], fill=fill, width=int(rng.integers(2, 12)))
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 15))):
        for _try in range(25):
            font = _other_font(int(rng.integers(1 << 16)), int(rng.integers(10, 91)))
            text = _line(rng, words, 1, 4)
            angle = float(rng.uniform(-30, 30)) if rng.random() < 0.4 else 0.0
            layer = _scene_text_layer(rng, text, font, angle)
            spot = place(rng, layer.size, size, placed)
            if spot is None:
                continue
            x, y, box = spot
            if rng.random() < 0.3:                 # a plate behind the text, as on signs
                plate = tuple(int(v) for v in rng.integers(0, 256, 3))
                draw.rectangle(box, fill=plate)
                ink = _scene_ink(rng, sum(plate) < 330)
            else:
                ink = _scene_ink(rng, dark)
            img.paste(Image.new("RGB", layer.size, ink), (x, y), layer)
            break
    return _scene_finish(rng, img)


def render_cls_scene_crop(rng: np.random.Generator, words: list[str]) -> tuple[np.ndarray, int]:
    """A text-line crop in the scene style; label 1 = rotated 180 deg."""
    font = _other_font(int(rng.integers(1 << 16)), int(rng.integers(14, 61)))
    text = _line(rng, words, 1, 6)
    layer = _scene_text_layer(rng, text, font, float(rng.uniform(-4, 4)) if rng.random() < 0.3 else 0.0)
    px, py = int(rng.integers(1, 12)), int(rng.integers(1, 10))
    cw, ch = layer.size[0] + 2 * px, layer.size[1] + 2 * py
    bg, dark = _scene_bg(rng, ch, cw)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    img.paste(Image.new("RGB", layer.size, _scene_ink(rng, dark)), (px, py), layer)
    label = int(rng.random() < 0.5)
    if label:
        img = img.rotate(180)
    return _scene_finish(rng, img), label


# ---------------------------------------------------------------- normalisation
def det_preprocess(rgb: np.ndarray, norm: str = "rapidocr") -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 3xHxW, BGR order, (x/255-mean)/std (rapidocr DetPreProcess)."""
    mean, std = (np.asarray(v, np.float32) for v in DET_NORMS[norm])
    bgr = rgb[..., ::-1].astype(np.float32)
    return ((bgr * np.float32(1 / 255.0) - mean) / std).transpose(2, 0, 1).astype(np.float32)


def cls_preprocess(rgb: np.ndarray, shape: tuple[int, int, int] = CLS_SHAPE) -> np.ndarray:
    """uint8 HxWx3 RGB crop -> float32 3x48x192 (rapidocr TextClassifier.resize_norm_img)."""
    c, h, w = shape
    ih, iw = rgb.shape[:2]
    ratio = iw / float(ih)
    rw = w if math.ceil(h * ratio) > w else int(math.ceil(h * ratio))
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    resized = np.asarray(Image.fromarray(bgr).resize((rw, h), Image.BILINEAR), np.float32)
    resized = resized.transpose(2, 0, 1) / 255.0
    resized = (resized - 0.5) / 0.5
    out = np.zeros((c, h, w), np.float32)
    out[:, :, :rw] = resized
    return out


def rec_preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB line -> float32 3x48x320 (rapidocr TextRecognizer.resize_norm_img at its
    default 320 width: height 48 keeping the aspect ratio, ``(x/255-0.5)/0.5``, zeros on the right)."""
    return cls_preprocess(rgb, REC_SHAPE)


def ctc_agreement(probs_a: np.ndarray, probs_b: np.ndarray) -> tuple[float, float]:
    """(share of lines whose greedy CTC decoding is identical, mean character error rate of b
    against a). Greedy CTC: arg-max per step, repeats merged, blank (index 0) dropped -- rapidocr's
    CTCLabelDecode; symbol indices are compared, so no character dictionary is needed."""
    a, b = np.asarray(probs_a), np.asarray(probs_b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    same, cer = [], []
    for ra, rb in zip(a, b):
        sa, sb = _ctc_greedy(ra), _ctc_greedy(rb)
        same.append(sa == sb)
        cer.append(_edit_distance(sa, sb) / max(len(sa), 1))
    return float(np.mean(same)), float(np.mean(cer))


def _ctc_greedy(steps: np.ndarray) -> list[int]:
    best = steps.argmax(-1)
    out, prev = [], -1
    for k in best.tolist():
        if k != prev and k != 0:
            out.append(k)
        prev = k
    return out


def _edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# -------------------------------------------------------------------- batches
def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


def make_det_batch(n: int, seed: int, split: str, norm: str = "rapidocr") -> np.ndarray:
    out = np.empty((n, 3, *DET_SIZE), np.float32)
    words = _vocab(split)
    render = render_det_scene if split == "other" else render_det_image
    for i in range(n):
        out[i] = det_preprocess(render(_rng(seed, i), words), norm)
    return out


def make_cls_batch(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((n, *CLS_SHAPE), np.float32)
    labels = np.empty(n, np.int64)
    words = _vocab(split)
    render = render_cls_scene_crop if split == "other" else render_cls_crop
    for i in range(n):
        crop, labels[i] = render(_rng(seed, i), words)
        out[i] = cls_preprocess(crop)
    return out, labels


def make_rec_batch(n: int, seed: int, split: str) -> np.ndarray:
    """Upright text lines (the cls renderers, never rotated) as the recogniser sees them."""
    out = np.empty((n, *REC_SHAPE), np.float32)
    words = _vocab(split)
    render = render_cls_scene_crop if split == "other" else render_cls_crop
    for i in range(n):
        crop, label = render(_rng(seed, i), words)
        out[i] = rec_preprocess(crop[::-1, ::-1] if label else crop)     # undo the 180° turn
    return out


def cached_set(path: Path, meta: dict, force: bool = False) -> bool:
    """Whether `path` already holds the set `meta` describes (its .json sidecar matches:
    generation is deterministic, so reuse only saves time)."""
    side = path.with_suffix(".json")
    if force or not (path.is_file() and side.is_file()):
        return False
    try:
        old = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return {k: old.get(k) for k in meta} == meta


def write_set(path: Path, meta: dict, **arrays: np.ndarray) -> None:
    """The arrays to `path` (through a .part file, so a half-written set is never reused), then
    the sidecar."""
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def make_sets(model: str, out_dir: str | os.PathLike | None = None, *, n_calib: int = 32,
              n_eval: int = 100, n_other: int = 100, calib_seed: int = CALIB_SEED, eval_seed: int = EVAL_SEED,
              other_seed: int = OTHER_SEED, det_norm: str = "rapidocr", force: bool = False,
              splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
    """Write ``<model>_<split>.npz`` (+ .json sidecars) for each of ``splits``
    (calib, eval: the page style; other: the scene style no choice was made on).

    Re-uses existing files when their sidecar metadata matches (generation is
    deterministic, so this is only a time saver); ``force`` regenerates.
    Returns {split: path}.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if det_norm not in DET_NORMS:
        raise ValueError(f"det_norm must be one of {sorted(DET_NORMS)}")
    out = Path(out_dir) if out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    plan = {"calib": (n_calib, calib_seed), "eval": (n_eval, eval_seed), "other": (n_other, other_seed)}
    unknown = set(splits) - set(plan)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
    for split in splits:
        n, seed = plan[split]
        path = out / f"{model}_{split}.npz"
        fonts = _other_font_files() if split == "other" else _font_files()
        meta = {"model": model, "split": split, "n": n, "seed": seed, "gen_version": GEN_VERSION,
                "style": "scenes" if split == "other" else "pages",
                "channel_order": "BGR", "pillow": Image.__version__,
                "fonts": [Path(f).name for f in fonts] or ["pillow-default"]}
        if model == "ppocr_det":
            mean, std = DET_NORMS[det_norm]
            meta.update(norm=det_norm, mean=list(mean), std=list(std), shape=[n, 3, *DET_SIZE])  # lists: JSON has no tuples
        elif model == "ppocr_rec":
            meta.update(norm="rec", mean=[0.5] * 3, std=[0.5] * 3, shape=[n, *REC_SHAPE],
                        pad="zeros after normalisation (right)")
        else:
            meta.update(norm="cls", mean=[0.5] * 3, std=[0.5] * 3, shape=[n, *CLS_SHAPE],
                        pad="zeros after normalisation (right)")
        if cached_set(path, meta, force):
            paths[split] = path
            continue
        if model == "ppocr_det":
            x = make_det_batch(n, seed, split, det_norm)
        elif model == "ppocr_rec":
            x = make_rec_batch(n, seed, split)
        else:
            x, labels = make_cls_batch(n, seed, split)
            meta["labels"] = labels.tolist()            # 0 = upright, 1 = rotated 180
        write_set(path, meta, x=x)
        paths[split] = path
    return paths


# --------------------------------------------------------------------- metrics
def det_iou(prob_a: np.ndarray, prob_b: np.ndarray, thr: float = 0.3) -> float:
    """Mean per-sample IoU of the binarised DB prob maps (thr 0.3 = rapidocr's thresh).

    Batch on axis 0; a sample where both maps are empty counts as 1.0.
    """
    a = np.asarray(prob_a) > thr
    b = np.asarray(prob_b) > thr
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    inter = np.logical_and(a, b).sum(1)
    union = np.logical_or(a, b).sum(1)
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(iou.mean())


def cls_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of samples whose arg-max class agrees (works on probs or logits)."""
    a, b = np.asarray(logits_a), np.asarray(logits_b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def cls_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy against the generator's 0/180 labels (label 1 = '180')."""
    return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate PP-OCR calib/eval npz sets.")
    ap.add_argument("--out", default=None, help=f"output dir (default {default_out_dir()})")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--n-other", type=int, default=100)
    ap.add_argument("--splits", default=",".join(SPLITS), help="comma list of calib, eval, other")
    ap.add_argument("--det-norm", choices=sorted(DET_NORMS), default="rapidocr")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--preview", metavar="DIR", help="also save a few PNGs for eyeballing")
    args = ap.parse_args(argv)
    for m in [s.strip() for s in args.models.split(",") if s.strip()]:
        paths = make_sets(m, args.out, n_calib=args.n_calib, n_eval=args.n_eval, n_other=args.n_other,
                          det_norm=args.det_norm, force=args.force,
                          splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()))
        for k, p in paths.items():
            print(f"{m:10s} {k:5s} {p}  ({p.stat().st_size / 2**20:.1f} MiB)")
    if args.preview:
        pv = Path(args.preview)
        pv.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(render_det_image(_rng(EVAL_SEED, i), _vocab("eval"))).save(pv / f"det_{i}.png")
        for i in range(6):
            crop, lab = render_cls_crop(_rng(EVAL_SEED, i), _vocab("eval"))
            Image.fromarray(crop).save(pv / f"cls_{i}_{'180' if lab else '0'}.png")
        for i in range(4):
            Image.fromarray(render_det_scene(_rng(OTHER_SEED, i), _vocab("other"))).save(pv / f"other_det_{i}.png")
            crop, lab = render_cls_scene_crop(_rng(OTHER_SEED, i), _vocab("other"))
            Image.fromarray(crop).save(pv / f"other_cls_{i}_{'180' if lab else '0'}.png")
        print(f"previews in {pv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
