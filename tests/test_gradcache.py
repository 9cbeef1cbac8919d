"""Whole-batch gradient accumulation (GradCache): the gradients of one big batch, for a
stateless loss and for one with state, with dropout masks replayed; naive accumulation is not."""

from __future__ import annotations

import contextlib
import copy
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mmfw
from helpers import EXACT_BACKEND, tiny_recipe
from mmfw.data.batching import Collate, Pairs
from mmfw.model import build_model
from mmfw.train.gradcache import chunks, gradcache_step, naive_step

NO_AUTOCAST = contextlib.nullcontext


@pytest.fixture(scope="module")
def setup():
    """A tiny real dual encoder (scratch ViT + text transformer), a batch of 24 random pairs."""
    recipe = mmfw.load_recipe(tiny_recipe("unused", model={"text": {"dropout": 0.0}}))
    torch.manual_seed(0)
    model = build_model(recipe.model)
    source = mmfw.create("dataset", "synthetic", options=recipe.data.dataset.options)
    pairs = Pairs(source.split("train"))
    model.text.prepare(pairs.texts())
    collate = Collate(model.vision.preprocess, model.text.tokenize, pairs.items)
    g = torch.Generator().manual_seed(0)
    batch = collate([pairs[int(k)] for k in torch.randperm(len(pairs), generator=g)[:24]])
    other = collate([pairs[int(k)] for k in torch.randperm(len(pairs), generator=g)[:24]])
    return model, batch, other


def _grads(model: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"loss.{n}": p.grad.clone() for n, p in loss.named_parameters()
                if p.grad is not None})
    return out


def _big_batch(model, loss, batch, seed=1):
    torch.manual_seed(seed)
    img, txt = model(batch.pixels, batch.tokens)
    out = loss(img, txt, image_ids=batch.image_ids, text_ids=batch.text_ids)
    out.loss.backward()
    return out


def _run(kind: str, model, loss, batch, parts: int = 4, seed: int = 1, **kw):
    model, loss = copy.deepcopy(model), copy.deepcopy(loss)
    model.train()
    loss.train()
    if kind == "big":
        out = _big_batch(model, loss, batch, seed)
    else:
        torch.manual_seed(seed)
        step = gradcache_step if kind == "gradcache" else naive_step
        out, _, _ = step(model, loss, batch, parts, autocast=NO_AUTOCAST, **kw)
    return out, _grads(model, loss), loss, model


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunks_cover_every_row() -> None:
    for n in (1, 5, 24, 25):
        for parts in (1, 3, 4, 8, 30):
            sl = chunks(n, parts)
            assert [i for s in sl for i in range(n)[s]] == list(range(n))
            sizes = [s.stop - s.start for s in sl]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("parts", [2, 4, 7])
def test_infonce_gradients_equal_one_big_batch(setup, parts) -> None:
    model, batch, _ = setup
    loss = mmfw.create("loss", "infonce")
    out_big, big, _, _ = _run("big", model, loss, batch)
    out_gc, gc, _, _ = _run("gradcache", model, loss, batch, parts)
    assert float(out_gc.loss.detach()) == pytest.approx(float(out_big.loss.detach()), rel=1e-5)
    assert any(n.startswith("loss.") for n in big)  # the learnable temperature too
    _assert_same(big, gc)


def test_memory_queue_gradients_and_one_update_per_batch(setup) -> None:
    model, batch, other = setup
    loss = mmfw.create("loss", "memory_queue", size=64)
    with torch.no_grad():  # a queue already holding another batch
        loss(*model(other.pixels, other.tokens), image_ids=other.image_ids,
             text_ids=other.text_ids)
    assert int(loss.text_queue.count) == len(other)
    _, big, q_big, _ = _run("big", model, loss, batch)
    _, gc, q_gc, _ = _run("gradcache", model, loss, batch, 4)
    _assert_same(big, gc)
    # enqueued once, the whole batch, exactly as one big batch does
    assert int(q_gc.text_queue.count) == len(other) + len(batch)
    for name, value in q_big.state_dict().items():
        torch.testing.assert_close(q_gc.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_naive_accumulation_is_not_the_big_batch(setup) -> None:
    """Per-micro-batch losses see fewer negatives: the gradient differs (why GradCache)."""
    model, batch, _ = setup
    loss = mmfw.create("loss", "infonce")
    _, big, _, _ = _run("big", model, loss, batch)
    out, naive, _, _ = _run("naive", model, loss, batch, 4)
    assert naive.keys() == big.keys()
    diff = max(float((naive[n] - big[n]).abs().max() / big[n].abs().max().clamp_min(1e-12))
               for n in big)
    assert diff > 0.05
    assert torch.isfinite(out.loss)
    # with one part it is the big batch again
    _, one, _, _ = _run("naive", model, loss, batch, 1)
    _assert_same(big, one)


def test_dropout_masks_are_replayed(setup) -> None:
    """With dropout, GradCache's gradient is the gradient of the loss it computed: the re-forward
    replays each micro-batch's RNG state. Without the replay the masks differ."""
    model, batch, _ = setup
    model = copy.deepcopy(model)
    for m in model.text.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.3
    loss = mmfw.create("loss", "infonce")
    parts = 3

    # reference: the same micro-batches forwarded with a graph, same RNG order, one loss
    ref_model, ref_loss = copy.deepcopy(model), copy.deepcopy(loss)
    torch.manual_seed(5)
    imgs = [ref_model.encode_image(batch.pixels[s]) for s in chunks(len(batch.pixels), parts)]
    txts = [ref_model.encode_text({k: v[s] for k, v in batch.tokens.items()})
            for s in chunks(len(batch), parts)]
    out = ref_loss(torch.cat(imgs), torch.cat(txts), image_ids=batch.image_ids,
                   text_ids=batch.text_ids)
    out.loss.backward()
    ref = _grads(ref_model, ref_loss)

    _, gc, _, _ = _run("gradcache", model, loss, batch, parts, seed=5)
    _assert_same(ref, gc)
    _, unreplayed, _, _ = _run("gradcache", model, loss, batch, parts, seed=5, replay_rng=False)
    name = next(n for n in ref if n.startswith("model.text.layers"))
    assert not torch.allclose(ref[name], unreplayed[name], rtol=1e-3, atol=1e-6)
    # and the RNG continues as after one pass, not two
    torch.manual_seed(5)
    _run("gradcache", model, loss, batch, parts, seed=5)
    after_gc = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        for s in chunks(len(batch.pixels), parts):
            model.encode_image(batch.pixels[s])
        for s in chunks(len(batch), parts):
            model.encode_text({k: v[s] for k, v in batch.tokens.items()})
    assert torch.equal(after_gc, torch.rand(3))


class BNTower(nn.Module):
    """encode_image / encode_text through BatchNorm: running stats must update once per
    micro-batch, not again in the re-forward."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.txt = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8))

    def encode_image(self, x):
        return self.img(x)

    def encode_text(self, tokens):
        return self.txt(tokens["x"])


def test_batchnorm_running_stats_update_once() -> None:
    torch.manual_seed(0)
    tower = BNTower().train()

    class B:
        pixels = torch.randn(12, 6)
        tokens: ClassVar = {"x": torch.randn(12, 5)}
        image_ids = text_ids = torch.arange(12)

    ref = copy.deepcopy(tower)
    with torch.no_grad():
        for s in chunks(12, 3):
            ref.encode_image(B.pixels[s])
            ref.encode_text({"x": B.tokens["x"][s]})
    gradcache_step(tower, mmfw.create("loss", "infonce"), B, 3, autocast=NO_AUTOCAST)
    for (name, a), (_, b) in zip(tower.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), name
    assert all(p.grad is not None for p in tower.parameters())


def _train(tmp_path, name: str, **optim):
    data = tiny_recipe(tmp_path / "runs", name=name, run={"max_steps": 8, "epochs": 1},
                       optim=optim, eval={"val_split": ""}, backend=EXACT_BACKEND)
    return mmfw.train(mmfw.load_recipe(data), console=lambda _: None)


def test_engine_accumulation_trains_like_the_whole_batch(tmp_path) -> None:
    """Eight optimizer steps with the batch embedded in 4 pieces end at the weights of eight
    whole-batch steps; naive accumulation ends elsewhere. The rows say how it ran."""
    whole = _train(tmp_path, "whole")
    cached = _train(tmp_path, "gc", accumulate=4)
    naive = _train(tmp_path, "naive", accumulate=4, accumulate_mode="naive")
    w = load_file(str(whole.run_dir / "checkpoints" / "step-00000008.safetensors"))
    c = load_file(str(cached.run_dir / "checkpoints" / "step-00000008.safetensors"))
    n = load_file(str(naive.run_dir / "checkpoints" / "step-00000008.safetensors"))
    for key in w:
        torch.testing.assert_close(c[key], w[key], rtol=1e-3, atol=1e-5, msg=key)
    assert any(not torch.allclose(n[k], w[k], rtol=1e-3, atol=1e-5) for k in w)
    rows = (cached.run_dir / "metrics.jsonl").read_text()
    assert '"accumulate": 4' in rows
