"""Seed ensembles (averaged similarity, seed 000 §5) and distillation from a trained teacher,
on the synthetic set."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.nn.functional as F

import mmfw
from helpers import assert_user_error, cli, deep_merge, tiny_recipe
from mmfw.data.batching import Collate, Pairs
from mmfw.eval.retrieval import embed_split, ensemble_embeddings, ensemble_similarity, recall_at_k
from mmfw.run.loaded import ensemble_members
from mmfw_callbacks.teacher import Teacher, TeacherBatch, TeacherCollate

pytestmark = pytest.mark.slow

QUIET = {"console": lambda _: None}
#: members that learn within 4 short epochs: a wider model than TINY, a higher LR, easy scenes
WIDE = {"embed_dim": 64, "vision": {"width": 64, "heads": 4}, "text": {"width": 64, "heads": 4}}
DATA = {"test_images": 100, "difficulty": "easy"}


def test_ensemble_embeddings_rank_by_the_averaged_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(20, d, generator=g) for d in (8, 5, 8)]
    texts = [torch.randn(60, d, generator=g) for d in (8, 5, 8)]
    owner = torch.arange(60) // 3
    img, txt = ensemble_embeddings(images, texts)
    avg = ensemble_similarity(images, texts)
    torch.testing.assert_close(img @ txt.T, avg)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(20))
    # recall from the joint embeddings = recall from the averaged matrix, ranked explicitly
    top = avg.topk(10, dim=1).indices
    i2t_r1 = float((owner[top[:, :1]] == torch.arange(20)[:, None]).any(1).float().mean() * 100)
    assert recall_at_k(img, txt, owner)["i2t_R@1"] == pytest.approx(i2t_r1)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> tuple[Path, mmfw.RunResult, Path]:
    root = tmp_path_factory.mktemp("ens")
    data = tiny_recipe(root / "runs", name="ens", run={"epochs": 4}, optim={"lr": 3e-3},
                       model=WIDE, data=DATA, eval={"val_split": ""},
                       ensemble={"seeds": [4, 5, 6]})
    recipe = root / "ens.toml"
    recipe.write_text(tomli_w.dumps(data), encoding="utf-8")
    result = cli("run", recipe)
    assert result.exit_code == 0, result.output
    d = root / "runs" / "ens"
    return recipe, mmfw.RunResult(d, json.loads((d / "metrics.json").read_text()), 0, 0.0,
                                  "ensemble"), root


def test_ensemble_directory_and_its_rsum(ensemble) -> None:
    _, result, _ = ensemble
    d = result.run_dir
    members = ensemble_members(d)
    assert [m.name for m in members] == ["seed-4", "seed-5", "seed-6"]
    summary = json.loads((d / "ensemble.json").read_text())
    rsums = [summary["member_metrics"][m.name]["rsum"] for m in members]
    for m, seed in zip(members, (4, 5, 6)):
        recipe = mmfw.load_recipe(m / "recipe.toml")
        assert recipe.run.seed == seed and recipe.ensemble.seeds == ()
        assert json.loads((m / "metrics.json").read_text())["rsum"] in rsums
    # averaging the members' similarities is at least as good as the best member, within the
    # evaluation's noise (one i2t hit at R@1 on 100 images is 1 rsum point), and beats their mean
    ens = result.metrics["rsum"]
    assert ens >= max(rsums) - 5.0, (ens, rsums)
    assert ens > sum(rsums) / len(rsums)


def test_eval_of_an_ensemble(ensemble) -> None:
    _, result, _ = ensemble
    d = result.run_dir
    by_dir = cli("eval", d)
    assert by_dir.exit_code == 0, by_dir.output
    assert json.loads(by_dir.output) == result.metrics
    by_members = cli("eval", *ensemble_members(d))
    assert by_members.exit_code == 0, by_members.output
    assert json.loads(by_members.output) == result.metrics
    one = cli("eval", d / "seed-4")
    assert json.loads(one.output) == json.loads((d / "seed-4" / "metrics.json").read_text())
    assert_user_error(cli("eval", d, d / "nope"), "not a run directory")
    with pytest.raises(mmfw.MmfwError, match="ensemble directory"):
        mmfw.load_run(d)


def test_ensemble_resume_skips_finished_members(ensemble) -> None:
    recipe, result, _ = ensemble
    before = (result.run_dir / "seed-5" / "metrics.jsonl").read_text()
    again = cli("run", recipe, "--resume")
    assert again.exit_code == 0, again.output
    assert again.output.count("already trained") == 3
    assert (result.run_dir / "seed-5" / "metrics.jsonl").read_text() == before
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics
    assert_user_error(cli("run", recipe), "already exists", "--resume")


# distillation -----------------------------------------------------------------------------------


def _similarities(model, split) -> torch.Tensor:
    img, txt, _ = embed_split(model, split)
    return (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).flatten()


def test_student_learns_from_the_teacher(ensemble) -> None:
    """A narrower student (width 32 vs 64, its own tokenizer vocabulary, so the teacher gets its
    own inputs) trained only on the teacher's similarity distributions (alpha = 0) ends up
    ranking like the teacher, and retrieves better than the same student trained with InfoNCE
    for the same budget."""
    _, result, root = ensemble
    teacher_dir = result.run_dir / "seed-6"
    base = dict(run={"epochs": 3}, optim={"lr": 3e-3}, data={"difficulty": "easy"},
                eval={"val_split": ""}, model={"text": {"vocab_size": 150}})
    runs = {}
    for name, extra in (("plain", {"loss": {"name": "infonce"}}),
                        ("student", {"loss": {"name": "distillation", "alpha": 0.0},
                                     "distill": {"teacher": str(teacher_dir)}})):
        data = tiny_recipe(root / "runs", name=name, **deep_merge(base, extra))
        runs[name] = mmfw.train(mmfw.load_recipe(data), **QUIET)
    teacher = mmfw.load_run(teacher_dir)
    source = mmfw.create("dataset", "synthetic", options=teacher.recipe.data.dataset.options)
    split = source.split("train")
    t = _similarities(teacher.model, split)
    corr = {name: float(torch.corrcoef(torch.stack(
        [t, _similarities(mmfw.load_run(r.run_dir).model, split)]))[0, 1])
        for name, r in runs.items()}
    assert corr["student"] > corr["plain"] + 0.2, corr
    assert runs["student"].metrics["rsum"] > runs["plain"].metrics["rsum"], (
        runs["student"].metrics, runs["plain"].metrics)


def test_ensemble_teacher_embeddings_and_own_inputs(ensemble) -> None:
    """An ensemble teacher: every member tokenizes for itself and preprocesses images for itself
    when its preprocessing differs from the student's, in the collate, from the same rows; the
    result ranks by the members' averaged cosine similarity."""
    _, result, _ = ensemble
    teacher = Teacher.load(result.run_dir, device=torch.device("cpu"),
                           autocast=contextlib.nullcontext)
    assert len(teacher.models) == 3
    members = [mmfw.load_run(m) for m in ensemble_members(result.run_dir)]
    split = mmfw.create("dataset", "synthetic",
                        options=members[0].recipe.data.dataset.options).split("train")
    pairs = Pairs(split)
    text = mmfw.create("encoder", "scratch-text", vocab_size=150, width=32, heads=2, depth=1)
    text.prepare(pairs.texts())
    for vision, own_pixels in (
            (members[0].model.vision, False),  # the teacher's own preprocessing: shared
            (mmfw.create("encoder", "scratch-vision", image_size=24, patch_size=8, width=32,
                         depth=1, heads=2), True)):

        class Student(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vision, self.text = vision, text  # noqa: B023

        class Loader:
            collate_fn = Collate(vision.preprocess, text.tokenize, pairs.items)

        loader = Loader()
        loader.collate_fn = teacher.collate(Student(), pairs)(loader.collate_fn)
        assert teacher.own_pixels == [own_pixels] * 3
        assert isinstance(loader.collate_fn, TeacherCollate)
        rows = [pairs[k] for k in (0, 7, 3, 12, 40, 41)]
        batch = loader.collate_fn(rows).to(torch.device("cpu"))
        assert isinstance(batch, TeacherBatch) and len(batch.teacher) == 3
        assert all((px is not None) == own_pixels for px, _ in batch.teacher)
        img, txt = teacher.embed(batch)
        with torch.no_grad():
            own = [(m.model.encode_image(torch.stack(
                        [m.model.vision.preprocess(split[i].image)
                         for i in dict.fromkeys(r[3] for r in rows)])),
                    m.model.encode_text(m.model.text.tokenize([r[1] for r in rows])))
                   for m in members]
        want_img, want_txt = ensemble_embeddings([o[0] for o in own], [o[1] for o in own])
        torch.testing.assert_close(img @ txt.T, want_img @ want_txt.T, rtol=1e-4, atol=1e-5)


def test_distillation_recipe_mistakes(tmp_path, write_recipe) -> None:
    no_teacher = write_recipe(tiny_recipe(tmp_path / "runs", loss={"name": "distillation"}))
    assert_user_error(cli("run", no_teacher), "distill.teacher", "needs teacher_image")
    missing = write_recipe(tiny_recipe(tmp_path / "runs", name="m",
                                       loss={"name": "distillation"},
                                       distill={"teacher": str(tmp_path / "nowhere")}), "m.toml")
    assert_user_error(cli("run", missing), "distill.teacher", "not a directory")
