"""eval.protocol: COCO 5k and 1k-5fold Recall@K against plain loops on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch

import mmfw
from mmfw.eval.protocols import (
    FOLD_PREFIX,
    PROTOCOLS,
    evaluate_protocol,
    fold_recall,
    protocol_metrics,
)
from mmfw.eval.retrieval import KS, METRIC_KEYS, recall_at_k
from mmfw.spi.errors import RecipeError

FOLDS, FOLD = 5, 20


def plain_recall(img: torch.Tensor, txt: torch.Tensor, owner: list[int]) -> dict[str, float]:
    """Recall@K by the Karpathy rule, one query at a time."""
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt,
                                                                                    dim=-1).T
    out = {}
    for k in KS:
        hits = 0
        for i in range(img.shape[0]):
            ranked = sorted(range(txt.shape[0]), key=lambda j: -float(sim[i, j]))[:k]
            hits += any(owner[j] == i for j in ranked)
        out[f"i2t_R@{k}"] = 100.0 * hits / img.shape[0]
    for k in KS:
        hits = 0
        for j in range(txt.shape[0]):
            ranked = sorted(range(img.shape[0]), key=lambda i: -float(sim[i, j]))[:k]
            hits += owner[j] in ranked
        out[f"t2i_R@{k}"] = 100.0 * hits / txt.shape[0]
    out["rsum"] = sum(out[k] for k in METRIC_KEYS[:-1])
    return out


@pytest.fixture(scope="module")
def embeddings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """100 images, 1-3 captions each (captions of one image not adjacent), near their image
    so recall is neither 0 nor 100."""
    g = torch.Generator().manual_seed(0)
    n = FOLDS * FOLD
    img = torch.randn(n, 16, generator=g)
    counts = torch.randint(1, 4, (n,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    owner = owner[torch.randperm(len(owner), generator=g)]
    txt = img[owner] + 1.2 * torch.randn(len(owner), 16, generator=g)
    return img, txt, owner


def test_fold_mean_equals_a_plain_loop_over_folds(embeddings) -> None:
    img, txt, owner = embeddings
    got = fold_recall(img, txt, owner, folds=FOLDS, fold_size=FOLD)
    expected = {k: 0.0 for k in METRIC_KEYS}
    for f in range(FOLDS):
        lo, hi = f * FOLD, (f + 1) * FOLD
        caps = [j for j in range(len(owner)) if lo <= int(owner[j]) < hi]
        part = plain_recall(img[lo:hi], txt[caps], [int(owner[j]) - lo for j in caps])
        for k in METRIC_KEYS:
            expected[k] += part[k] / FOLDS
    assert set(got) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k
    # folds rank among 20 images, not 100: recall is higher than on the whole set
    assert got["rsum"] > recall_at_k(img, txt, owner)["rsum"]
    assert 0 < got["i2t_R@1"] < 100


def test_protocol_keys_keep_the_main_keys(embeddings) -> None:
    img, txt, owner = embeddings
    whole = recall_at_k(img, txt, owner)
    assert protocol_metrics("karpathy", img, txt, owner) == whole
    assert protocol_metrics("coco-5k", img, txt, owner, fold_size=FOLD) == whole
    both = protocol_metrics("coco-1k-5fold", img, txt, owner, fold_size=FOLD)
    assert {k: both[k] for k in METRIC_KEYS} == whole  # the main keys: the 5k numbers
    folds = fold_recall(img, txt, owner, fold_size=FOLD)
    assert {k: both[FOLD_PREFIX + k] for k in METRIC_KEYS} == folds
    assert set(both) == {*METRIC_KEYS, *(FOLD_PREFIX + k for k in METRIC_KEYS)}


def test_coco_protocols_refuse_a_split_of_another_size(embeddings) -> None:
    img, txt, owner = embeddings
    keep = owner < 99  # 99 images: one short of 5 folds of 20
    for protocol in PROTOCOLS[1:]:
        with pytest.raises(RecipeError, match=r"99 images.*5 x eval.fold_size = 100") as err:
            protocol_metrics(protocol, img[:99], txt[keep], owner[keep], fold_size=FOLD)
        assert err.value.key == "eval.protocol"


def test_recipe_keys_validated(tmp_path) -> None:
    from helpers import tiny_recipe

    r = mmfw.load_recipe(tiny_recipe(tmp_path, eval={"protocol": "coco-1k-5fold",
                                                     "fold_size": 4}))
    assert (r.eval.protocol, r.eval.fold_size) == ("coco-1k-5fold", 4)
    with pytest.raises(RecipeError, match="coco-1k-5fold") as err:
        mmfw.load_recipe(tiny_recipe(tmp_path, eval={"protocol": "coco1k"}))
    assert "eval.protocol" in str(err.value)


def test_evaluate_protocol_on_a_real_split() -> None:
    """The model path: a tiny dual encoder on the synthetic set, 5 folds of 4 images, equal to
    recall_at_k / fold_recall on the same embeddings."""
    from helpers import tiny_recipe
    from mmfw.eval.retrieval import embed_split
    from mmfw.model import build_model

    r = mmfw.load_recipe(tiny_recipe("/nonexistent"))
    model = build_model(r.model)
    split = mmfw.create("dataset", "synthetic", test_images=20, image_size=16).split("test")
    model.text.prepare([c for i in range(len(split)) for c in split.captions(i)])
    got = evaluate_protocol(model, split, protocol="coco-1k-5fold", fold_size=4)
    img, txt, owner = embed_split(model, split)
    assert got == protocol_metrics("coco-1k-5fold", img, txt, owner, fold_size=4)
    with pytest.raises(RecipeError, match="whole split"):
        evaluate_protocol(model, split, protocol="coco-5k", fold_size=4, rerank_top_k=5)
