"""``mmfw.load``: a trained model as an embedding function, the way evaluation embeds.

``mmfw.load(path)`` opens a run directory (``mmfw.load_run``), an ensemble directory (its
members' similarities averaged) or an ``mmfw``-format export, and returns a :class:`Model`:
``encode_images``, ``encode_texts``, ``similarity`` and ``search``. Images and captions go
through exactly the evaluation path (``mmfw.eval.retrieval.embed_split``): the vision encoder's
``preprocess``, the text encoder's ``tokenize``, batches of 256, the model's ``encode_image`` /
``encode_text``, so the embeddings are the ones the run's Recall@K was measured on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..config.recipe import Recipe
from ..eval.retrieval import ensemble_embeddings, placement
from ..model import DualEncoder
from ..run.loaded import ensemble_members, load_run
from ..run.rundir import CHECKPOINTS, RECIPE_FILE
from ..spi.contracts import EXPORT_MANIFEST, EXPORT_WEIGHTS
from ..spi.errors import DataError, MmfwError
from .collection import Collection, top_k
from .portable import is_export, open_export

#: an image: a PIL image, a path to an image file, or a uint8 ``[3, H, W]`` tensor
ImageInput = Image.Image | str | Path | Tensor
#: file suffixes taken from a folder of images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: items per batch: evaluation's default (``embed_split``), so results match it bit for bit
BATCH_SIZE = 256
#: inputs longer than this get a progress bar unless ``progress`` says otherwise
PROGRESS_ABOVE = 2048


class Hit(NamedTuple):
    """One search result: the row of the index, its cosine similarity to the query, and the
    row's id and label (path or caption) when the index is a :class:`Collection`."""

    index: int
    score: float
    id: int | None = None
    label: str = ""


class Model:
    """A trained dual encoder (or an ensemble of them) that embeds images and captions.

    Every ``encode_*`` result is a float32 tensor ``[N, embed_dim]`` on the CPU whose rows are
    L2-normalised, so a dot product is a cosine similarity. For an ensemble the rows are the
    members' normalised embeddings side by side, divided by sqrt(members): their dot product
    is the members' averaged cosine similarity (as ``mmfw eval`` ranks an ensemble).
    """

    def __init__(self, members: Sequence[DualEncoder], *, path: Path, kind: str,
                 device: torch.device, precision: str,
                 autocast: Callable[[], AbstractContextManager[Any]],
                 recipe: Recipe | None = None, step: int | None = None) -> None:
        if not members:
            raise MmfwError(f"{path}: no model to load (an ensemble without members)")
        self.members = [m.to(device).eval() for m in members]
        self.path, self.kind, self.recipe, self.step = path, kind, recipe, step
        self.device, self.precision, self.autocast = device, precision, autocast

    def __repr__(self) -> str:
        size = f", {len(self.members)} members" if len(self.members) > 1 else ""
        return (f"Model({str(self.path)!r}, {self.kind}{size}, embed_dim={self.embed_dim}, "
                f"{self.device}, {self.precision})")

    @property
    def embed_dim(self) -> int:
        """Width of the returned embeddings (the members' widths summed for an ensemble)."""
        return sum(m.embed_dim for m in self.members)

    # embedding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: ImageInput | Sequence[ImageInput], *,
                      batch_size: int = BATCH_SIZE, progress: bool | None = None) -> Tensor:
        """L2-normalised float32 embeddings ``[N, embed_dim]`` (on the CPU) of ``images``:
        PIL images, image file paths, uint8 ``[3, H, W]`` tensors, or one folder path (its
        image files, sorted by path, in sub-folders too: :func:`image_files`).

        Each image is preprocessed by the vision encoder's ``preprocess`` and embedded in
        batches of ``batch_size`` on the model's device and precision. ``progress``: a tqdm
        bar (default: only for more than ``PROGRESS_ABOVE`` images). An image that cannot be
        read is a DataError naming its path.
        """
        items = _image_list(images)
        parts: list[list[Tensor]] = [[] for _ in self.members]
        for batch in _batches(items, batch_size, progress, "images"):
            opened = [open_image(x) for x in batch]
            for m, out in zip(self.members, parts, strict=True):
                pixels = torch.stack([m.vision.preprocess(x) for x in opened]).to(self.device)
                with self.autocast():
                    out.append(m.encode_image(m.prepare_pixels(pixels)).float())
        return self._join(parts, len(items))

    @torch.no_grad()
    def encode_texts(self, texts: str | Sequence[str], *, batch_size: int = BATCH_SIZE,
                     progress: bool | None = None) -> Tensor:
        """L2-normalised float32 embeddings ``[N, embed_dim]`` (on the CPU) of captions,
        tokenized by the text encoder's ``tokenize`` in batches of ``batch_size`` (padding
        and truncation as in training and evaluation)."""
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = next((i for i, t in enumerate(items) if not isinstance(t, str)), None)
        if bad is not None:
            raise MmfwError(f"encode_texts() takes strings; item {bad} is "
                            f"{type(items[bad]).__name__} ({items[bad]!r:.60})")
        parts: list[list[Tensor]] = [[] for _ in self.members]
        for batch in _batches(items, batch_size, progress, "texts"):
            for m, out in zip(self.members, parts, strict=True):
                tokens = {k: v.to(self.device) for k, v in m.text.tokenize(batch).items()}
                with self.autocast():
                    out.append(m.encode_text(tokens).float())
        return self._join(parts, len(items))

    def _join(self, parts: list[list[Tensor]], n: int) -> Tensor:
        if n == 0:
            return torch.zeros(0, self.embed_dim)
        each = [torch.cat(p) for p in parts]
        if len(each) == 1:
            return F.normalize(each[0], dim=-1).cpu()
        return ensemble_embeddings(each, each)[0].cpu()  # unit rows: averaged cosine

    # scoring ----------------------------------------------------------------------------
    def similarity(self, images: ImageInput | Sequence[ImageInput],
                   texts: str | Sequence[str]) -> Tensor:
        """Cosine similarities ``[N images, M texts]``."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    def embed_query(self, query: str | ImageInput | Tensor) -> Tensor:
        """One query as a normalised ``[embed_dim]`` vector: a ``str`` is a caption; a
        ``Path``, a PIL image or a uint8 ``[3, H, W]`` tensor an image; a float vector an
        embedding already."""
        if isinstance(query, str):
            return self.encode_texts([query])[0]
        if isinstance(query, Tensor) and query.is_floating_point() and query.ndim == 1:
            return F.normalize(query.float(), dim=-1).cpu()
        return self.encode_images([query])[0]

    def search(self, query: str | ImageInput | Tensor, index: Tensor | Collection,
               k: int = 10) -> list[Hit]:
        """The ``k`` rows of ``index`` most cosine-similar to ``query`` (see
        :meth:`embed_query`), best first. ``index`` is embeddings from ``encode_*`` or a
        :class:`Collection` (then each hit carries its id and label)."""
        emb = index.embeddings if isinstance(index, Collection) else index
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise MmfwError(f"the index is {tuple(emb.shape)}: it needs [N, {self.embed_dim}] "
                            "embeddings of this model")
        scores, rows = top_k(emb, self.embed_query(query)[None], k)
        out = []
        for s, r in zip(scores[0].tolist(), rows[0].tolist(), strict=True):
            if isinstance(index, Collection):
                out.append(Hit(r, s, int(index.ids[r]), index.labels[r]))
            else:
                out.append(Hit(r, s))
        return out


# ------------------------------------------------------------------------------------------
# inputs


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (sub-folders included), sorted by path."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())
    if not files:
        raise DataError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _image_list(images: ImageInput | Sequence[ImageInput]) -> Sequence[ImageInput]:
    if isinstance(images, (str, Path)):
        p = Path(images).expanduser()
        if p.is_dir():
            return image_files(p)
        return [p]
    if isinstance(images, (Image.Image, Tensor)):
        return [images]
    return images


def open_image(image: ImageInput) -> Image.Image | Tensor:
    """A PIL image (RGB) from a path, or the image itself; unreadable files are named."""
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise DataError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {path}: {err}") from None
    if isinstance(image, (Image.Image, Tensor)):
        return image
    raise MmfwError(f"an image must be a PIL image, a path or a uint8 tensor, not "
                    f"{type(image).__name__}")


def _batches(items: Sequence[Any], size: int, progress: bool | None, unit: str
             ) -> Iterator[list[Any]]:
    if size < 1:
        raise MmfwError(f"batch_size must be at least 1, not {size}")
    show = len(items) > PROGRESS_ABOVE if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), unit=unit[:-1], desc=f"embedding {unit}", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    try:
        for s in range(0, len(items), size):
            batch = [items[i] for i in range(s, min(s + size, len(items)))]
            yield batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------
# loading


def _backend_of(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    return recipe.backend.name, recipe.backend.values()


def load(path: str | Path, *, device: str | torch.device | None = None,
         precision: str | None = None, checkpoint: str = "auto") -> Model:
    """Open a trained model for embedding: a run directory, an ensemble directory or a
    folder written by ``mmfw export --format mmfw``.

    ``device`` / ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): by default the run's
    backend and its precision where that backend is available here, else the CPU in fp32.
    ``checkpoint`` (run directories): ``"auto"``, ``"latest"`` or ``"best"``, as
    :func:`mmfw.load_run`. A missing or damaged file (recipe, weights, tokenizer) is an
    MmfwError naming it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MmfwError(f"{p} does not exist")
    if is_export(p):
        ex = open_export(p)
        b = ex.manifest.get("backend")
        backend = (str(b["name"]), {k: v for k, v in b.items() if k != "name"}) \
            if isinstance(b, dict) and "name" in b else None
        dev, prec, ctx = placement(backend, device, precision)
        return Model([ex.model], path=p, kind="export", device=dev, precision=prec,
                     autocast=ctx, step=ex.manifest.get("step"))
    members = ensemble_members(p)
    if members is not None:
        runs = [load_run(m, checkpoint=checkpoint) for m in members]
        if not runs:
            raise MmfwError(f"{p} is an ensemble directory without members")
        dev, prec, ctx = placement(_backend_of(runs[0].recipe), device, precision)
        return Model([r.model for r in runs], path=p, kind="ensemble", device=dev,
                     precision=prec, autocast=ctx, recipe=runs[0].recipe)
    if (p / EXPORT_WEIGHTS).is_file() and not (p / CHECKPOINTS).is_dir():
        raise MmfwError(f"{p} looks like an mmfw export, but {p / EXPORT_MANIFEST} is missing")
    if not (p / RECIPE_FILE).is_file():
        raise MmfwError(f"{p} is not a run directory ({RECIPE_FILE}), an ensemble directory "
                        "(ensemble.json) or an mmfw export (mmfw-export.json)")
    run = load_run(p, checkpoint=checkpoint)
    dev, prec, ctx = placement(_backend_of(run.recipe), device, precision)
    return Model([run.model], path=p, kind="run", device=dev, precision=prec, autocast=ctx,
                 recipe=run.recipe, step=run.step)


__all__ = ["BATCH_SIZE", "IMAGE_SUFFIXES", "Hit", "ImageInput", "Model", "image_files", "load",
           "open_image", "placement"]
