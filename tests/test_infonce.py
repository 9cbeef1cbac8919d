"""The infonce loss: properties (hypothesis) and a plain-loop reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mmfw
from mmfw import LossOutput


def infonce(**options):
    return mmfw.create("loss", "infonce", **options)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def finite_batches(draw):
    """Two [B, D] float tensors from arbitrary bounded floats times a scale 1e-6..1e6.

    Includes identical rows, zero-heavy rows and wildly different norms.
    """
    b = draw(st.integers(1, 6))
    d = draw(st.integers(1, 8))
    values = st.floats(-1.0, 1.0, allow_nan=False, width=32, allow_subnormal=False)
    rows = st.lists(values, min_size=d, max_size=d)
    image = draw(st.lists(rows, min_size=b, max_size=b))
    if draw(st.booleans()):
        image = [image[0]] * b  # identical rows
    text = draw(st.lists(rows, min_size=b, max_size=b))
    if draw(st.booleans()):
        text = [list(r) for r in image]
    exp = st.integers(-6, 6)
    si, st_ = 10.0 ** draw(exp), 10.0 ** draw(exp)
    return torch.tensor(image) * si, torch.tensor(text) * st_


@st.composite
def id_batches(draw, *, min_b: int = 1, max_b: int = 8):
    """Embeddings with ids: several captions per image, Bi != Bt in general."""
    n_images = draw(st.integers(min_b, max_b))
    per_image = draw(st.lists(st.integers(1, 3), min_size=n_images, max_size=n_images))
    d = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.randperm(1000, generator=g)[:n_images]
    text_ids = image_ids.repeat_interleave(torch.tensor(per_image))
    text_ids = text_ids[torch.randperm(len(text_ids), generator=g)]
    image = torch.randn(n_images, d, generator=g, dtype=torch.float64).float()
    text = torch.randn(len(text_ids), d, generator=g, dtype=torch.float64).float()
    return image, text, image_ids, text_ids


temperatures = st.floats(0.01, 1.0)


# properties -------------------------------------------------------------------------------


def test_returns_loss_output_with_terms() -> None:
    out = infonce()(_randn(0, 4, 8), _randn(1, 4, 8))
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0
    assert set(out.terms) == {"i2t", "t2i"}
    assert out.loss.item() == pytest.approx((out.terms["i2t"] + out.terms["t2i"]).item() / 2)


@settings(max_examples=50)
@given(finite_batches(), temperatures, st.booleans())
def test_finite_loss_and_gradients(batch, temperature, learn) -> None:
    image, text = batch
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss = infonce(temperature=temperature, learn_temperature=learn)
    out = loss(image, text)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(image.grad).all()
    assert torch.isfinite(text.grad).all()
    for p in loss.parameters():
        assert torch.isfinite(p.grad).all()


@settings(max_examples=40)
@given(id_batches(), temperatures, st.integers(0, 2**31 - 1))
def test_permutation_equivariance(batch, temperature, seed) -> None:
    image, text, image_ids, text_ids = batch
    loss = infonce(temperature=temperature)
    g = torch.Generator().manual_seed(seed)
    pi = torch.randperm(len(image), generator=g)
    pt = torch.randperm(len(text), generator=g)
    a = loss(image, text, image_ids=image_ids, text_ids=text_ids).loss
    b = loss(image[pi], text[pt], image_ids=image_ids[pi], text_ids=text_ids[pt]).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-5, abs=1e-6)


@settings(max_examples=30)
@given(st.integers(1, 8), st.integers(2, 12), st.integers(0, 2**31 - 1), temperatures)
def test_permutation_equivariance_without_ids(b, d, seed, temperature) -> None:
    image, text = _randn(seed, b, d), _randn(seed + 1, b, d)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    loss = infonce(temperature=temperature)
    assert loss(image[perm], text[perm]).loss.item() == pytest.approx(
        loss(image, text).loss.item(), rel=1e-5, abs=1e-6)


@settings(max_examples=40)
@given(id_batches(), temperatures, st.data())
def test_positive_rescaling_invariance(batch, temperature, data) -> None:
    image, text, image_ids, text_ids = batch
    # one positive factor per row, 1e-3..1e3
    exps = st.floats(-3.0, 3.0)
    si = torch.tensor(data.draw(st.lists(exps, min_size=len(image), max_size=len(image))))
    st_ = torch.tensor(data.draw(st.lists(exps, min_size=len(text), max_size=len(text))))
    loss = infonce(temperature=temperature)
    a = loss(image, text, image_ids=image_ids, text_ids=text_ids).loss
    b = loss(image * 10 ** si[:, None], text * 10 ** st_[:, None], image_ids=image_ids,
             text_ids=text_ids).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-4, abs=1e-5)


def _derangement(n: int, g: torch.Generator) -> torch.Tensor:
    while True:
        p = torch.randperm(n, generator=g)
        if not (p == torch.arange(n)).any():
            return p


@settings(max_examples=40)
@given(st.integers(2, 16), st.integers(8, 32), st.integers(0, 2**31 - 1), temperatures)
def test_aligned_batch_scores_lower_than_shuffled(b, d, seed, temperature) -> None:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g)
    v = torch.nn.functional.normalize(image, dim=-1)
    off_diagonal = (v @ v.T - 2 * torch.eye(b)).max()
    assume(off_diagonal < 0.9)  # well separated: no two rows point the same way
    ids = torch.arange(b)
    loss = infonce(temperature=temperature)
    aligned = loss(image, image.clone(), image_ids=ids, text_ids=ids).loss
    shuffled = loss(image, image[_derangement(b, g)], image_ids=ids, text_ids=ids).loss
    assert aligned.item() < shuffled.item()


@settings(max_examples=40)
@given(id_batches(), temperatures, st.floats(0.0, 0.5))
def test_symmetry(batch, temperature, smoothing) -> None:
    image, text, image_ids, text_ids = batch
    loss = infonce(temperature=temperature, label_smoothing=smoothing)
    a = loss(image, text, image_ids=image_ids, text_ids=text_ids)
    b = loss(text, image, image_ids=text_ids, text_ids=image_ids)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5, abs=1e-6)
    assert b.terms["i2t"].item() == pytest.approx(a.terms["t2i"].item(), rel=1e-5, abs=1e-6)


@settings(max_examples=30)
@given(st.integers(1, 10), st.integers(2, 12), st.integers(0, 2**31 - 1), temperatures)
def test_unique_ids_equal_the_no_id_form(b, d, seed, temperature) -> None:
    image, text = _randn(seed, b, d), _randn(seed + 1, b, d)
    ids = torch.randperm(10_000, generator=torch.Generator().manual_seed(seed))[:b]
    loss = infonce(temperature=temperature)
    with_ids = loss(image, text, image_ids=ids, text_ids=ids.clone()).loss
    assert with_ids.item() == pytest.approx(loss(image, text).loss.item(), rel=1e-6, abs=1e-7)


def test_ids_must_come_in_pairs_and_batches_must_match_without_them() -> None:
    loss = infonce()
    with pytest.raises(ValueError):
        loss(_randn(0, 3, 4), _randn(1, 3, 4), image_ids=torch.arange(3))
    with pytest.raises(ValueError):
        loss(_randn(0, 3, 4), _randn(1, 5, 4))


# reference --------------------------------------------------------------------------------


def reference_infonce(image: list[list[float]], text: list[list[float]], image_ids: list[int],
                      text_ids: list[int], temperature: float) -> float:
    """Multi-positive symmetric InfoNCE with plain loops (every row must have a positive)."""

    def unit(x: list[float]) -> list[float]:
        n = math.sqrt(sum(v * v for v in x))
        return [v / n for v in x]

    v, t = [unit(x) for x in image], [unit(x) for x in text]
    logits = [[sum(a * b for a, b in zip(vi, tj)) / temperature for tj in t] for vi in v]

    def direction(rows: list[list[float]], row_ids: list[int], col_ids: list[int]) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            top = max(row)
            log_z = top + math.log(sum(math.exp(x - top) for x in row))
            positives = [j for j, c in enumerate(col_ids) if c == row_ids[i]]
            # target uniform over the positives
            total += -sum(row[j] - log_z for j in positives) / len(positives)
        return total / len(rows)

    columns = [[logits[i][j] for i in range(len(v))] for j in range(len(t))]
    return (direction(logits, image_ids, text_ids) + direction(columns, text_ids, image_ids)) / 2


CASES = [
    # (image ids, text ids, temperature)
    ([0, 1, 2], [0, 1, 2], 0.07),
    ([0, 1, 2], [2, 0, 1], 0.5),
    ([5, 7], [5, 5, 7, 5], 0.1),
    ([0, 1, 2, 3], [3, 3, 2, 1, 0, 0, 1], 1.0),
    ([1, 1, 2], [1, 2, 2], 0.2),  # repeated image ids too
]


@pytest.mark.parametrize(("image_ids", "text_ids", "temperature"), CASES)
def test_matches_plain_loop_reference(image_ids, text_ids, temperature) -> None:
    g = torch.Generator().manual_seed(len(text_ids))
    image = torch.randn(len(image_ids), 5, generator=g, dtype=torch.float64)
    text = torch.randn(len(text_ids), 5, generator=g, dtype=torch.float64)
    want = reference_infonce(image.tolist(), text.tolist(), image_ids, text_ids, temperature)
    loss = infonce(temperature=temperature, learn_temperature=False)
    got = loss(image, text, image_ids=torch.tensor(image_ids), text_ids=torch.tensor(text_ids))
    assert got.loss.item() == pytest.approx(want, rel=1e-5)


def test_reference_without_ids_is_the_diagonal() -> None:
    image, text = _randn(3, 4, 6).double(), _randn(4, 4, 6).double()
    want = reference_infonce(image.tolist(), text.tolist(), [0, 1, 2, 3], [0, 1, 2, 3], 0.07)
    assert infonce()(image, text).loss.item() == pytest.approx(want, rel=1e-5)


def test_hand_computed_two_by_two() -> None:
    """Orthogonal pairs: logits [[1, 0], [0, 1]] / tau, loss = log(1 + e^(-1/tau))."""
    tau = 0.5
    eye = torch.eye(2)
    out = infonce(temperature=tau, learn_temperature=False)(eye, eye * 7)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1 / tau)), rel=1e-6)


# temperature ------------------------------------------------------------------------------


def test_learnable_temperature_is_a_parameter_with_a_gradient() -> None:
    loss = infonce(temperature=0.07, learn_temperature=True)
    params = list(loss.parameters())
    assert len(params) == 1
    out = loss(_randn(0, 6, 8), _randn(1, 6, 8))
    out.loss.backward()
    assert params[0].grad is not None
    assert params[0].grad.abs().item() > 0
    assert loss.temperature.value == pytest.approx(0.07)


def test_fixed_temperature_has_no_parameter() -> None:
    loss = infonce(temperature=0.07, learn_temperature=False)
    assert list(loss.parameters()) == []
    image = _randn(0, 6, 8).requires_grad_(True)
    loss(image, _randn(1, 6, 8)).loss.backward()
    assert image.grad is not None
    assert loss.temperature.log_scale.grad is None
    assert not loss.temperature.log_scale.requires_grad
    # it still travels with the state dict (checkpoints)
    assert "temperature.log_scale" in loss.state_dict()


def test_temperature_divides_cosine_similarity() -> None:
    """Logits are cosine / tau: checked against the reference at several temperatures."""
    image, text = _randn(5, 3, 4).double(), _randn(6, 3, 4).double()
    ids = [0, 1, 2]
    for tau in (0.05, 0.1, 0.4):
        want = reference_infonce(image.tolist(), text.tolist(), ids, ids, tau)
        got = infonce(temperature=tau, learn_temperature=False)(image, text).loss.item()
        assert got == pytest.approx(want, rel=1e-5)


@settings(max_examples=40)
@given(st.floats(1e-4, 10.0), st.floats(1.01, 1000.0), st.booleans())
def test_scale_never_exceeds_max_scale(temperature, max_scale, learn) -> None:
    loss = infonce(temperature=temperature, max_scale=max_scale, learn_temperature=learn)
    scale = loss.temperature.scale().item()
    assert scale <= max_scale * (1 + 1e-6)
    assert scale == pytest.approx(min(1 / temperature, max_scale), rel=1e-5)


def test_clamp_holds_while_learning_and_tau_below_the_clamp_is_the_clamp() -> None:
    loss = infonce(temperature=0.01, max_scale=20.0)  # 1/tau = 100 > 20
    assert loss.temperature.scale().item() == pytest.approx(20.0)
    with torch.no_grad():
        loss.temperature.log_scale.fill_(50.0)  # as if a step pushed it far up
    loss.temperature.clamp_()  # the trainer clamps after each step (CLIP)
    assert loss.temperature.scale().item() == pytest.approx(20.0)
    image, text = _randn(0, 5, 8), _randn(1, 5, 8)
    at_clamp = infonce(temperature=1 / 20.0, max_scale=20.0)(image, text).loss
    assert loss(image, text).loss.item() == pytest.approx(at_clamp.item(), rel=1e-6)
    # a gradient step against the loss cannot take the scale over the clamp
    opt = torch.optim.SGD(loss.parameters(), lr=10.0)
    for _ in range(3):
        opt.zero_grad()
        (-loss(image, text).loss).backward()
        opt.step()
        loss.temperature.clamp_()
        assert loss.temperature.scale().item() <= 20.0 * (1 + 1e-6)


# label smoothing --------------------------------------------------------------------------


def _torch_clip_loss(image, text, tau, eps, target=None):
    """CLIP's loss with ``F.cross_entropy(label_smoothing=eps)`` both ways: ``(i2t, t2i)``."""
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / tau
    if target is None:
        target = torch.arange(len(image))
    column_target = torch.empty_like(target)
    column_target[target] = torch.arange(len(target))  # the image each text belongs to
    return (F.cross_entropy(logits, target, label_smoothing=eps),
            F.cross_entropy(logits.T, column_target, label_smoothing=eps))


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize(("b", "d", "tau"), [(1, 4, 0.07), (2, 3, 0.5), (5, 8, 0.07),
                                             (16, 12, 0.2)])
def test_label_smoothing_is_torch_cross_entropy_label_smoothing(eps, b, d, tau) -> None:
    """With diagonal positives, each direction is ``F.cross_entropy(label_smoothing=eps)``
    (target (1 - eps) one-hot + eps / B over all B candidates) and the loss their mean."""
    image, text = _randn(b, b, d) * 3, _randn(b + 100, b, d)
    loss = infonce(temperature=tau, learn_temperature=False, label_smoothing=eps)
    got = loss(image, text)
    i2t, t2i = _torch_clip_loss(image, text, tau, eps)
    torch.testing.assert_close(got.terms["i2t"], i2t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.terms["t2i"], t2i, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, (i2t + t2i) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothing_with_unique_ids_follows_the_ids(eps) -> None:
    """Unique ids in any order: the target of image i is the text with its id."""
    b, tau = 6, 0.1
    g = torch.Generator().manual_seed(7)
    image, text = _randn(3, b, 5), _randn(4, b, 5)
    image_ids = torch.randperm(b, generator=g) * 3 + 11
    order = torch.randperm(b, generator=g)
    text_ids = image_ids[order]  # text j belongs to image order[j]
    target = torch.empty_like(order)
    target[order] = torch.arange(b)
    loss = infonce(temperature=tau, learn_temperature=False, label_smoothing=eps)
    got = loss(image, text, image_ids=image_ids, text_ids=text_ids)
    i2t, t2i = _torch_clip_loss(image, text, tau, eps, target)
    torch.testing.assert_close(got.terms["i2t"], i2t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.terms["t2i"], t2i, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, (i2t + t2i) / 2, rtol=1e-6, atol=1e-6)


def test_label_smoothing_changes_the_loss() -> None:
    """The option reaches the loss (a smoothed target is not the one-hot one)."""
    image, text = _randn(0, 4, 6), _randn(1, 4, 6)
    plain = infonce(temperature=0.1, learn_temperature=False)(image, text).loss
    smoothed = infonce(temperature=0.1, learn_temperature=False, label_smoothing=0.1)
    assert abs(smoothed(image, text).loss.item() - plain.item()) > 1e-3


# soft targets from caption-caption similarity ---------------------------------------------


def _soft_reference(image, text, image_ids, text_ids, tau, weight, soft_tau):
    """Both directions by plain loops: the target of image i mixes its captions (uniform)
    with a softmax over captions j of cos(mean direction of i's captions, caption j), a
    constant (no gradient flows through a target)."""
    v, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = v @ t.T / tau
    g = torch.zeros(len(v), len(t))
    fixed = t.detach()
    for i in range(len(v)):
        own = [j for j in range(len(t)) if text_ids[j] == image_ids[i]]
        centre = F.normalize(fixed[own].mean(0), dim=0)
        for j in range(len(t)):
            g[i, j] = centre @ fixed[j]

    def direction(logit_rows, g_rows, pos_rows):
        total = []
        for row, grow, pos in zip(logit_rows, g_rows, pos_rows, strict=True):
            target = (1 - weight) * pos / pos.sum() + weight * torch.softmax(grow / soft_tau, 0)
            total.append(-(target * torch.log_softmax(row, 0)).sum())
        return torch.stack(total).mean()

    pos = (image_ids.view(-1, 1) == text_ids.view(1, -1)).float()
    return direction(logits, g, pos), direction(logits.T, g.T, pos.T)


@pytest.mark.parametrize("weight", [0.2, 0.5])
def test_soft_targets_are_the_plain_loop_reference(weight) -> None:
    """Several captions an image (semantic-group batches): the loss and its gradients are
    the loop reference's, whose targets are constants."""
    image_ids = torch.tensor([3, 1, 4, 7])
    text_ids = torch.tensor([1, 3, 3, 4, 7, 1, 4, 7, 7])
    image = (_randn(0, 4, 6) * 2).requires_grad_()
    text = _randn(1, 9, 6).requires_grad_()
    loss = infonce(temperature=0.1, learn_temperature=False, soft_targets=weight,
                   soft_temperature=0.2)
    got = loss(image, text, image_ids=image_ids, text_ids=text_ids)
    i2t, t2i = _soft_reference(image, text, image_ids, text_ids, 0.1, weight, 0.2)
    torch.testing.assert_close(got.terms["i2t"], i2t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.terms["t2i"], t2i, rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad((i2t + t2i) / 2, (image, text))
    for g, w in zip(torch.autograd.grad(got.loss, (image, text)), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    plain = infonce(temperature=0.1, learn_temperature=False)
    zero = infonce(temperature=0.1, learn_temperature=False, soft_targets=0.0)
    torch.testing.assert_close(zero(image, text, image_ids=image_ids, text_ids=text_ids).loss,
                               plain(image, text, image_ids=image_ids, text_ids=text_ids).loss)

