"""The loss catalogue: properties every loss must have, and plain-loop reference values.

Inputs are drawn as a pool of random directions (so rows repeat: identical rows, duplicate ids)
scaled to per-row norms over many orders of magnitude. All losses here are defined for a batch of
one row (covariance and variance divide by ``max(B - 1, 1)``), so batches start at 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfw
from mmfw.errors import RecipeError

NEW = ["siglip", "simple_contrastive", "memory_queue", "hard_negative", "decorrelation", "vicreg",
       "barlow_twins", "supcon", "ntxent", "distillation", "mixture", "spectral", "alignment"]
#: losses that L2-normalise (or standardise) their inputs: invariant to positive rescaling
SCALE_FREE = {"siglip", "simple_contrastive", "memory_queue", "hard_negative", "supcon", "ntxent",
              "distillation", "barlow_twins"}
MIXTURE_TERMS = [{"name": "infonce"}, {"name": "decorrelation", "weight": 0.2}]

fast = settings(max_examples=25, deadline=None)


def make(name: str, **options):
    if name == "mixture":
        options.setdefault("terms", MIXTURE_TERMS)
    return mmfw.create("loss", name, **options)


def context(name: str, image: torch.Tensor, text: torch.Tensor) -> dict:
    """The distillation teacher: a fixed function of the inputs, so it permutes and swaps."""
    if name != "distillation":
        return {}
    return {"teacher_image": image.detach().flip(1) + 0.5 * image.detach(),
            "teacher_text": text.detach().flip(1) + 0.5 * text.detach()}


def run(loss, name, image, text, ids=None, tids=None):
    ctx = context(name, image, text)
    return loss(image, text, image_ids=ids, text_ids=tids, **ctx)


def prepared(name: str, dim: int, seed: int = 0, **options):
    """A loss ready for property tests: a memory queue gets a prefilled, frozen queue (or, in
    global mode, bank); a prototypical loss a clustering of ids that the drawn batches partly
    have (every 21st id up to 2100: some matched ids, lone texts and lone images have a
    cluster, others none).

    The prefill puts the same rows and ids in both queues, so the swap test still applies.
    """
    loss = make(name, **options)
    if name == "memory_queue":
        g = torch.Generator().manual_seed(seed)
        fill = torch.randn(5, dim, generator=g)
        ids = torch.arange(5) % 3  # ids that also occur in the drawn batches
        if loss.active == "global":
            loss.fill_bank(fill, ids, fill, ids)
        else:
            loss(fill, fill, image_ids=ids, text_ids=ids)
        loss.eval()  # no enqueueing: every call sees the same queue
    if name == "prototypical":
        g = torch.Generator().manual_seed(seed)
        ids = torch.arange(0, 2100, 21)
        loss.cluster(torch.randn(len(ids), dim, generator=g), ids, epoch=0)
    return loss


@st.composite
def batches(draw, min_b=1, max_b=64, min_d=1, max_d=128, lo=-6.0, hi=6.0, distinct=False):
    """``(image, text, image_ids, text_ids)``; rows drawn from a small pool repeat exactly."""
    b, d = draw(st.integers(min_b, max_b)), draw(st.integers(min_d, max_d))
    pool = b if distinct else draw(st.integers(1, b))
    n_ids = draw(st.integers(1, b))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dirs = torch.randn(2 * pool, d, generator=g)
    rows = torch.randint(0, pool, (b,), generator=g) if not distinct else torch.arange(b)
    norms = 10 ** (lo + (hi - lo) * torch.rand(2, b, 1, generator=g))
    image = dirs[rows] / dirs[rows].norm(dim=1, keepdim=True).clamp_min(1e-12) * norms[0]
    text = dirs[pool + rows] / dirs[pool + rows].norm(dim=1, keepdim=True).clamp_min(1e-12)
    text = text * norms[1]
    ids = torch.randint(0, n_ids, (b,), generator=g)
    return image, text, ids, ids[torch.randperm(b, generator=g)]


def assert_finite_step(loss, out, image, text) -> None:
    """A scalar, finite loss and terms, and finite gradients everywhere after backward."""
    assert out.loss.shape == ()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v).all() for v in out.terms.values())
    out.loss.backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    for p in loss.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


# ---- properties ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
@fast
@given(data=st.data())
def test_finite_loss_and_gradients(name, data):
    # the raw-scale losses (decorrelation, vicreg) pass too: squared covariances of 1e6-norm
    # rows are ~1e24, still inside float32's range
    image, text, ids, tids = data.draw(batches(lo=-6.0, hi=6.0))
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss = prepared(name, image.shape[1])
    out = run(loss, name, image, text, ids, tids)
    assert_finite_step(loss, out, image, text)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", NEW)
@fast
@given(data=st.data())
def test_row_permutation_invariance(name, data):
    image, text, ids, tids = data.draw(batches(lo=-2.0, hi=2.0))
    b = image.shape[0]
    p, q = torch.randperm(b), torch.randperm(b)
    loss = prepared(name, image.shape[1])
    a = run(loss, name, image, text, ids, tids).loss
    c = run(loss, name, image[p], text[q], ids[p], tids[q]).loss
    close(a, c)


@pytest.mark.parametrize("name", sorted(SCALE_FREE))
@fast
@given(data=st.data(), e1=st.floats(-3, 3), e2=st.floats(-3, 3))
def test_positive_rescaling_invariance(name, data, e1, e2):
    if name == "barlow_twins":  # standardising is scale-free while the variance >> eps
        image, text, ids, tids = data.draw(batches(lo=0.0, hi=1.0, min_d=2, distinct=True))
        e1, e2 = abs(e1) / 2, abs(e2) / 2
    else:
        image, text, ids, tids = data.draw(batches())
    loss = prepared(name, image.shape[1])
    a = run(loss, name, image, text, ids, tids).loss
    # the distillation teacher is its own input: scale only the student's embeddings
    ctx = context(name, image, text)
    c = loss(image * 10**e1, text * 10**e2, image_ids=ids, text_ids=tids, **ctx).loss
    torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", NEW)
@fast
@given(data=st.data())
def test_symmetric_under_swapping_modalities(name, data):
    image, text, ids, tids = data.draw(batches(lo=-2.0, hi=2.0))
    loss = prepared(name, image.shape[1])
    a = run(loss, name, image, text, ids, tids).loss
    c = run(loss, name, text, image, tids, ids).loss
    close(a, c)


@pytest.mark.parametrize("name", NEW)
@fast
@given(data=st.data())
def test_unique_ids_equal_the_single_positive_form(name, data):
    image, text, _, _ = data.draw(batches(lo=-2.0, hi=2.0))
    b = image.shape[0]
    ids = torch.randperm(b) * 7 + 100  # unique, arbitrary values, same on both sides
    loss = prepared(name, image.shape[1])
    a = run(loss, name, image, text, ids, ids).loss
    c = run(loss, name, image, text).loss
    close(a, c)


@pytest.mark.parametrize("name", [n for n in NEW if n != "decorrelation"])
@pytest.mark.parametrize("seed", [0, 1])
def test_aligned_batch_scores_lower_than_shuffled(name, seed):
    """Decorrelation is left out: it ignores the pairing by design."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(8, 32, generator=g)
    teacher = {"teacher_image": image, "teacher_text": image} if name == "distillation" else {}
    aligned = make(name)(image, image.clone(), **teacher).loss
    shuffled = make(name)(image, image.roll(1, 0), **teacher).loss
    assert aligned < shuffled


def test_every_loss_is_registered_with_the_public_option_names():
    assert set(NEW) | {"infonce"} <= set(mmfw.available("loss"))
    fields = {n: {f.name for f in mmfw.registry.options_class("loss", n).__attrs_attrs__}
              for n in NEW}
    for n in ("siglip", "simple_contrastive", "memory_queue", "hard_negative", "supcon", "ntxent"):
        assert {"temperature", "learn_temperature"} <= fields[n], n
    assert {"bias", "learn_bias"} <= fields["siglip"]
    assert {"mining", "factor", "margin"} <= fields["hard_negative"]
    assert {"size"} <= fields["memory_queue"]
    assert {"sim_weight", "var_weight", "cov_weight"} <= fields["vicreg"]
    assert {"temperature", "student_temperature", "alpha"} <= fields["distillation"]
    defaults = {("siglip", "temperature"): 0.1, ("siglip", "bias"): -10.0,
                ("vicreg", "sim_weight"): 25.0, ("vicreg", "var_weight"): 25.0,
                ("vicreg", "cov_weight"): 1.0, ("barlow_twins", "lambd"): 0.0051,
                ("memory_queue", "size"): 4096, ("ntxent", "temperature"): 0.5,
                ("supcon", "temperature"): 0.07, ("distillation", "temperature"): 2.0}
    for (n, key), value in defaults.items():
        assert getattr(make(n).options, key) == value


# ---- batches as the engine sends them ---------------------------------------------------------
#
# The engine's batch holds each image once and every caption drawn for it, so Bi <= Bt with the
# image ids a subset of the text ids; a dropped bad item leaves rows whose id matches nothing on
# the other side (captions without their image, an image without its captions). Every loss in
# the registry is drawn here except:
#   itm: it needs the fusion head's ``match(image_rows, text_rows)`` scorer in its context and
#        draws its negatives at random (torch.multinomial), so its value is no function of the
#        batch to compare under permutations; only finiteness is checked, with a toy scorer
#        (test_itm_is_finite_on_engine_batches).
# distillation needs ``teacher_image`` / ``teacher_text``: ``context`` above builds them from the
# batch's own rows ([Bi, D] and [Bt, D]), so it is drawn like the others.

#: label -> (loss name, options); infonce is also drawn with label smoothing
ENGINE_SKIP = {"itm"}
ENGINE = {n: (n, {}) for n in sorted(set(mmfw.available("loss")) - ENGINE_SKIP)}
ENGINE["infonce+smoothing"] = ("infonce", {"label_smoothing": 0.1})
ENGINE["prototypical"] = ("prototypical", {"clusters": (3, 8)})  # small: one k-means each draw
ENGINE["memory_queue+global"] = ("memory_queue", {"mode": "global"})
ENGINE["memory_queue+batch"] = ("memory_queue", {"mode": "batch"})
ENGINE["alignment+cosine"] = ("alignment", {"metric": "cosine"})
LOSS = "<loss>"  # stands for the total in the tables below

#: terms an added text whose id no image has leaves exactly as they were. The t2i terms are means
#: over text anchors with a positive, and their candidates are the images: the new text is not
#: an anchor (no positive) and no candidate (label smoothing spreads over the Bi images only).
#: Pair terms (mse, invariance, Barlow's whole loss) only see positive pairs; SigLIP's ``pos``
#: sums positive pairs over Bi, which the text does not change. Left out: decorrelation (ids play
#: no part: every row enters the covariance), ntxent (the new row is a candidate of every
#: anchor, both modalities), distillation (the hard part is reported only as the sum of both
#: directions, and the soft KL covers every row), the i2t terms (the text is a new negative of
#: every image), vicreg's variance / covariance and simple_contrastive's decor (all rows).
#: Spectral's ``pos`` and alignment's whole loss are means over positive pairs; spectral's
#: ``neg`` gains pairs. Prototypical's ``proto`` is left out: a row whose image was dropped
#: still has its cluster (its id is a training image), so it is one more pulled row.
KEEP_WITH_UNMATCHED_TEXT = {
    "infonce": ("t2i",), "infonce+smoothing": ("t2i",), "supcon": ("t2i",),
    "memory_queue": ("t2i",), "hard_negative": ("t2i",), "simple_contrastive": ("t2i", "mse"),
    "mixture": ("infonce.t2i",), "vicreg": ("invariance",),
    "barlow_twins": ("on_diag", "off_diag", LOSS), "siglip": ("pos",),
    "memory_queue+global": ("t2i",), "memory_queue+batch": ("t2i",), "prototypical": ("t2i",),
    "spectral": ("pos",), "alignment": ("cos", LOSS), "alignment+cosine": ("cos", LOSS),
}
#: the same for an added image whose id no text has, with the directions exchanged. SigLIP is
#: left out: it divides by Bi, which the image changes (``pos * Bi`` stays; not asserted).
KEEP_WITH_UNMATCHED_IMAGE = {
    "infonce": ("i2t",), "infonce+smoothing": ("i2t",), "supcon": ("i2t",),
    "memory_queue": ("i2t",), "hard_negative": ("i2t",), "simple_contrastive": ("i2t", "mse"),
    "mixture": ("infonce.i2t",), "vicreg": ("invariance",),
    "barlow_twins": ("on_diag", "off_diag", LOSS),
    "memory_queue+global": ("i2t",), "memory_queue+batch": ("i2t",), "prototypical": ("i2t",),
    "spectral": ("pos",), "alignment": ("cos", LOSS), "alignment+cosine": ("cos", LOSS),
}
#: the losses whose state the property tests prefill (``prepared``)
STATEFUL = {"memory_queue", "prototypical"}


def engine_loss(label: str, dim: int):
    name, options = ENGINE[label]
    return prepared(name, dim, **options) if name in STATEFUL else make(name, **options)


def engine_run(loss, label, image, text, ids, tids):
    return run(loss, ENGINE[label][0], image, text, ids, tids)


@st.composite
def engine_batches(draw, max_images=8, max_captions=3, max_unmatched=3, max_d=16, lo=-1.0,
                   hi=1.0):
    """``(image, text, image_ids, text_ids)``: unique image ids, 1..``max_captions`` captions
    per image, then 0..``max_unmatched`` captions of a dropped image (ids no image has, possibly
    shared) and images whose captions were dropped (ids no text has); rows shuffled on each
    side. Both sides have at least one row; a batch may have no positive pair at all."""
    n_matched = draw(st.integers(0, max_images))
    per_image = draw(st.lists(st.integers(1, max_captions), min_size=n_matched,
                              max_size=n_matched))
    dropped = n_matched == 0 or draw(st.booleans())  # clean batches half the time
    least = 1 if n_matched == 0 else 0
    lone_texts = draw(st.integers(least, max_unmatched)) if dropped else 0
    lone_images = draw(st.integers(least, max_unmatched)) if dropped else 0
    d = draw(st.integers(1, max_d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    matched = torch.randperm(1000, generator=g)[:n_matched]
    ids = torch.cat([matched, 2000 + torch.arange(lone_images)])
    tids = torch.cat([matched.repeat_interleave(torch.tensor(per_image, dtype=torch.long)),
                      1000 + torch.randint(0, max(lone_texts, 1), (lone_texts,), generator=g)])
    ids, tids = ids[torch.randperm(len(ids), generator=g)], tids[torch.randperm(len(tids),
                                                                                  generator=g)]

    def rows(n):
        x = torch.randn(n, d, generator=g)
        norms = 10 ** (lo + (hi - lo) * torch.rand(n, 1, generator=g))
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms

    return rows(len(ids)), rows(len(tids)), ids, tids


def tight(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", sorted(ENGINE))
@fast
@given(data=st.data())
def test_finite_loss_and_gradients_on_engine_batches(label, data):
    image, text, ids, tids = data.draw(engine_batches(lo=-6.0, hi=6.0))
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss = engine_loss(label, image.shape[1])
    out = engine_run(loss, label, image, text, ids, tids)
    assert_finite_step(loss, out, image, text)


@fast
@given(data=st.data())
def test_itm_is_finite_on_engine_batches(data):
    image, text, ids, tids = data.draw(engine_batches(lo=-6.0, hi=6.0))
    image.requires_grad_(True)
    text.requires_grad_(True)
    head = torch.nn.Bilinear(image.shape[1], text.shape[1], 1)

    def match(ri, rt):  # a toy fusion head: one logit per (image row, text row) pair
        return head(image[ri], text[rt]).squeeze(1)

    with torch.random.fork_rng():  # its negatives are drawn from the global generator
        torch.manual_seed(0)
        out = make("itm")(image, text, image_ids=ids, text_ids=tids, match=match)
    assert torch.isfinite(out.loss) and torch.isfinite(out.terms["accuracy"])
    out.loss.backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


@pytest.mark.parametrize("label", sorted(ENGINE))
@fast
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_engine_batch_permutation_invariance(label, data, seed):
    """Image rows permuted with their ids, text rows (independently) with theirs."""
    image, text, ids, tids = data.draw(engine_batches())
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randperm(len(image), generator=g), torch.randperm(len(text), generator=g)
    loss = engine_loss(label, image.shape[1])
    a = engine_run(loss, label, image, text, ids, tids)
    c = engine_run(loss, label, image[p], text[q], ids[p], tids[q])
    tight(a.loss, c.loss)
    for k in a.terms:
        tight(a.terms[k], c.terms[k])


@pytest.mark.parametrize("label", sorted(ENGINE))
@fast
@given(data=st.data())
def test_engine_batch_symmetric_under_swapping_modalities(label, data):
    image, text, ids, tids = data.draw(engine_batches())
    loss = engine_loss(label, image.shape[1])
    a = engine_run(loss, label, image, text, ids, tids).loss
    c = engine_run(loss, label, text, image, tids, ids).loss
    if label == "siglip":  # sum over all pairs / Bi: the swapped batch divides by Bt
        a, c = a * len(image), c * len(text)
    tight(a, c)


def with_unmatched(x, x_ids, k, fresh, g, shared):
    """``x`` with ``k`` new rows whose ids (``fresh`` on) match nothing, rows shuffled."""
    new_ids = fresh + (torch.randint(0, k, (k,), generator=g) if shared else torch.arange(k))
    rows = torch.randn(k, x.shape[1], generator=g) * x.norm(dim=1).mean()
    order = torch.randperm(len(x) + k, generator=g)
    return torch.cat([x, rows])[order], torch.cat([x_ids, new_ids])[order]


def terms_of(out):
    return {LOSS: out.loss, **out.terms}


@pytest.mark.parametrize(("label", "side"), [
    *((n, "text") for n in sorted(KEEP_WITH_UNMATCHED_TEXT)),
    *((n, "image") for n in sorted(KEEP_WITH_UNMATCHED_IMAGE))])
@fast
@given(data=st.data(), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_rows_without_a_positive_leave_the_anchor_means_alone(label, side, data, k, seed):
    """Adding unmatched rows on one ``side`` leaves the terms that average over anchors with a
    positive, or over positive pairs, unchanged (tables above say which, and why)."""
    image, text, ids, tids = data.draw(engine_batches())
    g = torch.Generator().manual_seed(seed)
    fresh = int(torch.cat([ids, tids]).max()) + 1
    loss = engine_loss(label, image.shape[1])
    before = terms_of(engine_run(loss, label, image, text, ids, tids))
    if side == "text":  # captions of a dropped image: they may share their id
        text, tids = with_unmatched(text, tids, k, fresh, g, shared=True)
        keep = KEEP_WITH_UNMATCHED_TEXT[label]
    else:  # images whose captions were dropped: one row per image, as the engine batches them
        image, ids = with_unmatched(image, ids, k, fresh, g, shared=False)
        keep = KEEP_WITH_UNMATCHED_IMAGE[label]
    after = terms_of(engine_run(loss, label, image, text, ids, tids))
    for key in keep:
        tight(after[key], before[key])


def toy_context(name, image, text):
    if name == "itm":
        return {"match": lambda ri, rt: (image[ri] * text[rt]).sum(1)}
    return context(name, image, text)


@pytest.mark.parametrize("name", mmfw.available("loss"))
def test_unequal_batches_without_ids_are_a_value_error(name):
    """No loss pairs row i with row i except through the contract's rule: with Bi != Bt and no
    ids (or only one side's ids) the pairing is undefined, which must be a ValueError, not a
    shape or index error. Decorrelation ignores the pairing and is defined for any Bi, Bt."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    loss = make(name)
    ctx = toy_context(name, image, text)
    for ids in ({}, {"image_ids": torch.arange(3)}, {"text_ids": torch.arange(5)}):
        if name == "decorrelation":
            assert torch.isfinite(loss(image, text, **ids, **ctx).loss)
        else:
            with pytest.raises(ValueError, match=r"batches differ|both image_ids"):
                loss(image, text, **ids, **ctx)


def test_supcon_labels_with_unequal_batches():
    """One labels tensor needs Bi == Bt (it labels both sides): a clear ValueError; a pair of
    tensors is the multi-caption form, and agrees with the ids form."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    li, lt = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 2, 7])  # text 4: no image
    loss = make("supcon")
    with pytest.raises(ValueError, match="equal batches"):
        loss(image, text, labels=li)
    got = loss(image, text, labels=(li, lt))
    torch.testing.assert_close(got.loss, loss(image, text, image_ids=li, text_ids=lt).loss)


def test_distillation_teacher_of_the_wrong_shape_is_a_value_error():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    ids, tids = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 2, 2])
    loss = make("distillation")
    with pytest.raises(ValueError, match="teacher similarities"):
        loss(image, text, image_ids=ids, text_ids=tids, teacher_logits=torch.randn(3, 3))
    out = loss(image, text, image_ids=ids, text_ids=tids, teacher_logits=torch.randn(3, 5))
    assert torch.isfinite(out.loss)


# ---- memory queue ----------------------------------------------------------------------------

@fast
@given(size=st.integers(1, 12), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_queue_is_bounded_and_fifo(size, sizes):
    loss = make("memory_queue", size=size)
    history, id_history = [], []
    for k, b in enumerate(sizes):
        image = torch.randn(b, 4)
        ids = torch.arange(b) + 100 * k
        loss(image, image + 1, image_ids=ids, text_ids=ids)
        history.append(torch.nn.functional.normalize(image, dim=-1))
        id_history.append(ids)
        feats, qids = loss.image_queue.contents()
        assert len(feats) == int(loss.image_queue.count) <= size
        expect = torch.cat(history)[-size:]
        torch.testing.assert_close(feats, expect)
        assert torch.equal(qids, torch.cat(id_history)[-size:])


def test_queued_copy_of_a_positive_is_never_a_negative():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    same = torch.tensor([5, 5])
    fresh = make("memory_queue")(image, text, image_ids=same, text_ids=same).loss

    queued = make("memory_queue")
    queued(image[:1], text[:1], image_ids=same[:1], text_ids=same[:1])  # enqueue id 5 copies
    assert int(queued.text_queue.count) == 1
    masked = queued(image, text, image_ids=same, text_ids=same).loss
    torch.testing.assert_close(masked, fresh)  # the same-id entry changed nothing

    other = make("memory_queue")
    other(image[:1], text[:1], image_ids=torch.tensor([7]), text_ids=torch.tensor([7]))
    as_negative = other(image, text, image_ids=same, text_ids=same).loss
    assert as_negative > fresh + 1e-3  # the same rows as a negative would have raised the loss


def test_queue_survives_a_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    loss = make("memory_queue", size=6)
    for k in range(3):
        x = torch.randn(4, 5)
        loss(x, x.flip(1), image_ids=torch.arange(4) + k, text_ids=torch.arange(4) + k)
    save_file({k: v.contiguous() for k, v in loss.state_dict().items()}, tmp_path / "q.st")
    for restored in (make("memory_queue", size=6), make("memory_queue", size=6, dim=5)):
        restored.load_state_dict(load_file(tmp_path / "q.st"))
        for q, r in ((loss.image_queue, restored.image_queue), (loss.text_queue,
                                                                 restored.text_queue)):
            for a, b in zip(q.contents(), r.contents()):
                assert torch.equal(a, b)
            assert int(q.ptr) == int(r.ptr) and int(q.count) == int(r.count)
        x = torch.randn(3, 5)
        ids = torch.tensor([1, 2, 9])
        torch.testing.assert_close(loss.eval()(x, x, image_ids=ids, text_ids=ids).loss,
                                   restored.eval()(x, x, image_ids=ids, text_ids=ids).loss)


def test_queue_does_not_grow_in_eval_mode():
    loss = make("memory_queue").eval()
    loss(torch.randn(3, 4), torch.randn(3, 4))
    assert int(loss.image_queue.count) == 0


# ---- mixture and distillation errors ---------------------------------------------------------

def test_mixture_reports_terms_and_owns_sub_losses():
    loss = make("mixture", terms=[{"name": "infonce"}, {"name": "infonce", "temperature": 0.1},
                                  {"name": "decorrelation", "weight": 0.2}])
    assert len(list(loss.parameters())) == 2  # both learnable temperatures reach the optimizer
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    out = loss(x, y)
    assert {"infonce[0]", "infonce[1]", "infonce[0].i2t", "decorrelation",
            "decorrelation.vision"} <= set(out.terms)
    expect = out.terms["infonce[0]"] + out.terms["infonce[1]"] + 0.2 * out.terms["decorrelation"]
    torch.testing.assert_close(out.loss, expect)


@pytest.mark.parametrize(("terms", "key"), [
    ([{"name": "infonce"}, {"name": "decorelation"}], "terms[1].name"),
    ([{"name": "infonce"}, {"name": "infonce", "temperatur": 0.1}], "terms[1].temperatur"),
    ([{"name": "infonce", "temperature": "hot"}], "terms[0].temperature"),
    ([{"weight": 1.0}], "terms[0].name"),
    ([], "terms"),
])
def test_mixture_errors_name_the_term(terms, key):
    with pytest.raises(RecipeError) as err:
        make("mixture", terms=terms)
    assert err.value.key == key
    if key == "terms[1].name":
        assert "decorrelation" in str(err.value)  # the close match is suggested


def test_mixture_error_in_a_recipe_has_the_full_key_path(write_recipe):
    from tests.helpers import TINY

    recipe = {**TINY, "loss": {"name": "mixture", "terms": [
        {"name": "infonce"}, {"name": "infonce", "temperatur": 0.1}]}}
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(write_recipe(recipe))
    assert err.value.key == "loss.terms[1].temperatur"


def test_distillation_without_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="teacher"):
        make("distillation")(torch.randn(3, 4), torch.randn(3, 4))


# ---- plain-loop references -------------------------------------------------------------------

B, D = 5, 3
IIDS, TIDS = [0, 0, 1, 2, 3], [0, 1, 1, 2, 4]  # repeated ids; image 3 and text 4 unmatched


def fixed(seed=0, b=B, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g) * 2, torch.randn(b, d, generator=g)


def unit(r):
    n = math.sqrt(sum(x * x for x in r))
    return [x / n for x in r]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def multi_ce(rows, pos):
    """Mean over rows with a positive of -mean_{p} log softmax(row)_p."""
    vals = []
    for row, p in zip(rows, pos):
        if any(p):
            z = lse(row)
            ps = [row[j] - z for j in range(len(row)) if p[j]]
            vals.append(-sum(ps) / len(ps))
    return sum(vals) / max(len(vals), 1)


def transpose(m):
    return [list(c) for c in zip(*m)]


def cov(rows):
    n, d = len(rows), len(rows[0])
    mu = [sum(r[a] for r in rows) / n for a in range(d)]
    return [[sum((r[a] - mu[a]) * (r[b] - mu[b]) for r in rows) / max(n - 1, 1)
             for b in range(d)] for a in range(d)]


def offdiag_sq(m):
    return sum(m[a][b] ** 2 for a in range(len(m)) for b in range(len(m)) if a != b)


def pos_mask(ii, tt):
    return [[a == b for b in tt] for a in ii]


def cos_logits(v, t, scale):
    v, t = [unit(r) for r in v], [unit(r) for r in t]
    return [[scale * dot(a, b) for b in t] for a in v]


def ref_infonce(v, t, ii, tt, tau):
    logits, pos = cos_logits(v, t, 1 / tau), pos_mask(ii, tt)
    return (multi_ce(logits, pos) + multi_ce(transpose(logits), transpose(pos))) / 2


def ref_siglip(v, t, ii, tt):
    logits, loss = cos_logits(v, t, 10.0), 0.0
    for i in range(len(v)):
        for j in range(len(t)):
            z = 1.0 if ii[i] == tt[j] else -1.0
            loss += math.log1p(math.exp(-z * (logits[i][j] - 10.0)))
    return loss / len(v)


def ref_decor(rows):
    return offdiag_sq(cov(rows))


def ref_simple(v, t, ii, tt):
    vn, tn = [unit(r) for r in v], [unit(r) for r in t]
    pairs = [(i, j) for i in range(len(v)) for j in range(len(t)) if ii[i] == tt[j]]
    mse = sum(sum((vn[i][a] - tn[j][a]) ** 2 for a in range(len(vn[0]))) for i, j in pairs)
    mse /= len(pairs)
    return ref_infonce(v, t, ii, tt, 0.1) + 0.5 * mse + 0.2 * (ref_decor(vn) + ref_decor(tn))


def ref_hard(v, t, ii, tt, mining, top_k=0, factor=2.0, margin=0.2, tau=0.07):
    def side(a, b, ia, ib):
        rows, pos = [], []
        for i, ra in enumerate(a):
            s = [dot(unit(ra), unit(rb)) for rb in b]
            p = [ia[i] == ib[j] for j in range(len(b))]
            sp = min([s[j] for j in range(len(b)) if p[j]], default=math.inf)
            negs = [j for j in range(len(b)) if not p[j]]
            if mining == "semi-hard":
                mined = {j for j in negs if sp - margin < s[j] < sp}
            elif top_k:
                mined = set(sorted(negs, key=lambda j: -s[j])[:top_k])
            else:
                mined = {j for j in negs if s[j] > sp - margin}
            bonus = [math.log(factor) if j in mined else 0.0 for j in range(len(b))]
            rows.append([s[j] / tau + bonus[j] for j in range(len(b))])
            pos.append(p)
        return multi_ce(rows, pos)

    return (side(v, t, ii, tt) + side(t, v, tt, ii)) / 2


def ref_vicreg(v, t, ii, tt):
    d = len(v[0])
    pairs = [(i, j) for i in range(len(v)) for j in range(len(t)) if ii[i] == tt[j]]
    inv = sum((v[i][a] - t[j][a]) ** 2 for i, j in pairs for a in range(d)) / (len(pairs) * d)

    def hinge(rows):
        c = cov(rows)
        return sum(max(0.0, 1 - math.sqrt(c[a][a] + 1e-4)) for a in range(d)) / d

    var = (hinge(v) + hinge(t)) / 2
    covariance = (ref_decor(v) + ref_decor(t)) / d
    return 25 * inv + 25 * var + covariance


def ref_barlow(v, t, ii, tt, lambd=0.0051, eps=1e-5):
    pairs = [(i, j) for i in range(len(v)) for j in range(len(t)) if ii[i] == tt[j]]
    n, d = len(pairs), len(v[0])

    def std(rows):
        out = [[0.0] * d for _ in rows]
        for a in range(d):
            mu = sum(r[a] for r in rows) / n
            sd = math.sqrt(sum((r[a] - mu) ** 2 for r in rows) / n + eps)
            for k, r in enumerate(rows):
                out[k][a] = (r[a] - mu) / sd
        return out

    za, zb = std([v[i] for i, _ in pairs]), std([t[j] for _, j in pairs])
    c = [[sum(za[k][a] * zb[k][b] for k in range(n)) / n for b in range(d)] for a in range(d)]
    return sum((1 - c[a][a]) ** 2 for a in range(d)) + lambd * offdiag_sq(c)


def ref_ntxent(v, t, ii, tt, tau=0.5):
    z, ids = [unit(r) for r in v + t], ii + tt
    rows, pos = [], []
    for a in range(len(z)):
        rows.append([dot(z[a], z[b]) / tau for b in range(len(z)) if b != a])
        pos.append([ids[a] == ids[b] for b in range(len(z)) if b != a])
    return multi_ce(rows, pos)


def kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) for one row."""
    zp, zq = lse(p_logits), lse(q_logits)
    return sum(math.exp(p - zp) * ((p - zp) - (q - zq)) for p, q in zip(p_logits, q_logits))


def ref_distillation(v, t, ii, tt, teacher, T=2.0, alpha=0.5, tau=0.07):
    s = cos_logits(v, t, 1 / tau)
    soft_i = sum(kl([x / T for x in u], [x / T for x in r]) for u, r in zip(teacher, s)) / len(s)
    st_, ut = transpose(s), transpose(teacher)
    soft_t = sum(kl([x / T for x in u], [x / T for x in r]) for u, r in zip(ut, st_)) / len(st_)
    return alpha * ref_infonce(v, t, ii, tt, tau) + (1 - alpha) * T * T * (soft_i + soft_t) / 2


def ids_t():
    return torch.tensor(IIDS), torch.tensor(TIDS)


def as_lists(*xs):
    return [x.tolist() for x in xs]


def check(value, expected):
    torch.testing.assert_close(value.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "ref"), [
    ("siglip", ref_siglip), ("simple_contrastive", ref_simple), ("vicreg", ref_vicreg),
    ("barlow_twins", ref_barlow), ("ntxent", ref_ntxent),
    ("decorrelation", lambda v, t, ii, tt: ref_decor(v) + ref_decor(t)),
    ("mixture", lambda v, t, ii, tt: ref_infonce(v, t, ii, tt, 0.07)
     + 0.2 * (ref_decor(v) + ref_decor(t))),
])
def test_matches_reference(name, ref):
    v, t = fixed()
    check(make(name)(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1]).loss,
          ref(*as_lists(v, t), IIDS, TIDS))


@pytest.mark.parametrize(("mining", "top_k"), [("hard", 0), ("hard", 2), ("semi-hard", 0)])
def test_hard_negative_matches_reference(mining, top_k):
    v, t = fixed(3, b=6, d=2)  # d=2: many negatives fall in the mining windows
    ii, tt = [0, 0, 1, 2, 3, 4], [0, 1, 1, 2, 4, 5]
    loss = make("hard_negative", mining=mining, top_k=top_k)
    out = loss(v, t, image_ids=torch.tensor(ii), text_ids=torch.tensor(tt))
    assert float(out.terms["mined"]) > 0
    check(out.loss, ref_hard(*as_lists(v, t), ii, tt, mining, top_k))


def test_supcon_with_labels_matches_reference():
    v, t = fixed(1)
    li, lt = [0, 1, 0, 2, 1], [1, 0, 0, 2, 2]
    out = make("supcon")(v, t, labels=(torch.tensor(li), torch.tensor(lt))).loss
    check(out, ref_infonce(*as_lists(v, t), li, lt, 0.07))  # SupCon L_out, cross-modal
    single = make("supcon")(v, t, labels=torch.tensor(li)).loss
    check(single, ref_infonce(*as_lists(v, t), li, li, 0.07))
    check(make("supcon")(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1]).loss,
          ref_infonce(*as_lists(v, t), IIDS, TIDS, 0.07))


def test_distillation_matches_reference():
    v, t = fixed(2)
    ti, tt = fixed(4, d=6)
    teacher = cos_logits(*as_lists(ti, tt), 1 / 0.07)
    loss = make("distillation")
    got = loss(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1], teacher_image=ti, teacher_text=tt)
    check(got.loss, ref_distillation(*as_lists(v, t), IIDS, TIDS, teacher))
    logits = torch.randn(B, B)
    got = loss(v, t, teacher_logits=logits).loss
    check(got, ref_distillation(*as_lists(v, t), list(range(B)), list(range(B)),
                                logits.tolist()))


def test_memory_queue_matches_reference():
    v0, t0 = fixed(5, b=3)
    v, t = fixed(6)
    ids0 = [0, 3, 9]  # 0 and 3 are in the batch's ids: those queued rows are excluded
    loss = make("memory_queue", learn_temperature=False)
    loss(v0, t0, image_ids=torch.tensor(ids0), text_ids=torch.tensor(ids0))
    got = loss(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1]).loss

    def side(a, b, qb, ia, ib):
        rows, pos = [], []
        for i, ra in enumerate(a):
            row = [dot(unit(ra), unit(rb)) / 0.07 for rb in b]
            row += [dot(unit(ra), unit(q)) / 0.07 for q, qi in zip(qb, ids0) if qi != ia[i]]
            rows.append(row)
            pos.append([ia[i] == x for x in ib] + [False] * (len(row) - len(b)))
        return multi_ce(rows, pos)

    vl, tl, v0l, t0l = as_lists(v, t, v0, t0)
    expected = (side(vl, tl, t0l, IIDS, TIDS) + side(tl, vl, v0l, TIDS, IIDS)) / 2
    check(got, expected)
    assert int(loss.text_queue.count) == 3 + B


def test_ids_that_do_not_match_the_rows_are_a_value_error() -> None:
    """One id per row: a mismatch is named, never a shape or index error."""
    image, text = torch.randn(3, 8), torch.randn(5, 8)
    for name in ("infonce", "siglip", "vicreg", "barlow_twins", "supcon"):
        with pytest.raises(ValueError, match="one id per row"):
            mmfw.create("loss", name)(image, text, image_ids=torch.arange(4),
                                      text_ids=torch.arange(5))


# ---- the seeds' remaining catalogue: spectral, alignment, prototypical, global negatives -----

def ball(r, mu):
    n = math.sqrt(sum(x * x for x in r))
    return r if n < math.sqrt(mu) else [x / n * math.sqrt(mu) for x in r]


def ref_spectral(v, t, ii, tt, mu=1.0):
    """HaoChen et al. 2021, eq. 5 as the authors' code estimates it, positives by id."""
    f, g = [ball(r, mu) for r in v], [ball(r, mu) for r in t]
    pos, neg = [], []
    for i in range(len(f)):
        for j in range(len(g)):
            (pos if ii[i] == tt[j] else neg).append(dot(f[i], g[j]))
    attract = -2 * sum(pos) / max(len(pos), 1)
    repel = sum(x * x for x in neg) / max(len(neg), 1)
    return (attract + repel) / mu


def ref_alignment(v, t, ii, tt, metric):
    pairs = [(i, j) for i in range(len(v)) for j in range(len(t)) if ii[i] == tt[j]]
    if metric == "cosine":
        return sum(1 - dot(unit(v[i]), unit(t[j])) for i, j in pairs) / len(pairs)
    d = len(v[0])
    return sum((v[i][a] - t[j][a]) ** 2 for i, j in pairs for a in range(d)) / (len(pairs) * d)


@pytest.mark.parametrize("mu", [1.0, 4.0])
def test_spectral_matches_reference(mu):
    v, t = fixed(7)
    v[0] *= 0.1  # one row inside the ball: left as it is
    got = make("spectral", mu=mu)(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1])
    check(got.loss, ref_spectral(*as_lists(v, t), IIDS, TIDS, mu))
    check(got.terms["pos"] + got.terms["neg"], ref_spectral(*as_lists(v, t), IIDS, TIDS, mu))


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_alignment_matches_reference(metric):
    v, t = fixed(8)
    got = make("alignment", metric=metric)(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1])
    check(got.loss, ref_alignment(*as_lists(v, t), IIDS, TIDS, metric))


@fast
@given(data=st.data(), e1=st.floats(-3, 3), e2=st.floats(-3, 3))
def test_cosine_alignment_is_scale_free(data, e1, e2):
    image, text, ids, tids = data.draw(batches())
    loss = make("alignment", metric="cosine")
    a = loss(image, text, image_ids=ids, text_ids=tids).loss
    c = loss(image * 10**e1, text * 10**e2, image_ids=ids, text_ids=tids).loss
    torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4)


def ref_prototypical(v, t, ii, tt, protos, tau=0.2, weight=1.0):
    """ProtoNCE (Li et al. 2021, eq. 11) across modalities: instance InfoNCE plus, per
    granularity, -log softmax over all prototypes (each at its own concentration) of the row's
    cluster, averaged over the rows with a cluster and over the sides that have one.
    ``protos``: [(centroids, phi, {id: cluster})] per granularity."""
    def side(rows, ids):
        per_m, any_known = [], False
        for cents, phi, table in protos:
            vals = []
            for r, i in zip(rows, ids):
                if i in table:
                    logits = [dot(unit(r), unit(c)) / p for c, p in zip(cents, phi)]
                    vals.append(lse(logits) - logits[table[i]])
            any_known = any_known or bool(vals)
            per_m.append(sum(vals) / max(len(vals), 1))
        return sum(per_m) / len(per_m), any_known

    (pv, hv), (pt, ht) = side(v, ii), side(t, tt)
    proto = (pv * hv + pt * ht) / max(hv + ht, 1)
    return ref_infonce(v, t, ii, tt, tau) + weight * proto


def test_prototypical_matches_reference():
    v, t = fixed(9)
    g = torch.Generator().manual_seed(10)
    known = [0, 1, 2, 4]  # id 3 (image 3) has no cluster; text 4's id does
    sizes = [2, 3]
    cents = torch.randn(sum(sizes), D, generator=g)
    phi = torch.rand(sum(sizes), generator=g) * 0.3 + 0.05
    assign = torch.tensor([[0, 1, 1, 0], [2, 0, 1, 2]])
    loss = make("prototypical", clusters=(2, 3), proto_weight=0.7)
    loss.set_prototypes(torch.tensor(known), assign, cents, phi, torch.tensor(sizes), epoch=0)
    got = loss(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1])
    protos, start = [], 0
    for m, k in enumerate(sizes):
        protos.append((cents[start:start + k].tolist(), phi[start:start + k].tolist(),
                       {i: int(assign[m, n]) for n, i in enumerate(known)}))
        start += k
    check(got.loss, ref_prototypical(*as_lists(v, t), IIDS, TIDS, protos, weight=0.7))
    assert float(got.terms["proto"]) > 0
    # without ids, or before any clustering: the instance term alone
    check(make("prototypical")(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1]).loss,
          ref_infonce(*as_lists(v, t), IIDS, TIDS, 0.2))


def test_global_negatives_match_reference():
    """mode = "global": the bank's rows are extra candidates, same-id entries excluded."""
    v0, t0 = fixed(5, b=4)
    v, t = fixed(6)
    ids0 = [0, 3, 9, 11]
    loss = make("memory_queue", mode="global", learn_temperature=False)
    loss.fill_bank(v0, torch.tensor(ids0), t0, torch.tensor(ids0))
    got = loss(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1]).loss

    def side(a, b, qb, ia, ib):
        rows, pos = [], []
        for i, ra in enumerate(a):
            row = [dot(unit(ra), unit(rb)) / 0.07 for rb in b]
            row += [dot(unit(ra), unit(q)) / 0.07 for q, qi in zip(qb, ids0) if qi != ia[i]]
            rows.append(row)
            pos.append([ia[i] == x for x in ib] + [False] * (len(row) - len(b)))
        return multi_ce(rows, pos)

    vl, tl, v0l, t0l = as_lists(v, t, v0, t0)
    check(got, (side(vl, tl, t0l, IIDS, TIDS) + side(tl, vl, v0l, TIDS, IIDS)) / 2)
    assert int(loss.text_queue.count) == 0  # nothing is enqueued in global mode
    batch = make("memory_queue", mode="batch", learn_temperature=False)
    check(batch(v, t, image_ids=ids_t()[0], text_ids=ids_t()[1]).loss,
          ref_infonce(*as_lists(v, t), IIDS, TIDS, 0.07))
