"""Collapse diagnostics: the statistics' math, the detector, and both on real training runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.diagnostics.stats import (
    effective_rank,
    embedding_stats,
    gradient_groups,
    gradient_norms,
    modality_stats,
    probe_batch,
)
from mmfw.errors import RecipeError
from mmfw_callbacks.collapse import CollapseDetector

ROOT = Path(__file__).resolve().parents[1]
SEED_COLLAPSE = ROOT / "recipes" / "seed_collapse.toml"

#: seed_collapse.toml at test size: the same failure (bn-projection, tau 0.01, batch 8, lr 0.1)
SMALL = [
    "data.train_images=64", "data.val_images=16", "data.test_images=32", "data.image_size=16",
    "model.embed_dim=32", "model.vision.image_size=16", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.text.width=32", "model.text.depth=1",
    "model.text.heads=2", "model.text.vocab_size=200", "backend.name=cpu", "run.epochs=4",
    "run.max_minutes=0", "run.progress=false", "schedule.warmup_steps=5", "diagnostics.every=10",
    "diagnostics.grace_steps=0", "diagnostics.map_points=0",
]


def _rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    return [r for r in rows if kind is None or r["type"] == kind]


def _seed_collapse(tmp_path: Path, *extra: str) -> tuple[mmfw.RunResult, list[str]]:
    """The run and what it printed."""
    recipe = mmfw.load_recipe(SEED_COLLAPSE, [*SMALL, f"run.output_dir={tmp_path}", *extra])
    said: list[str] = []
    return mmfw.train(recipe, console=said.append), said


# the statistics --------------------------------------------------------------------------------


def test_effective_rank_bounds() -> None:
    assert effective_rank(torch.ones(8)) == pytest.approx(8.0)
    assert effective_rank(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(torch.tensor([4.0, 1.0, 1.0])) < 3.0
    assert effective_rank(torch.zeros(4)) == 1.0  # no variance at all: one point


def test_stats_of_a_perfect_and_of_a_collapsed_model() -> None:
    torch.manual_seed(0)
    ids = torch.arange(16)
    basis = torch.linalg.qr(torch.randn(32, 32))[0][:16]  # 16 orthonormal rows in 32-d
    perfect = embedding_stats(basis * 3.0, basis, ids, ids)
    assert perfect["sim/pos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["sim/neg_mean"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["sim/gap"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["align"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["image/eff_rank"] > 14  # 16 centred orthonormal rows span 15 directions
    assert perfect["image/eff_rank_frac"] > 0.9

    point = torch.randn(1, 32).repeat(16, 1) + 1e-4 * torch.randn(16, 32)
    collapsed = embedding_stats(point, point.flip(0), ids, ids)
    assert collapsed["sim/mean"] == pytest.approx(1.0, abs=1e-3)
    assert abs(collapsed["sim/gap"]) < 1e-3
    assert collapsed["image/low_var_dims"] == 32 and collapsed["text/low_var_dims"] == 32
    assert collapsed["image/uniformity"] == pytest.approx(0.0, abs=1e-3)  # log E exp(0)
    assert len(collapsed["image/spectrum"]) == 16
    assert sum(perfect["image/spectrum"]) == pytest.approx(1.0, abs=1e-5)


def test_positives_follow_ids_not_the_diagonal() -> None:
    """Two captions per image: both are positives of their image (multi-positive by ids)."""
    torch.manual_seed(1)
    img = torch.randn(4, 8)
    txt = img.repeat_interleave(2, 0)
    stats = embedding_stats(img, txt, torch.arange(4), torch.arange(4).repeat_interleave(2))
    assert stats["sim/pos_mean"] == pytest.approx(1.0, abs=1e-5)


@given(scale=st.floats(0.01, 100.0), seed=st.integers(0, 1000))
def test_stats_ignore_the_scale_of_the_features(scale: float, seed: int) -> None:
    """Everything is measured on normalised embeddings: a feature scale (the seeds' 5.0, 10.0)
    changes nothing, which is why it could not prevent collapse."""
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    ids = torch.arange(12)
    a = embedding_stats(img, txt, ids, ids)
    b = embedding_stats(img * scale, txt * scale, ids, ids)
    for key in ("sim/gap", "sim/mean", "image/eff_rank", "align", "text/uniformity"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4)
    assert -2.0 <= a["sim/gap"] <= 2.0
    assert 1.0 <= a["image/eff_rank"] <= 11.0 + 1e-6


def test_non_finite_embeddings_give_nan_not_an_error() -> None:
    x = torch.full((4, 8), float("nan"))
    stats = modality_stats(x)
    assert math.isnan(stats["eff_rank"]) and stats["low_var_dims"] == 8


def test_gradient_norms_by_part() -> None:
    from mmfw.model import build_model

    recipe = mmfw.load_recipe(tiny_recipe("unused"))
    model = build_model(recipe.model)
    loss = mmfw.create("loss", "infonce")
    groups = gradient_groups(model, loss)
    assert set(groups) == {"vision", "text", "adapters", "loss"}
    for p in model.vision.parameters():
        p.grad = torch.full_like(p, 2.0)
    for p in model.vision_adapter.parameters():
        p.grad = torch.ones_like(p)
    norms = gradient_norms(groups)
    n_vision = sum(p.numel() for p in model.vision.parameters())
    n_adapter = sum(p.numel() for p in model.vision_adapter.parameters())
    assert float(norms["vision"]) == pytest.approx(2.0 * math.sqrt(n_vision), rel=1e-4)
    assert float(norms["adapters"]) == pytest.approx(math.sqrt(n_adapter), rel=1e-4)
    assert "text" not in norms and "loss" not in norms  # no gradients there
    assert float(norms["total"]) == pytest.approx(math.sqrt(4 * n_vision + n_adapter), rel=1e-4)


def test_probe_batch_spreads_over_the_split_with_one_caption_each() -> None:
    split = mmfw.create("dataset", "synthetic", val_images=10, image_size=16).split("val")
    seen: list[str] = []
    batch = probe_batch(split, 4, lambda im: torch.zeros(3, 2, 2),
                        lambda texts: seen.extend(texts) or {"ids": torch.zeros(len(texts))})
    assert batch.image_ids.tolist() == batch.text_ids.tolist() == [0, 1, 2, 3]
    assert seen == [split.captions(0)[0], split.captions(3)[1], split.captions(6)[2],
                    split.captions(9)[3]]
    assert probe_batch(split, 1, None, None) is None


# the detector ----------------------------------------------------------------------------------


def _stats(gap: float, frac: float = 0.5) -> dict:
    return {"sim/gap": gap, "sim/pos_mean": 0.1 + gap, "sim/neg_mean": 0.1,
            "image/eff_rank_frac": frac, "text/eff_rank_frac": 0.5, "image/eff_rank": frac * 30,
            "text/eff_rank": 15.0, "image/low_var_dims": 3, "text/low_var_dims": 0}


def test_detector_needs_patience_and_fires_once_per_streak() -> None:
    recipe = mmfw.load_recipe(SEED_COLLAPSE)
    d = CollapseDetector(gap_threshold=0.02, rank_fraction=0.1, patience=3, grace_steps=20,
                         recipe=recipe)
    assert d.update(10, _stats(0.0)) == []  # within the grace period: not judged
    assert d.update(20, _stats(0.0)) == [] and d.update(30, _stats(0.01)) == []
    fired = d.update(40, _stats(0.02))  # 0.02 <= threshold: still bad; third in a row
    assert [s.kind for s in fired] == ["no-gap"]
    s = fired[0]
    assert s.step == 40 and s.source == "probe"
    for text in ("COLLAPSE WARNING at step 40", "gap 0.0200 <= 0.02", "not more similar",
                 "loss.temperature (now 0.01)", "optim.lr (now 0.1)", "sampler.batch_size (now 8)",
                 "model.adapter.name (now 'bn-projection')", "memory_queue"):
        assert text in s.message, text
    assert s.to_dict()["keys"] == ["loss.temperature", "optim.lr", "sampler.batch_size",
                                   "model.adapter.name"]
    assert d.update(50, _stats(0.0)) == []  # same streak: no repeat
    # one good check between bad ones (a value hovering at the threshold) does not re-arm it
    assert [d.update(step, _stats(0.5 if step == 60 else 0.0)) for step in (60, 70, 80, 90)] \
        == [[]] * 4
    for step in (100, 110, 120):  # recovered for `patience` checks: armed again
        assert d.update(step, _stats(0.5)) == []
    assert [x.kind for x in d.update(130, _stats(float("nan"))) +  # NaN counts as bad
            d.update(140, _stats(0.0)) + d.update(150, _stats(0.0))] == ["no-gap"]


def test_detector_low_rank() -> None:
    d = CollapseDetector(rank_fraction=0.1, patience=2)
    assert d.update(1, _stats(0.5, frac=0.05)) == []
    (s,) = d.update(2, _stats(0.5, frac=0.05))
    assert s.kind == "low-rank"
    assert "dimensional collapse of the image embeddings" in s.message
    assert "loss.name" in s.cures  # the anti-collapse loss terms
    (nan,) = CollapseDetector(patience=1).update(5, _stats(0.5, frac=float("nan")))
    assert "not finite" in nan.message


# on real runs ----------------------------------------------------------------------------------


def test_seed_collapse_recipe_is_detected(tmp_path) -> None:
    """The seeds' failure (bn-projection, tau 0.01, batch 8, lr 0.1) collapses; the detector
    names it on the console, in warnings.jsonl and in metrics.jsonl."""
    result, said = _seed_collapse(tmp_path)
    run_dir = result.run_dir
    warnings = [json.loads(ln) for ln in (run_dir / "warnings.jsonl").read_text().splitlines()]
    assert "no-gap" in {w["symptom"] for w in warnings}
    assert _rows(run_dir, "warning") == warnings
    assert any("COLLAPSE WARNING" in line and "optim.lr (now 0.1)" in line
               for line in said)
    diag = _rows(run_dir, "diagnostics")
    assert [r["step"] for r in diag] == list(range(10, result.steps + 1, 10))
    last = diag[-1]
    for key in ("batch/sim/gap", "probe/sim/gap", "probe/sim/mean", "probe/sim/std",
                "probe/sim/min", "probe/sim/max", "probe/image/eff_rank", "probe/text/var_mean",
                "probe/image/low_var_dims", "probe/align", "probe/text/uniformity",
                "grad/vision", "grad/text", "grad/adapters", "grad/total", "temperature"):
        assert key in last, key
    assert len(last["probe/image/spectrum"]) == 16
    assert last["probe/size"] == 16 and last["probe/split"] == "val"
    assert abs(last["probe/sim/gap"]) <= 0.02  # what the warning says is what was measured


def test_stop_on_collapse_ends_cleanly_and_still_evaluates(tmp_path) -> None:
    result, _ = _seed_collapse(tmp_path, "diagnostics.stop_on_collapse=true")
    assert result.stopped_by == "collapse"
    assert result.steps < 4 * 64 * 5 // 8
    assert result.steps == _rows(result.run_dir, "warning")[0]["step"]
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics
    assert (result.run_dir / "checkpoints" / f"step-{result.steps:08d}.json").is_file()


HEALTHY = {"run": {"epochs": 4}, "optim": {"lr": 2e-3}, "plots": {"enabled": True},
           "diagnostics": {"every": 10, "grace_steps": 20, "map_method": "tsne"}}


def test_healthy_tiny_run_does_not_warn_and_draws_every_plot(tmp_path) -> None:
    result = mmfw.train(mmfw.load_recipe(tiny_recipe(tmp_path, name="ok", **HEALTHY)),
                        console=lambda _: None)
    run_dir = result.run_dir
    assert not (run_dir / "warnings.jsonl").exists()
    assert _rows(run_dir, "warning") == []
    diag = _rows(run_dir, "diagnostics")
    assert len(diag) == 8
    assert diag[-1]["probe/sim/gap"] > 0.02
    for name in ("training", "diagnostics", "similarity", "spectrum", "embedding_map"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size < 400_000


def test_diagnostics_do_not_change_training(tmp_path) -> None:
    """Probe embedding runs in eval mode without gradients: the weights are bit-identical."""
    weights = []
    for every in (5, 0):
        data = tiny_recipe(tmp_path, name=f"every{every}", run={"max_steps": 12},
                           diagnostics={"every": every, "map_points": 0})
        result = mmfw.train(mmfw.load_recipe(data), console=lambda _: None)
        weights.append(load_file(str(result.run_dir / "checkpoints" / "step-00000012.safetensors")))
        assert bool(_rows(result.run_dir, "diagnostics")) == bool(every)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_a_failing_plot_never_loses_the_metrics(tmp_path, monkeypatch) -> None:
    import mmfw.tools.plots

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(mmfw.tools.plots, "similarity_histogram", broken)
    said: list[str] = []
    data = tiny_recipe(tmp_path, name="ink", run={"max_steps": 2},
                       diagnostics={"map_method": "pca"}, plots={"enabled": True})
    result = mmfw.train(mmfw.load_recipe(data), console=said.append)
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics
    assert any("could not draw similarity.png: RuntimeError: no ink" in s for s in said)
    assert (result.run_dir / "plots" / "embedding_map.png").is_file()


def test_diagnostics_options_are_validated(tmp_path, write_recipe) -> None:
    with pytest.raises(RecipeError, match="map_method"):
        mmfw.load_recipe(tiny_recipe(tmp_path), ["diagnostics.map_method=umapp"])
    with pytest.raises(RecipeError, match="rank_fraction"):
        mmfw.load_recipe(tiny_recipe(tmp_path), ["diagnostics.rank_fraction=2"])
    path = write_recipe(tiny_recipe(tmp_path, diagnostics={"probe_split": "dev"}))
    assert_user_error(cli("run", path), "diagnostics.probe_split", "dev", "val")


def test_embedding_map_falls_back_when_a_method_is_missing(monkeypatch) -> None:
    import numpy as np

    from mmfw.tools.plots import project_2d

    x = np.random.default_rng(0).normal(size=(40, 8))
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    xy, used = project_2d(x, "umap")
    assert used == "t-SNE" and xy.shape == (40, 2)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    xy, used = project_2d(x, "auto")
    assert used == "PCA" and xy.shape == (40, 2)
    # PCA keeps the two directions of largest variance
    assert np.allclose(np.abs(np.corrcoef(xy.T)[0, 1]), 0.0, atol=1e-6)
