"""Augmentation: images and captions in the training collate only; MixUp/CutMix targets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmfw
from helpers import tiny_recipe
from mmfw.config.recipe import load_recipe
from mmfw.data import augment
from mmfw.data.augment import (
    AugmentConfig,
    MixedTargets,
    Mixer,
    TrainAugment,
    augment_caption,
    encoder_input_size,
    mix_targets,
    read_synonym_table,
    swap_left_right,
    wordnet_synonyms,
)
from mmfw.data.batching import Batch
from mmfw.options import build
from mmfw.train.loop import Trainer


def config(**values) -> AugmentConfig:
    return build(AugmentConfig, values)


# options ----------------------------------------------------------------------------------


def test_everything_is_off_by_default() -> None:
    c = AugmentConfig()
    assert not c.images_on and not c.text_on and not c.mixing


@pytest.mark.parametrize(("values", "fragment"), [
    ({"crop_scale": [0.5, 1.2]}, "at most 1"),
    ({"crop_scale": [0.9, 0.5]}, "low <= high"),
    ({"flip": 1.5}, "flip"),
    ({"word_delete": 0.7, "synonym_replace": 0.5}, "at most 1"),
    ({"mixup": -1.0}, "mixup"),
    ({"hue": 0.8}, "hue"),
])
def test_bad_values_name_their_key(values, fragment) -> None:
    with pytest.raises(mmfw.RecipeError, match=fragment):
        config(**values)


def test_recipe_section(tmp_path: Path) -> None:
    r = load_recipe(tiny_recipe(tmp_path, data={"augment": {"crop_scale": [0.7, 1.0],
                                                            "flip": 0.5, "mixup": 0.2}}))
    assert r.data.augment.crop_scale == (0.7, 1.0) and r.data.augment.mixup == 0.2
    assert r.to_dict()["data"]["augment"]["crop_scale"] == [0.7, 1.0]
    with pytest.raises(mmfw.RecipeError, match=r"data.augment.flip_prob.*Did you mean.*'flip'"):
        load_recipe(tiny_recipe(tmp_path, data={"augment": {"flip_prob": 0.5}}))


# images -----------------------------------------------------------------------------------


def picture(h: int = 30, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_image_augment_outputs_the_encoder_size_and_is_seeded() -> None:
    aug = TrainAugment(config(crop_scale=[0.5, 1.0], brightness=0.3, contrast=0.3,
                              saturation=0.3, grayscale=0.1, flip=0.5), (16, 16))
    images = [picture(seed=i) for i in range(6)]
    a, _ = aug(images, ["x"] * 6, list(range(6)), seed=7)
    b, _ = aug(images, ["x"] * 6, list(range(6)), seed=7)
    c, _ = aug(images, ["x"] * 6, list(range(6)), seed=8)
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_pil_images_are_accepted() -> None:
    from PIL import Image

    aug = TrainAugment(config(crop_scale=[0.5, 1.0]), (8, 8))
    out, _ = aug([Image.new("L", (20, 10), 128)], ["x"], [0], seed=0)
    assert out[0].shape == (3, 8, 8)


def test_flip_swaps_left_and_right_in_that_image_captions_only() -> None:
    aug = TrainAugment(config(flip=1.0), (4, 4))
    img = torch.arange(48, dtype=torch.uint8).reshape(3, 4, 4)
    out, caps = aug([img], ["a dog left of a Cat", "rightmost cup on the left"], [0, 0], 0)
    assert torch.equal(out[0], img.flip(-1))
    assert caps == ["a dog right of a Cat", "leftmost cup on the right"]
    keep = TrainAugment(config(flip=1.0, flip_swaps_left_right=False), (4, 4))
    assert keep([img], ["left"], [0], 0)[1] == ["left"]
    assert swap_left_right("Left and right, bright light") == "Right and left, bright light"


def test_encoder_input_size_is_read_from_preprocess() -> None:
    vision = mmfw.create("encoder", "scratch-vision", image_size=24, patch_size=8, width=32,
                         depth=1, heads=2)
    assert encoder_input_size(vision.preprocess) == (24, 24)
    assert encoder_input_size(lambda x: x.float()) is None  # keeps the input size


# captions ---------------------------------------------------------------------------------


def test_word_deletion_rate_and_safety() -> None:
    rng = random.Random(0)
    caption = " ".join(f"w{i}" for i in range(40))
    kept = [len(augment_caption(caption, rng, delete=0.25, replace=0, synonyms={},
                                min_words=4).split()) for _ in range(200)]
    assert 0.70 * 40 < sum(kept) / len(kept) < 0.80 * 40
    assert augment_caption(caption, rng, delete=1.0, replace=0, synonyms={},
                           min_words=4) == caption  # never empty
    assert augment_caption("a red dog", rng, delete=1.0, replace=0, synonyms={},
                           min_words=4) == "a red dog"  # too short to touch


def test_synonym_replacement_keeps_case_and_punctuation() -> None:
    rng = random.Random(0)
    out = augment_caption("Big dogs, big dog.", rng, delete=0, replace=1.0,
                          synonyms={"big": ("large",), "dog": ("hound",)}, min_words=2)
    assert out == "Large dogs, large hound."


def test_wordnet_ships_with_the_package() -> None:
    table = wordnet_synonyms(["big", "dog", "photo", "the", "zzzz"])
    assert table["big"] == ("large",)
    assert "domestic dog" in table["dog"]
    assert "photograph" in table["photo"]
    assert "the" not in table and "zzzz" not in table


def test_wordnet_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(augment, "wordnet_dir", lambda: None)
    with pytest.raises(mmfw.RecipeError, match=r"mmfw\[wordnet\]"):
        wordnet_synonyms(["dog"])


def test_synonym_table_files(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"Dog": ["hound", "pup"], "cat": "kitty"}))
    assert read_synonym_table(tmp_path / "s.json") == {"dog": ("hound", "pup"),
                                                       "cat": ("kitty",)}
    (tmp_path / "s.txt").write_text("# mine\ndog: hound, pup\n\nman: fellow\n")
    assert read_synonym_table(tmp_path / "s.txt") == {"dog": ("hound", "pup"),
                                                      "man": ("fellow",)}
    (tmp_path / "bad.txt").write_text("dog hound\n")
    with pytest.raises(mmfw.RecipeError, match=r"bad.txt:1"):
        read_synonym_table(tmp_path / "bad.txt")
    with pytest.raises(mmfw.RecipeError, match="not found"):
        read_synonym_table(tmp_path / "none.json")


def test_prepare_builds_the_table_for_the_training_vocabulary(tmp_path: Path) -> None:
    aug = TrainAugment(config(synonym_replace=0.5), (4, 4))
    aug.prepare(["a big dog on the grass", "a photo."])
    assert set(aug.synonyms) >= {"big", "dog", "photo"}
    (tmp_path / "t.txt").write_text("dog: hound\n")
    aug = TrainAugment(config(synonym_replace=0.5, synonyms=str(tmp_path / "t.txt")), (4, 4))
    aug.prepare(["a dog"])
    assert aug.synonyms == {"dog": ("hound",)}


# training only ----------------------------------------------------------------------------


def test_augmentation_runs_in_training_batches_only(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    real = TrainAugment.__call__

    def counting(self, images, captions, owner, seed):
        calls.append(len(captions))
        return real(self, images, captions, owner, seed)

    monkeypatch.setattr(TrainAugment, "__call__", counting)
    recipe = load_recipe(tiny_recipe(
        tmp_path, run={"max_steps": 3}, eval={"val_split": ""},
        data={"train_images": 16, "test_images": 8,
              "augment": {"crop_scale": [0.6, 1.0], "flip": 0.5, "brightness": 0.3,
                          "word_delete": 0.1, "synonym_replace": 0.1}}))
    trainer = Trainer(recipe, console=lambda s: None)
    test = trainer.data.source.split("test")
    raw = mmfw.create("dataset", "synthetic", **recipe.data.dataset.values()).split("test")
    assert torch.equal(test[0].image, raw[0].image)  # evaluation reads the images untouched
    trainer.fit()
    assert calls == [16, 16, 16]  # one call per training batch
    trainer.ctx.evaluate("test")
    assert len(calls) == 3


# MixUp / CutMix ---------------------------------------------------------------------------


def batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 8, 8, generator=g), {"ids": torch.zeros(n, 2)},
                 torch.arange(n) + 100, torch.arange(n) + 100)


def test_mixer_off_is_identity() -> None:
    b = batch()
    assert Mixer(AugmentConfig(), 0)(b, 3) is b
    assert Mixer(config(mixup=0.2, mix_prob=0.0), 0)(b, 3) is b


def test_mixup_math_and_determinism() -> None:
    b = batch()
    m = Mixer(config(mixup=0.4), seed=1)
    out = m(b, step=5)
    lam, other = out.mix.lam, out.mix.other_ids
    perm = other - 100
    assert out.mix.kind == "mixup" and 0 <= lam <= 1
    assert torch.allclose(out.pixels, lam * b.pixels + (1 - lam) * b.pixels[perm])
    assert torch.equal(out.image_ids, b.image_ids) and torch.equal(out.text_ids, b.text_ids)
    again = m(b, step=5)
    assert again.mix.lam == lam and torch.equal(again.pixels, out.pixels)
    assert m(b, step=6).mix.lam != lam


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lam() -> None:
    b = batch(n=4)
    out = Mixer(config(cutmix=1.0), seed=0)(b, step=2)
    perm = out.mix.other_ids - 100
    from_other = (out.pixels == b.pixels[perm]).all(1)  # [n, h, w]
    from_self = (out.pixels == b.pixels).all(1)
    assert out.mix.kind == "cutmix"
    for i in range(4):
        if perm[i] == i:
            continue
        pasted = (from_other[i] & ~from_self[i]).float().mean().item()
        assert pasted == pytest.approx(1 - out.mix.lam)


def test_mixed_targets_are_the_soft_target_loss() -> None:
    """lam * L(ids) + (1 - lam) * L(ids[perm]) equals InfoNCE with soft targets, computed
    here by hand: image i has lam on its caption and 1 - lam on the pasted image's caption."""
    torch.manual_seed(0)
    n, d, tau = 5, 8, 0.1
    img, txt = torch.randn(n, d), torch.randn(n, d)
    b = batch(n)
    mixed = Mixer(config(mixup=1.0), seed=3)(b, step=0)
    lam, perm = mixed.mix.lam, mixed.mix.other_ids - 100
    loss = mmfw.create("loss", "infonce", temperature=tau, learn_temperature=False)
    out = mix_targets(loss, mixed)(img, txt, image_ids=mixed.image_ids,
                                   text_ids=mixed.text_ids)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / tau
    q = lam * torch.eye(n) + (1 - lam) * torch.eye(n)[perm]  # q[i, j]: image i -> caption j
    i2t = -(q * logits.log_softmax(1)).sum(1).mean()
    t2i = -(q.T * logits.T.log_softmax(1)).sum(1).mean()
    assert out.loss.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-5)
    assert mix_targets(loss, b) is loss  # unmixed batch: the loss itself


def test_a_stateful_loss_updates_once_per_mixed_batch() -> None:
    loss = mmfw.create("loss", "memory_queue", size=64)
    loss.train()
    b = Mixer(config(mixup=1.0), seed=0)(batch(6), step=0)
    MixedTargets(loss, b)(torch.randn(6, 8), torch.randn(6, 8), image_ids=b.image_ids,
                          text_ids=b.text_ids)
    assert int(loss.image_queue.count) == 6 and int(loss.text_queue.count) == 6
    assert loss.training
    assert torch.equal(loss.image_queue.contents()[1].sort().values, b.image_ids)


def test_mixed_targets_on_micro_batches_find_the_other_ids() -> None:
    b = Mixer(config(mixup=1.0), seed=0)(batch(6), step=1)
    mt = MixedTargets(lambda *a, **k: None, b)
    rows = torch.tensor([4, 1])
    assert torch.equal(mt._other(b.image_ids[rows]), b.mix.other_ids[rows])


def test_training_with_mixing_runs(tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe(
        tmp_path, run={"max_steps": 4}, eval={"val_split": ""},
        data={"train_images": 16, "test_images": 8,
              "augment": {"mixup": 0.4, "cutmix": 1.0, "mix_switch": 0.5}}))
    trainer = Trainer(recipe, console=lambda s: None)
    assert trainer.fit() == "max_steps"
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["type"] == "train")
