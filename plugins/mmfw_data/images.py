"""Reading image files with Pillow: decoding for training, and the cheap pre-training check.

Decoding happens in ``Split.__getitem__``, so it runs in the DataLoader's worker processes.
Every failure becomes a :class:`~mmfw.spi.errors.DataError` that names the file, so the engine's
bad-data policy (``data.on_bad``) can report or skip it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmfw.spi import DataError

#: what an image file may end with (JPEG's end-of-image marker); checked before a full decode
_JPEG_EOI = b"\xff\xd9"
#: Pillow's own guard against decompression bombs turned into an error, not a warning
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
               UnidentifiedImageError)


def decode(source: Path | bytes, where: str) -> Image.Image:
    """Decode an image file (or its bytes) to an RGB PIL image, fully loaded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(fp) as img:
                img.load()
                return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except (*_PIL_ERRORS, Image.DecompressionBombWarning) as err:
        raise DataError(f"{where}: cannot decode image ({_reason(err)})") from None


def check(source: Path | bytes, where: str, *, full: bool = False) -> str | None:
    """Why an image file is unusable, or None. Cheap by default: it exists, is not empty, its
    header opens and ``verify()`` passes, and a JPEG ends with its end-of-image marker (a
    truncated download does not). A JPEG whose marker is missing is decoded in full before it
    is declared bad (some cameras write trailing bytes); ``full`` decodes every image."""
    if isinstance(source, Path):
        try:
            size = os.stat(source).st_size
        except FileNotFoundError:
            return "image file not found"
        except OSError as err:
            return f"cannot read image file ({err.strerror or err})"
        if not source.is_file():
            return "not a file"
        if size == 0:
            return "image file is empty"
    elif not source:
        return "image file is empty"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(fp) as img:
                fmt = img.format
                img.verify()
        if full or (fmt == "JPEG" and not _ends_with_eoi(source)):
            decode(source, where)
    except DataError as err:
        return str(err).removeprefix(f"{where}: ")
    except (*_PIL_ERRORS, Image.DecompressionBombWarning) as err:
        return f"cannot decode image ({_reason(err)})"
    return None


def _ends_with_eoi(source: Path | bytes) -> bool:
    if isinstance(source, bytes):
        tail = source[-64:]
    else:
        with open(source, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            tail = f.read()
    return tail.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI)


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.split("\n")[0][:200]
