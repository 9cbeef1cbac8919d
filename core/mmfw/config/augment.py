"""``[data.augment]``: the training-time augmentation options (see :mod:`mmfw.data.augment`)."""

from __future__ import annotations

from typing import Any

import attrs

from ..spi.options import option

_prob = [attrs.validators.ge(0.0), attrs.validators.le(1.0)]
_ge0 = attrs.validators.ge(0.0)


def _scale(_inst: Any, attribute: Any, value: tuple[float, float]) -> None:
    lo, hi = value
    if not 0 < lo <= hi:
        raise ValueError(f"'{attribute.name}' must be (low, high) with 0 < low <= high, "
                         f"got {list(value)}")
    if attribute.name == "crop_scale" and hi > 1:
        raise ValueError(f"'crop_scale' is a fraction of the image area (at most 1), got "
                         f"{list(value)}")


@attrs.frozen
class AugmentConfig:
    """Training-time augmentation of images and captions, and MixUp/CutMix (all off by
    default; evaluation never sees them)."""

    crop_scale: tuple[float, float] = option(
        (1.0, 1.0), doc="RandomResizedCrop area range, e.g. [0.7, 1.0] (seed 000 §2); "
        "[1.0, 1.0]: no crop", validator=_scale)
    crop_ratio: tuple[float, float] = option((0.75, 4 / 3), doc="RandomResizedCrop aspect "
                                             "ratio range", validator=_scale)
    flip: float = option(0.0, doc="probability of a horizontal flip", validator=_prob)
    flip_swaps_left_right: bool = option(True, doc="a flipped image's captions say 'right' "
                                         "for 'left' and back, so they stay true")
    brightness: float = option(0.0, doc="ColorJitter brightness (seed: 0.3)", validator=_ge0)
    contrast: float = option(0.0, doc="ColorJitter contrast (seed: 0.3)", validator=_ge0)
    saturation: float = option(0.0, doc="ColorJitter saturation (seed: 0.3)", validator=_ge0)
    hue: float = option(0.0, doc="ColorJitter hue (at most 0.5)",
                        validator=[_ge0, attrs.validators.le(0.5)])
    grayscale: float = option(0.0, doc="probability of RandomGrayscale (seed: 0.1)",
                              validator=_prob)
    word_delete: float = option(0.0, doc="probability that a caption word is deleted",
                                validator=_prob)
    synonym_replace: float = option(0.0, doc="probability that a caption word is replaced "
                                    "by a synonym", validator=_prob)
    synonyms: str = option("wordnet", doc="'wordnet' (WordNet 3.0 from the mmfw[wordnet] "
                           "extra) or a synonym table: .json {word: [synonyms]} or text lines "
                           "'word: synonym, synonym'")
    min_words: int = option(4, doc="captions with fewer words are not changed by word "
                            "deletion or synonyms", validator=attrs.validators.ge(1))
    mixup: float = option(0.0, doc="MixUp Beta(alpha, alpha) (seed: 0.2; 0: off)",
                          validator=_ge0)
    cutmix: float = option(0.0, doc="CutMix Beta(alpha, alpha) (0: off)", validator=_ge0)
    mix_prob: float = option(1.0, doc="probability that a batch is mixed", validator=_prob)
    mix_switch: float = option(0.5, doc="with both on, probability that a mixed batch uses "
                               "CutMix rather than MixUp", validator=_prob)

    def __attrs_post_init__(self) -> None:
        if self.word_delete + self.synonym_replace > 1:
            raise ValueError("'word_delete' + 'synonym_replace' must be at most 1 (they are "
                             "the chances of two outcomes for one word)")

    @property
    def images_on(self) -> bool:
        return (self.crop_scale != (1.0, 1.0) or self.flip > 0 or self.grayscale > 0
                or any((self.brightness, self.contrast, self.saturation, self.hue)))

    @property
    def text_on(self) -> bool:
        return self.word_delete > 0 or self.synonym_replace > 0

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0
