"""A small real-data development set in Karpathy format, built from Debian packages (not a test).

Real images with short human-written descriptions, nothing downloaded at run time beyond the
packages:

- **Tux Paint stamps** (``tuxpaint-stamps-default``): ~800 drawings and photos of animals,
  food, vehicles, ... each with a description its artists wrote (``<stamp>.txt``, first line
  in English). Captions: that description, the stamp's name, and the name with its category.
- **Noto Color Emoji** (``fonts-noto-color-emoji``) rendered with Pillow, named by the Unicode
  CLDR English annotations (``unicode-cldr-core``): the spoken name ("grinning face") and the
  keywords ("face | grin"). Captions: the name, "an emoji of <name>", and the keywords.

Images are written as PNG on a white background at ``--size`` pixels; the train/val/test split
of each image is fixed by a hash of its id (80/10/10), so the folder is the same on every
machine. The Karpathy file is ``dataset_dev.json``; use it as::

    [data]
    dataset = "karpathy"
    annotations = "<out>/dataset_dev.json"
    images = "<out>/images"

Install and build::

    apt-get install tuxpaint-stamps-default fonts-noto-color-emoji unicode-cldr-core
    python benchmarks/dev_data.py --out data/dev
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

STAMPS = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR = Path("/usr/share/unicode/cldr/common")
PACKAGES = "tuxpaint-stamps-default fonts-noto-color-emoji unicode-cldr-core"


def split_of(key: str) -> str:
    """train / val / test by a hash of the image's id: fixed, whatever the machine."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def on_white(image: Image.Image, size: int) -> Image.Image:
    """The image (transparency over white) fitted into a ``size`` square, aspect kept."""
    image = image.convert("RGBA")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas.convert("RGB")


def words(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", name)).strip()


def stamps(size: int) -> Iterator[tuple[str, Image.Image, list[str]]]:
    for txt in sorted(STAMPS.rglob("*.txt")):
        png = txt.with_suffix(".png")
        if not png.is_file():
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        desc = lines[0].strip() if lines else ""
        if not desc or "=" in desc:
            continue
        name = words(txt.stem)
        category = words(txt.parent.name)
        captions = list(dict.fromkeys([desc, f"a {name}", f"{name}, from {category}"]))
        try:
            with Image.open(png) as im:
                image = on_white(im, size)
        except OSError:
            continue
        yield f"stamp/{txt.relative_to(STAMPS).with_suffix('')}", image, captions


def annotations() -> dict[str, tuple[str, list[str]]]:
    """Emoji -> (tts name, keywords) from CLDR's English annotations (base and derived)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for rel in ("annotations/en.xml", "annotationsDerived/en.xml"):
        root = ET.parse(CLDR / rel).getroot()
        names: dict[str, str] = {}
        keys: dict[str, list[str]] = {}
        for a in root.iter("annotation"):
            cp, text = a.get("cp", ""), (a.text or "").strip()
            if a.get("type") == "tts":
                names[cp] = text
            else:
                keys[cp] = [k.strip() for k in text.split("|") if k.strip()]
        for cp, name in names.items():
            out[cp] = (name, keys.get(cp, []))
    return out


def emoji(size: int) -> Iterator[tuple[str, Image.Image, list[str]]]:
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the font's one bitmap size
    blank = _missing_glyph(font)  # the "missing glyph" box: sequences the font cannot draw
    for cp, (name, keys) in sorted(annotations().items()):
        if not any(ord(c) >= 0x2190 for c in cp):  # letters, digits, punctuation: no picture
            continue
        im = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((0, 0), cp, font=font, embedded_color=True)
        box = im.getbbox()
        if box is None:
            continue
        glyph = im.crop(box)
        if glyph.tobytes() == blank:
            continue
        keywords = [k for k in keys if k != name]
        captions = [name, f"an emoji of {name}"]
        if keywords:
            captions.append(", ".join(keywords[:6]))
        yield f"emoji/{'-'.join(f'{ord(c):x}' for c in cp)}", on_white(glyph, size), captions


def _missing_glyph(font: ImageFont.FreeTypeFont) -> bytes:
    im = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((0, 0), "\U000effff", font=font, embedded_color=True)
    box = im.getbbox()
    return im.crop(box).tobytes() if box else b""


def build(out: Path, size: int) -> dict[str, int]:
    missing = [str(p) for p in (STAMPS, EMOJI_FONT, CLDR) if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install {PACKAGES}")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records, counts = [], {"train": 0, "val": 0, "test": 0}
    for source in (stamps(size), emoji(size)):
        for key, image, captions in source:
            filename = hashlib.sha256(key.encode()).hexdigest()[:16] + ".png"
            image.save(images_dir / filename, optimize=True)
            split = split_of(key)
            counts[split] += 1
            records.append({"filename": filename, "imgid": len(records), "split": split,
                            "source": key, "sentences": [{"raw": c} for c in captions]})
    (out / "dataset_dev.json").write_text(json.dumps({"images": records}, indent=0),
                                          encoding="utf-8")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/dev"))
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    a = ap.parse_args()
    counts = build(a.out, a.size)
    print(f"{a.out}/dataset_dev.json: {sum(counts.values())} images "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
