"""``distributed.local_loss``: each rank's loss on its own rows of the global batch.

Under torchrun every rank sees the whole gathered batch and passes ``image_rows`` /
``text_rows``, its slice of it. DDP averages the ranks' gradients, so the mean over ranks of
the local losses, and its gradient wrt the global embeddings and the loss's parameters, must
equal the global loss's. Here the ranks are simulated in one process: one copy of the loss per
rank (as each rank holds its own), the same global tensors for all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfw
from mmfw_losses.memory_queue import MemoryQueue

#: (loss name, options): every loss that supports local rows, in the configurations that matter
CASES = {
    "infonce": ("infonce", {}),
    "infonce-smoothed": ("infonce", {"label_smoothing": 0.1}),
    "siglip": ("siglip", {}),
    "ntxent": ("ntxent", {"learn_temperature": True}),
    "hard_negative": ("hard_negative", {"learn_temperature": True, "factor": 3.0}),
    "hard_negative-top_k": ("hard_negative", {"learn_temperature": True, "top_k": 2}),
    "hard_negative-semi": ("hard_negative", {"learn_temperature": True, "mining": "semi-hard",
                                             "margin": 0.5}),
    "memory_queue": ("memory_queue", {}),
    "mixture": ("mixture", {"terms": [{"name": "infonce"}, {"name": "siglip", "weight": 0.5},
                                      {"name": "memory_queue", "weight": 0.25}]}),
}
SUPPORTED = {"infonce", "siglip", "ntxent", "hard_negative", "memory_queue"}

fast = settings(max_examples=30, deadline=None)


def make(case: str) -> torch.nn.Module:
    """The loss of ``case``; memory queues get a prefilled queue sharing ids with the batches."""
    name, options = CASES[case]
    loss = mmfw.create("loss", name, **options)
    g = torch.Generator().manual_seed(1)
    fill = torch.randn(5, 6, generator=g)
    for module in loss.modules():
        if isinstance(module, MemoryQueue):
            module(fill, fill.flip(0), image_ids=torch.arange(5), text_ids=torch.arange(5))
    return loss


@st.composite
def global_batches(draw, with_ids: bool = True):
    """``(image, text, image_ids, text_ids, ranks)``: a gathered batch of ``ranks`` equal shards.

    Ids repeat (an image id shared by several images, several captions per id), and some
    captions may have an id no image has, so ranks hold different numbers of anchors.
    """
    ranks = draw(st.sampled_from([2, 4]))
    per_i = draw(st.integers(1, 4))
    per_t = draw(st.integers(1, 6)) if with_ids else per_i
    bi, bt = ranks * per_i, ranks * per_t
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    image, text = torch.randn(bi, 6, generator=g), torch.randn(bt, 6, generator=g)
    if not with_ids:
        return image, text, None, None, ranks
    image_ids = torch.randint(0, draw(st.integers(1, bi)), (bi,), generator=g)
    text_ids = image_ids[torch.randint(0, bi, (bt,), generator=g)]
    unmatched = torch.rand(bt, generator=g) < draw(st.sampled_from([0.0, 0.3]))
    return image, text, image_ids, text_ids.masked_fill(unmatched, 1000), ranks


def shards(image: torch.Tensor, text: torch.Tensor, ranks: int) -> list[dict]:
    """Each rank's ``image_rows`` / ``text_rows``: equal, contiguous slices (as all_gather)."""
    ni, nt = len(image) // ranks, len(text) // ranks
    return [{"image_rows": slice(r * ni, (r + 1) * ni), "text_rows": slice(r * nt, (r + 1) * nt),
             "shards": ranks} for r in range(ranks)]


def averaged(loss, image, text, image_ids, text_ids, calls: list[dict]):
    """Mean loss over ``calls`` (one fresh copy of ``loss`` each, as one per rank) and the
    gradients of that mean: wrt the embeddings, and wrt each parameter summed over copies."""
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    copies = [copy.deepcopy(loss) for _ in calls]
    outs = [c(image, text, image_ids=image_ids, text_ids=text_ids, **rows)
            for c, rows in zip(copies, calls)]
    mean = sum(out.loss for out in outs) / len(calls)
    mean.backward()
    params = {name: sum(dict(c.named_parameters())[name].grad for c in copies)
              for name, _ in loss.named_parameters()}
    return mean.detach(), image.grad, text.grad, params, copies


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
@fast
@given(batch=global_batches())
def test_mean_of_local_losses_is_the_global_loss(case, batch):
    image, text, image_ids, text_ids, ranks = batch
    loss = make(case)
    assert loss.supports_local_loss
    want = averaged(loss, image, text, image_ids, text_ids, [{}])
    got = averaged(loss, image, text, image_ids, text_ids, shards(image, text, ranks))
    close(got[0], want[0])
    close(got[1], want[1])
    close(got[2], want[2])
    assert set(got[3]) == set(want[3]) and want[3]  # every case learns a temperature
    for name in want[3]:
        close(got[3][name], want[3][name])


@pytest.mark.parametrize("case", ["infonce", "siglip", "ntxent", "hard_negative",
                                  "memory_queue"])
@fast
@given(batch=global_batches(with_ids=False))
def test_without_ids_the_pairs_are_the_global_diagonal(case, batch):
    image, text, _, _, ranks = batch
    loss = make(case)
    want = averaged(loss, image, text, None, None, [{}])
    got = averaged(loss, image, text, None, None, shards(image, text, ranks))
    for a, b in zip(got[:3], want[:3]):
        close(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=10, deadline=None)
@given(batch=global_batches())
def test_all_rows_is_the_plain_call(case, batch):
    """Whole-batch slices give the plain call's values (infonce's plain call shares one
    product between both directions, so equal up to rounding)."""
    image, text, image_ids, text_ids, _ = batch
    loss = make(case).eval()  # no enqueueing: both calls see the same queue
    plain = loss(image, text, image_ids=image_ids, text_ids=text_ids)
    whole = loss(image, text, image_ids=image_ids, text_ids=text_ids, image_rows=slice(None),
                 text_rows=slice(None))
    torch.testing.assert_close(plain.loss, whole.loss, rtol=1e-6, atol=1e-6)
    assert plain.terms.keys() == whole.terms.keys()
    for key in plain.terms:
        torch.testing.assert_close(plain.terms[key], whole.terms[key], rtol=1e-6, atol=1e-6,
                                   msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rank_computes_its_own_rows(case):
    """A loss that ignored the rows would pass the tests above (every rank the global loss)."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(8, 6, generator=g), torch.randn(16, 6, generator=g)
    image_ids, text_ids = torch.arange(8), torch.arange(16) % 8
    loss = make(case).eval()
    plain = loss(image, text, image_ids=image_ids, text_ids=text_ids).loss
    local = [loss(image, text, image_ids=image_ids, text_ids=text_ids, **rows).loss
             for rows in shards(image, text, 2)]
    assert not torch.isclose(local[0], local[1]) and not torch.isclose(local[0], plain)
    close((local[0] + local[1]) / 2, plain)


def test_every_rank_enqueues_the_whole_batch():
    image, text = torch.randn(8, 6), torch.randn(12, 6)
    image_ids, text_ids = torch.arange(8) % 5, torch.arange(12) % 8
    loss = make("memory_queue")
    *_, (whole,) = averaged(loss, image, text, image_ids, text_ids, [{}])
    *_, ranks = averaged(loss, image, text, image_ids, text_ids, shards(image, text, 4))
    for rank in ranks:
        for mine, theirs in ((rank.image_queue, whole.image_queue),
                             (rank.text_queue, whole.text_queue)):
            for a, b in zip(mine.contents(), theirs.contents()):
                assert torch.equal(a, b)
    assert int(whole.text_queue.count) == 5 + 12


def test_a_rank_with_fewer_anchors_weighs_its_rows_like_the_global_mean():
    """Rank 0's captions all match, rank 1's none: each rank's loss is its sum over the
    global count, not its own mean (which would double rank 0's rows)."""
    image, text = torch.randn(2, 4), torch.randn(4, 4)
    image_ids, text_ids = torch.tensor([0, 1]), torch.tensor([0, 1, 7, 8])
    loss = make("infonce")
    rows = shards(image, text, 2)
    local = [loss(image, text, image_ids=image_ids, text_ids=text_ids, **r).terms["t2i"]
             for r in rows]
    plain = loss(image, text, image_ids=image_ids, text_ids=text_ids).terms["t2i"]
    assert local[1] == 0
    close((local[0] + local[1]) / 2, plain)


def test_losses_on_batch_statistics_do_not_claim_support():
    for name in mmfw.available("loss"):
        if name in SUPPORTED or name == "mixture":
            assert make(name).supports_local_loss, name
            continue
        if name == "itm":  # always per rank: it scores the rows its fusion tokens are of
            assert mmfw.create("loss", name).supports_local_loss
            continue
        loss = mmfw.create("loss", name)
        assert not getattr(loss, "supports_local_loss", False), name
    mixed = mmfw.create("loss", "mixture", terms=[{"name": "infonce"}, {"name": "vicreg"}])
    assert not mixed.supports_local_loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_unequal_shards_are_exact_too(case):
    """A rank's batch keeps one row per image, so under torchrun ranks can hold different
    numbers of image rows (8 and 7 of 15 here, texts 8 and 8): with ``shards`` the mean over
    ranks is still the global loss, with the same gradients."""
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(15, 6, generator=g), torch.randn(16, 6, generator=g)
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 13, 14])
    calls = [{"image_rows": slice(0, 8), "text_rows": slice(0, 8), "shards": 2},
             {"image_rows": slice(8, 15), "text_rows": slice(8, 16), "shards": 2}]
    loss = make(case)
    got = averaged(loss, image, text, image_ids, text_ids, calls)
    want = averaged(loss, image, text, image_ids, text_ids, [{}])
    for a, b in zip(got[:3], want[:3], strict=True):
        close(a, b)
    assert got[3].keys() == want[3].keys()
    for name in want[3]:
        close(got[3][name], want[3][name])
