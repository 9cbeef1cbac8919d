"""The seeds' remaining catalogue, end to end: prototypical contrastive learning (k-means,
concentration, the ``prototypes`` callback, checkpointed clusters), spectral and alignment
losses (alignment alone collapses, and the detector says so), global negatives for
``memory_queue``, the ``pca`` adapter and its ``pca-fit`` callback, the regression warm-up
recipe. The loss formulas' plain-loop references and hypothesis properties are in
test_losses_catalogue.py; the CLIP-exact towers in test_clip_towers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mmfw
from helpers import cli, tiny_recipe
from mmfw.errors import PluginError
from mmfw.run import checkpoint as ckpt
from mmfw_losses.memory_queue import auto_mode
from mmfw_losses.prototypical import concentration, kmeans

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path: Path, name: str, *, resume: bool = False, **sections):
    lines: list[str] = []
    data = tiny_recipe(tmp_path / "runs", name=name, **sections)
    data["eval"] = {"val_split": "", **data.get("eval", {})}
    result = mmfw.train(mmfw.load_recipe(data), resume=resume, console=lines.append)
    return result, "\n".join(lines)


def loss_state(run_dir: Path) -> dict[str, torch.Tensor]:
    d = run_dir / "checkpoints"
    return ckpt.read_weights(d, ckpt.latest(d))[1]


def rows(run_dir: Path, kind: str) -> list[dict]:
    out = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in out if r["type"] == kind]


# ---- k-means and the concentration estimate -----------------------------------------------

def test_kmeans_finds_separated_blobs_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + torch.randn(60, 2, generator=g)
    c, a = kmeans(x, 3, 20, torch.Generator().manual_seed(1))
    same = truth.view(-1, 1) == truth.view(1, -1)
    assert torch.equal(a.view(-1, 1) == a.view(1, -1), same)  # the partition, any labels
    torch.testing.assert_close(c[a], centres[truth], atol=1.0, rtol=0)
    c2, a2 = kmeans(x, 3, 20, torch.Generator().manual_seed(1))
    assert torch.equal(a, a2) and torch.equal(c, c2)
    _, every = kmeans(x, 60, 5, torch.Generator().manual_seed(2))  # k = N: one point each
    assert sorted(every.tolist()) == list(range(60))


def test_concentration_is_the_papers_estimate():
    """Plain loop of the authors' code: mean distance / log(Z + alpha); a one-point cluster
    gets the largest; clip to the 10th-90th percentiles; scale to mean temperature."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g)
    assign = torch.randint(0, 7, (40,), generator=g)
    assign[0] = 7  # one cluster of a single point
    k = 8
    centroids = torch.stack([x[assign == c].mean(0) for c in range(k)])
    got = concentration(x, centroids, assign, alpha=10.0, temperature=0.2)
    phi = np.zeros(k)
    for c in range(k):
        d = [float((x[i] - centroids[c]).norm()) for i in range(40) if int(assign[i]) == c]
        if len(d) > 1:
            phi[c] = np.mean(d) / np.log(len(d) + 10)
    dmax = phi.max()
    for c in range(k):
        if int((assign == c).sum()) <= 1:
            phi[c] = dmax
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    phi = 0.2 * phi / phi.mean()
    torch.testing.assert_close(got.double(), torch.tensor(phi), rtol=1e-5, atol=1e-6)


def test_clustering_schedule_and_state_round_trip(tmp_path):
    loss = mmfw.create("loss", "prototypical", clusters=(3, 5), warmup_epochs=2, every_epochs=3)
    assert [e for e in range(10) if loss.due(e)] == [2, 5, 8]
    assert not loss.stale(1) and loss.stale(2)
    ids = torch.arange(100, 130)
    ks = loss.cluster(torch.randn(30, 8), ids, epoch=5)
    assert ks == [3, 5] and not loss.stale(5) and not loss.stale(7) and loss.stale(8)
    save_file({k: v.contiguous() for k, v in loss.state_dict().items()}, tmp_path / "p.st")
    fresh = mmfw.create("loss", "prototypical", clusters=(3, 5))
    fresh.load_state_dict(load_file(tmp_path / "p.st"))
    v, t = torch.randn(4, 8), torch.randn(6, 8)
    iid, tid = torch.tensor([100, 101, 102, 7]), torch.tensor([100, 100, 101, 102, 103, 7])
    a, b = loss(v, t, image_ids=iid, text_ids=tid), fresh(v, t, image_ids=iid, text_ids=tid)
    torch.testing.assert_close(a.loss, b.loss)
    assert float(a.terms["proto"]) > 0 and int(fresh.clustered_epoch) == 5


def test_too_many_clusters_are_clamped_to_the_images():
    loss = mmfw.create("loss", "prototypical", clusters=(4, 50))
    assert loss.cluster(torch.randn(12, 3), torch.arange(12), epoch=0) == [4, 12]


# ---- runs ------------------------------------------------------------------------------------

def test_prototypical_run_clusters_after_warmup_and_resumes_with_its_clusters(tmp_path):
    proto = {"name": "prototypical", "clusters": [4, 8], "warmup_epochs": 1}
    result, said = train(tmp_path, "proto", run={"max_steps": 24, "log_every": 4}, loss=proto)
    assert said.count("prototypes: k-means of 64 training images into 4, 8 clusters") == 1
    state = loss_state(result.run_dir)
    assert state["centroids"].shape == (12, 32) and int(state["clustered_epoch"]) == 1
    assert torch.equal(state["proto_ids"], torch.arange(64))
    assert state["density"].mean().item() == pytest.approx(0.2, rel=1e-4)
    by_step = {r["step"]: r["loss/proto"] for r in rows(result.run_dir, "train")}
    assert all(v == 0 for s, v in by_step.items() if s <= 20)  # the instance-only warm-up
    assert all(v > 0 for s, v in by_step.items() if s > 20)
    resumed, said = train(tmp_path, "proto", resume=True, run={"max_steps": 28, "log_every": 4},
                          loss=proto)
    assert "prototypes:" not in said  # the checkpoint's clusters, not a new clustering
    assert torch.equal(loss_state(resumed.run_dir)["centroids"], state["centroids"])


def test_spectral_run(tmp_path):
    result, _ = train(tmp_path, "spectral", run={"max_steps": 4, "log_every": 2},
                      loss={"name": "spectral"})
    assert {"loss/pos", "loss/neg"} <= set(rows(result.run_dir, "train")[-1])
    assert 0 <= result.metrics["rsum"] <= 600


def test_auto_mode_by_dataset_size():
    assert auto_mode(100, 128, 20000) == "batch"
    assert auto_mode(129, 128, 20000) == "global"
    assert auto_mode(20000, 128, 20000) == "global"
    assert auto_mode(20001, 128, 20000) == "queue"


def test_memory_queue_global_negatives_run(tmp_path):
    """auto on 64 training images and batch 16: the global bank, embedded before the first
    step and after each epoch, in the checkpoint; nothing is queued."""
    result, said = train(tmp_path, "global", run={"max_steps": 22},
                         loss={"name": "memory_queue", "mode": "auto"})
    assert "memory_queue: mode auto -> global (64 training images" in said
    assert said.count("global negatives: 64 images and 320 captions embedded") == 2
    state = loss_state(result.run_dir)
    assert state["text_bank.feats"].shape == (320, 32) and state["image_bank.ids"].shape == (64,)
    assert int(state["text_queue.count"]) == 0
    old = {k: v for k, v in state.items() if "_bank." not in k}  # a checkpoint of mmfw 0.1
    restored = mmfw.create("loss", "memory_queue")
    restored.load_state_dict(old)
    assert len(restored.text_bank) == 0


def test_alignment_alone_collapses_and_the_detector_flags_it(tmp_path):
    """Regression has no negatives: trained alone, every embedding turns the same way (mean
    cosine of unmatched pairs -> 1, gap -> 0) and the collapse detector stops the run; the same
    recipe with InfoNCE opens the gap and is not flagged."""
    common = {"run": {"epochs": 4, "log_every": 10}, "optim": {"lr": 3e-3},
              "diagnostics": {"every": 10, "grace_steps": 30, "probe_size": 32,
                              "stop_on_collapse": True}}
    result, said = train(tmp_path, "align", loss={"name": "alignment", "metric": "cosine"},
                         **common)
    assert result.stopped_by == "collapse" and "COLLAPSE WARNING" in said
    warning = rows(result.run_dir, "warning")[0]
    assert warning["symptom"] == "no-gap" and warning["values"]["sim/neg_mean"] > 0.95
    control, said = train(tmp_path, "infonce", loss={"name": "infonce"}, **common)
    assert control.stopped_by == "epochs" and "COLLAPSE WARNING" not in said
    assert rows(control.run_dir, "diagnostics")[-1]["probe/sim/gap"] > 0.05


def test_regression_warmup_recipe(tmp_path):
    """recipes/seed_regression_warmup.toml validates as documented, and runs (scaled down by
    overrides): alignment, then InfoNCE, then semi-hard negatives."""
    path = ROOT / "recipes" / "seed_regression_warmup.toml"
    r = mmfw.load_recipe(path)
    stages = r.schedule.options.stages
    assert [s.name for s in stages] == ["regression", "contrastive", "finetune"]
    assert stages[0].loss == {"name": "alignment", "metric": "cosine"}
    small = [f"run.output_dir={tmp_path}", "run.epochs=4", "run.max_steps=64",
             "run.progress=false", "backend.name=cpu", "backend.precision=fp32",
             "backend.threads=1", "data.train_images=64", "data.val_images=16",
             "data.test_images=32", "data.image_size=16", "sampler.batch_size=16",
             "model.embed_dim=32", "model.vision.image_size=16", "model.vision.width=32",
             "model.vision.depth=1", "model.vision.heads=2", "model.text.width=32",
             "model.text.depth=1", "model.text.heads=2", "model.text.vocab_size=200",
             "schedule.warmup_steps=2", "eval.val_split="]
    lines: list[str] = []
    result = mmfw.train(mmfw.load_recipe(path, small), console=lines.append)
    said = "\n".join(lines)
    for stage, loss in (("regression", "alignment"), ("contrastive", "infonce"),
                        ("finetune", "hard_negative")):
        assert f"stage '{stage}' from step" in said and f"loss {loss}" in said
    assert result.steps == 64 and 0 <= result.metrics["rsum"] <= 600


# ---- the pca adapter -------------------------------------------------------------------------

def test_pca_fit_is_principal_components():
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    x = (torch.randn(500, 6, generator=g) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])) @ basis.T
    x = x + 7.0
    adapter = mmfw.create("adapter", "pca", in_dim=6, out_dim=3)
    torch.testing.assert_close(adapter(x), x[:, :3])  # unfitted: the first coordinates
    values = adapter.fit(x)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy().T)))[::-1][:3]
    torch.testing.assert_close(values.double(), torch.tensor(ref.copy()), rtol=1e-4, atol=1e-6)
    w = adapter.components
    torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-5, rtol=0)
    y = adapter(x)
    cov = torch.cov(y.T)
    torch.testing.assert_close(cov, torch.diag(values), rtol=1e-3, atol=1e-3)
    assert bool(adapter.fitted) and not list(adapter.parameters())
    white = mmfw.create("adapter", "pca", in_dim=6, out_dim=3, whiten=True, eps=1e-9)
    white.fit(x)
    torch.testing.assert_close(torch.cov(white(x).T), torch.eye(3), rtol=1e-3, atol=1e-3)
    with pytest.raises(PluginError, match="pca reduces"):
        mmfw.create("adapter", "pca", in_dim=4, out_dim=8)


def test_pca_adapter_run_fits_before_training_and_checkpoints_it(tmp_path):
    model = {"embed_dim": 16, "adapter": {"name": "pca", "whiten": True, "sample": 40}}
    result, said = train(tmp_path, "pca", run={"max_steps": 3}, model=model)
    assert "pca: vision adapter fitted on 40 training features, 32 -> 16 dims" in said
    assert "pca: text adapter fitted on 200 training features" in said  # 5 captions each
    run = mmfw.load_run(result.run_dir).model
    assert bool(run.vision_adapter.fitted) and bool(run.text_adapter.fitted)
    w = run.text_adapter.components
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)
    _, said = train(tmp_path, "pca", resume=True, run={"max_steps": 5}, model=model)
    assert "pca:" not in said  # fitted once: the checkpoint holds the projection
    assert torch.equal(mmfw.load_run(result.run_dir).model.text_adapter.components, w)


def test_mmfw_list_shows_the_new_components():
    out = cli("list").output
    for name in ("prototypical", "spectral", "alignment", "pca", "prototypes",
                 "global-negatives", "pca-fit"):
        assert name in out, name
    options = cli("list", "loss", "--options").output
    for key in ("mode = 'queue'", "global_limit = 20000", "clusters = (100, 250, 500)",
                "metric = 'mse'", "mu = 1.0"):
        assert key in options, key
