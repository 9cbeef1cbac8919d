"""``mmfw embed`` and ``mmfw search``: collections of embeddings from a split, a folder of
images or a file of captions, and top-k search over them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config.recipe import Recipe, load_recipe
from ..registry import create
from ..spi.contracts import EXPORT_RECIPE
from ..spi.errors import DataError, MmfwError
from .collection import FAISS_ABOVE, Collection, make_collection, top_k
from .model import BATCH_SIZE, Model, image_files


class SplitImages(Sequence[Any]):
    """The images of a split, decoded one at a time as a batch asks for them."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: Any) -> Any:
        return self.split[i].image


def _recipe(model: Model) -> Recipe:
    if model.recipe is not None:
        return model.recipe
    path = model.path / EXPORT_RECIPE
    if not path.is_file():
        raise MmfwError(f"{model.path} has no recipe ({path}): --split needs the run's "
                        "dataset; use --images or --texts")
    return load_recipe(path)


def read_texts(path: Path) -> tuple[list[int], list[str]]:
    """The non-blank lines of a text file and their (1-based) line numbers."""
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}") from None
    rows = [(i + 1, s.strip()) for i, s in enumerate(lines) if s.strip()]
    if not rows:
        raise DataError(f"text file {path} has no non-blank line")
    return [i for i, _ in rows], [s for _, s in rows]


def embed_collection(model: Model, *, split: str | None = None, modality: str = "image",
                     images: Path | None = None, texts: Path | None = None,
                     batch_size: int = BATCH_SIZE) -> Collection:
    """A collection of one source: a split of the run's dataset (ids: the split's item index,
    which for captions is the image they describe; labels: the first caption of an image, or
    the caption), a folder of images (ids: 0..N-1; labels: paths relative to the folder) or a
    text file (ids: line numbers; labels: the lines)."""
    given = [x for x in (split, images, texts) if x is not None]
    if len(given) != 1:
        raise MmfwError("give exactly one of --split, --images, --texts")
    progress = None  # a bar for inputs longer than a few batches (Model's default threshold)
    run = str(model.path)
    if images is not None:
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist")
        files = image_files(folder)
        emb = model.encode_images(files, batch_size=batch_size, progress=progress)
        return make_collection(emb, range(len(files)),
                               [str(f.relative_to(folder)) for f in files], "image", run)
    if texts is not None:
        ids, lines = read_texts(Path(texts).expanduser())
        emb = model.encode_texts(lines, batch_size=batch_size, progress=progress)
        return make_collection(emb, ids, lines, "text", run)
    recipe = _recipe(model)
    source = create("dataset", recipe.data.dataset.name, options=recipe.data.dataset.options)
    if split not in source.splits:
        raise MmfwError(f"dataset '{recipe.data.dataset.name}' has no split '{split}' (it has "
                        f"{', '.join(source.splits)})")
    data = source.split(split)
    if modality == "image":
        labels = [next(iter(data.captions(i)), "") for i in range(len(data))]
        emb = model.encode_images(SplitImages(data), batch_size=batch_size, progress=progress)
        return make_collection(emb, range(len(data)), labels, "image", run)
    if modality != "text":
        raise MmfwError(f"--modality must be 'image' or 'text', not {modality!r}")
    owner = [i for i in range(len(data)) for _ in data.captions(i)]
    captions = [c for i in range(len(data)) for c in data.captions(i)]
    emb = model.encode_texts(captions, batch_size=batch_size, progress=progress)
    return make_collection(emb, owner, captions, "text", run)


def search_collection(model: Model, collection: Path, *, text: str | None = None,
                      image: Path | None = None, k: int = 10, faiss_above: int = FAISS_ABOVE
                      ) -> list[tuple[int, float, int, str]]:
    """``(rank, score, id, label)`` of the ``k`` best rows of a saved collection."""
    if (text is None) == (image is None):
        raise MmfwError("give exactly one of --text, --image")
    coll = Collection.load(collection)
    if coll.embed_dim != model.embed_dim:
        raise DataError(f"collection {collection} holds {coll.embed_dim}-wide embeddings "
                        f"(made by {coll.run or 'another model'}), but {model.path} gives "
                        f"{model.embed_dim}-wide ones: embed it with this model")
    query = model.embed_query(text if text is not None else Path(image))
    scores, rows = top_k(coll.embeddings, query[None], k, faiss_above)
    return [(rank + 1, float(s), int(coll.ids[r]), coll.labels[r]) for rank, (s, r)
            in enumerate(zip(scores[0].tolist(), rows[0].tolist(), strict=True))]


__all__ = ["SplitImages", "embed_collection", "read_texts", "search_collection"]
