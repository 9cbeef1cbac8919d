"""Schedules: LR factors (onecycle against torch), stage plans, parameter naming and groups, and
what the engine does with them: which parameters get gradients and which LR each group has."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import mmfw
from helpers import tiny_recipe
from mmfw.contracts import StagePlan
from mmfw.errors import PluginError, RecipeError
from mmfw.train.loop import Trainer
from mmfw.train.params import ParamTable, first_match, lr_multipliers, matches

# --------------------------------------------------------------------------------------------
# LR factors


@pytest.mark.parametrize("kw", [
    {},  # the seeds' parameters: pct_start 0.1, div 25, final div 1e4
    {"pct_start": 0.3, "anneal": "linear"},
    {"three_phase": True, "div_factor": 10.0, "final_div_factor": 100.0},
])
def test_onecycle_is_torch_onecycle_lr(kw) -> None:
    total, max_lr = 57, 3e-3
    sched = mmfw.create("scheduler", "onecycle", total_steps=total, **kw)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=max_lr)
    torch_kw = {"anneal_strategy": kw.get("anneal", "cos"),
                "three_phase": kw.get("three_phase", False),
                "pct_start": kw.get("pct_start", 0.1),
                "div_factor": kw.get("div_factor", 25.0),
                "final_div_factor": kw.get("final_div_factor", 1e4)}
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, **torch_kw)
    for step in range(total):
        assert max_lr * sched.lr_factor(step) == pytest.approx(opt.param_groups[0]["lr"],
                                                                rel=1e-9), step
        assert sched.momentum(step) == pytest.approx(opt.param_groups[0]["betas"][0]), step
        opt.step()
        ref.step()


def test_onecycle_shape_and_no_momentum_option() -> None:
    s = mmfw.create("scheduler", "onecycle", total_steps=100, cycle_momentum=False)
    assert s.lr_factor(0) == pytest.approx(1 / 25)
    assert s.lr_factor(9) == pytest.approx(1.0)
    assert s.lr_factor(99) == pytest.approx(1 / 25 / 1e4)
    assert s.momentum(50) is None


def test_warmup_cosine_and_constant() -> None:
    w = mmfw.create("scheduler", "warmup-cosine", total_steps=110, warmup_steps=10,
                    min_lr_ratio=0.1)
    assert w.lr_factor(0) == pytest.approx(0.1)
    assert w.lr_factor(9) == pytest.approx(1.0)
    assert w.lr_factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert w.lr_factor(110) == pytest.approx(0.1)
    c = mmfw.create("scheduler", "constant", total_steps=5, steps_per_epoch=5, groups=())
    assert [c.lr_factor(i) for i in range(3)] == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# stage plans


def _three(total: int = 100, spe: int = 10, **options):
    return mmfw.create("scheduler", "three-stage", total_steps=total, steps_per_epoch=spe,
                       **options)


def test_seed_three_stage_defaults() -> None:
    """Seed 001 §1.1: infonce with fusion frozen and base encoders at 0.1x; memory queue (8192)
    with the base encoders frozen; semi-hard negatives with base 0.02x, fusion 0.1x."""
    s = _three()
    a, b, c = s.plan(0, 0), s.plan(30, 3), s.plan(99, 9)
    assert (a.stage, b.stage, c.stage) == ("modality", "fusion", "finetune")
    assert a.frozen == ("fusion",) and dict(a.lr_mult) == {"vision": 0.1, "text": 0.1}
    assert b.frozen == ("vision", "text")
    assert c.frozen == () and dict(c.lr_mult) == {"vision": 0.02, "text": 0.02, "fusion": 0.1}
    assert s.losses() == {"infonce": ("infonce", {}),
                          "memory_queue": ("memory_queue", {"size": 8192}),
                          "hard_negative": ("hard_negative", {"mining": "semi-hard",
                                                              "factor": 2.0})}
    assert (a.loss, b.loss, c.loss) == ("infonce", "memory_queue", "hard_negative")
    assert s.bounds == [0, 30, 60, 100]


def test_stage_lengths_lr_restart_and_loss_labels() -> None:
    stages = [
        {"name": "a", "epochs": 1.5, "loss": "infonce"},
        {"name": "b", "steps": 7, "loss": {"name": "infonce", "temperature": 0.1}},
        {"name": "c", "fraction": 0.2, "loss": "infonce"},
        {"name": "d"},  # the rest, with the recipe's [loss]
    ]
    s = _three(total=100, spe=10, stages=stages, warmup_steps=4, min_lr_ratio=0.0)
    assert s.bounds == [0, 15, 22, 42, 100]
    assert [s.plan(i, 0).stage for i in (0, 14, 15, 21, 22, 41, 42, 99)] == list("aabbccdd")
    # one loss per distinct spec; a name used with two option sets is told apart by stage
    assert [s.plan(i, 0).loss for i in (0, 15, 22, 42)] == ["infonce[0]", "infonce[1]",
                                                           "infonce[0]", None]
    assert set(s.losses()) == {"infonce[0]", "infonce[1]"}
    # the LR warms up again at each stage start and decays to 0 at its end
    for start, end in ((0, 15), (15, 22), (22, 42), (42, 100)):
        assert s.lr_factor(start) == pytest.approx(1 / 4)
        assert s.lr_factor(start + 3) == pytest.approx(1.0)
        after = [s.lr_factor(i) for i in range(start + 3, end)]
        assert after == sorted(after, reverse=True)
        assert after[-1] < 0.3


@pytest.mark.parametrize(("stages", "fragment"), [
    ([{"epochs": 1, "steps": 3}, {}], "one length"),
    ([{"name": "x"}, {"epochs": 1}], "only the last stage"),
    ([{"loss": "infonse"}], "infonce"),
    ([{"loss": {"name": "memory_queue", "sise": 3}}], "size"),
    ([], "at least one stage"),
])
def test_stage_mistakes_are_recipe_errors(stages, fragment) -> None:
    data = tiny_recipe("runs", schedule={"name": "three-stage", "stages": stages})
    with pytest.raises(RecipeError) as err:
        mmfw.load_recipe(data)
    assert "schedule.stages" in str(err.value)
    assert fragment in str(err.value)


def test_progressive_unfreeze_plan() -> None:
    groups = ("vision.embeddings", "vision.layers.0", "vision.layers.1", "vision.layers.2",
              "vision.head", "text", "vision_adapter", "text_adapter", "loss")
    s = mmfw.create("scheduler", "progressive-unfreeze", total_steps=100, steps_per_epoch=10,
                    groups=groups, every_epochs=2, blocks=1)
    frozen = {e: set(s.plan(e * 10, e).frozen) for e in range(10)}
    allv = {"vision.embeddings", "vision.layers.0", "vision.layers.1", "vision.layers.2",
            "vision.head"}
    assert frozen[0] == frozen[1] == allv | {"text"}  # text has no named groups: one block
    assert frozen[2] == {"vision.embeddings", "vision.layers.0", "vision.layers.1"}
    assert frozen[4] == {"vision.embeddings", "vision.layers.0"}
    assert frozen[6] == {"vision.embeddings"}  # every block; the embeddings come next
    assert frozen[8] == frozen[9] == set()
    assert s.plan(0, 0).stage == "top-0" and s.plan(60, 6).stage == "top-3"


def test_seed_three_stage_recipe() -> None:
    """recipes/seed_three_stage.toml is the seeds' setup (001 §1.1, §4.4) and validates."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "seed_three_stage.toml"
    r = mmfw.load_recipe(path)
    assert (r.schedule.name, r.model.vision.name, r.data.dataset.name) == (
        "three-stage", "scratch-vision", "synthetic")
    s = mmfw.create("scheduler", "three-stage", options=r.schedule.options, total_steps=468,
                    steps_per_epoch=78)
    a, b, c = s.plan(0, 0), s.plan(2 * 78, 2), s.plan(3 * 78, 3)
    assert (a.stage, b.stage, c.stage) == ("modality", "fusion", "finetune")
    assert a.frozen == ("fusion",) and dict(a.lr_mult) == {"vision": 0.1, "text": 0.1}
    assert b.frozen == ("vision", "text")
    assert dict(c.lr_mult) == {"vision": 0.02, "text": 0.02, "fusion": 0.1}
    losses = s.losses()
    assert [losses[p.loss][0] for p in (a, b, c)] == ["infonce", "memory_queue", "hard_negative"]
    assert losses[b.loss][1]["size"] == 8192
    assert losses[c.loss][1]["mining"] == "semi-hard"
    assert (r.optim.grad_clip, r.optim.accumulate, r.optim.modality_balance) == (0.5, 2, 1.0)
    assert r.eval.patience and r.eval.restore_best


# --------------------------------------------------------------------------------------------
# parameter names and groups


class TinyEncoder(nn.Module):
    """An encoder with ``named_groups``, as the Encoder contract describes."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(4)

    def named_groups(self) -> dict[str, list[str]]:
        groups = {"embeddings": ["embed.weight", "embed.bias"]}
        for i in range(len(self.blocks)):
            groups[f"layers.{i}"] = [f"blocks.{i}.weight", f"blocks.{i}.bias"]
        groups["head"] = ["norm.weight", "norm.bias"]
        return groups


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision = TinyEncoder()
        self.text = nn.Linear(3, 4)  # no named_groups: one group
        self.vision_adapter = nn.Linear(4, 2, bias=False)
        self.text_adapter = nn.Linear(4, 2, bias=False)
        self.fusion = nn.Linear(2, 2)


def test_param_table_names_groups_and_optimizer_groups() -> None:
    model, loss = TinyModel(), mmfw.create("loss", "infonce")
    model.vision.blocks[1].bias.requires_grad_(False)  # a plugin's own frozen parameter
    t = ParamTable(model, {"loss": loss})
    names = {p.name: p.group for p in t}
    assert names["vision.blocks.0.weight"] == "vision.layers.0"
    assert names["vision.norm.bias"] == "vision.head"
    assert names["text.weight"] == "text"
    assert names["vision_adapter.weight"] == "vision_adapter"
    assert names["fusion.bias"] == "fusion"
    assert any(n.startswith("loss.") for n in names)
    assert "vision.blocks.1.bias" not in names  # stays out: never unfrozen by a schedule
    assert t.groups == ["vision.embeddings", "vision.layers.0", "vision.layers.1",
                        "vision.layers.2", "vision.head", "text", "vision_adapter",
                        "text_adapter", "fusion", "loss"]
    groups = t.optimizer_groups(weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(t)
    for g in groups:
        assert g["weight_decay"] == (0.1 if g["params"][0].ndim >= 2 else 0.0)
        assert {p.ndim >= 2 for p in g["params"]} == {g["weight_decay"] > 0}
    assert {id(p) for p in t.tower("vision")} == {
        id(p) for n, p in [*model.vision.named_parameters(), *model.vision_adapter.
                           named_parameters()] if p.requires_grad}


def test_bad_named_groups_is_a_plugin_error() -> None:
    model = TinyModel()
    model.vision.named_groups = lambda: {"layers.0": ["blocks.9.weight"]}
    with pytest.raises(PluginError, match="no such parameter"):
        ParamTable(model, {})
    model.vision.named_groups = lambda: {"a": ["embed.weight"], "b": ["embed.weight"]}
    with pytest.raises(PluginError, match="two groups"):
        ParamTable(model, {})


def test_patterns() -> None:
    assert matches("vision", "vision.layers.3")
    assert matches("vision", "vision")
    assert not matches("vision", "vision_adapter")
    assert not matches("vision.layers.1", "vision.layers.10")
    assert matches("vision.layers.*", "vision.layers.10")
    assert matches("*_adapter", "text_adapter")
    assert first_match("vision.head", [("text", 1.0), ("vision.head", 0.5), ("vision", 0.1)]) \
        == 0.5
    assert first_match("loss", [("vision", 0.1)]) is None


def test_layer_decay_and_multipliers() -> None:
    t = ParamTable(TinyModel(), {})
    decay = t.layer_decay(0.5)
    assert decay["vision.layers.2"] == decay["vision.head"] == 0.5
    assert decay["vision.layers.1"] == 0.25
    assert decay["vision.layers.0"] == 0.125
    assert decay["vision.embeddings"] == 0.0625
    assert decay["text"] == decay["vision_adapter"] == decay["fusion"] == 1.0
    mults = lr_multipliers(t, [("vision", 0.1)], [("vision.head", 2.0), ("fusion", 0.1)],
                           base=decay)
    assert mults["vision.head"] == pytest.approx(0.5 * 0.1 * 2.0)
    assert mults["vision.layers.0"] == pytest.approx(0.125 * 0.1)
    assert mults["fusion"] == pytest.approx(0.1)
    assert mults["text_adapter"] == 1.0


def test_freeze_returns_unmatched_patterns() -> None:
    t = ParamTable(TinyModel(), {})
    assert t.freeze(["vision.layers.0", "vision.blocks.2.bias", "nothing"]) == ["nothing"]
    frozen = set(t.frozen())
    assert frozen == {"vision.blocks.0.weight", "vision.blocks.0.bias", "vision.blocks.2.bias"}
    t.freeze([])
    assert t.frozen() == []


# --------------------------------------------------------------------------------------------
# the engine applying plans: gradients and learning rates at chosen steps


def _trainer(tmp_path, schedule: dict, **sections) -> Trainer:
    data = tiny_recipe(tmp_path / "runs", **sections)
    data["schedule"] = schedule  # replaced, not merged with TINY's
    return Trainer(mmfw.load_recipe(data), overwrite=True, console=lambda _: None)


def _step_at(trainer: Trainer, batch, step: int, epoch: int) -> float:
    trainer.progress.step, trainer.progress.epoch = step, epoch
    return trainer.run_step(batch).lr


def _names_with_grad(trainer: Trainer) -> set[str]:
    return {p.name for p in trainer.opt.params if p.param.grad is not None}


def _group_lrs(trainer: Trainer) -> dict[str, float]:
    return {g["group"]: g["lr"] for g in trainer.opt.optimizer.param_groups}


STAGES = {
    "name": "three-stage", "warmup_steps": 0,
    "stages": [
        {"name": "heads", "steps": 5, "freeze": ["vision", "text"], "loss": "infonce"},
        {"name": "fusion", "steps": 5, "freeze": ["vision.embeddings", "text"],
         "lr_mult": {"vision.layers.*": 0.1, "vision_adapter": 0.5},
         "loss": {"name": "memory_queue", "size": 64}},
        {"name": "all", "lr_mult": {"vision": 0.02, "text": 0.02},
         "loss": {"name": "hard_negative", "mining": "semi-hard"}},
    ],
}


def test_three_stage_gradients_lrs_and_losses(tmp_path) -> None:
    tr = _trainer(tmp_path, schedule=STAGES, optim={"lr": 1e-3})
    batch = next(iter(tr.loader))
    all_names = {p.name for p in tr.opt.params}
    vision = {n for n in all_names if n.startswith("vision.")}
    text = {n for n in all_names if n.startswith("text.")}
    adapters = {n for n in all_names if n.startswith(("vision_adapter.", "text_adapter."))}
    embeddings = {p.name for p in tr.opt.params if p.group == "vision.embeddings"}

    # stage 1: encoders frozen, infonce: adapters and infonce's temperature get gradients
    lr = _step_at(tr, batch, 2, 0)
    grads = _names_with_grad(tr)
    assert grads & (vision | text) == set()
    assert adapters <= grads
    assert tr.opt.loss is tr.opt.stage_losses["infonce"]
    assert grads - adapters == {n for n in all_names if n.startswith("loss.stages.infonce.")}
    assert list(_group_lrs(tr).values()) == pytest.approx([lr] * len(_group_lrs(tr)))
    frozen_before = {n: p.param.detach().clone() for n, p in
                     ((p.name, p) for p in tr.opt.params) if n in vision}
    assert all(not tr.opt.optimizer.state.get(p.param) for p in tr.opt.params if p.name in vision)

    # stage 2: vision blocks and head train (embeddings frozen), text frozen, memory queue
    lr = _step_at(tr, batch, 7, 0)
    grads = _names_with_grad(tr)
    assert grads & vision == vision - embeddings
    assert grads & text == set()
    assert tr.opt.loss is tr.opt.stage_losses["memory_queue"]
    assert int(tr.opt.stage_losses["memory_queue"].text_queue.count) == len(batch)
    lrs = _group_lrs(tr)
    assert lrs["vision.layers.0"] == pytest.approx(lr * 0.1)
    assert lrs["vision_adapter"] == pytest.approx(lr * 0.5)
    assert lrs["vision.head"] == lrs["text_adapter"] == lrs["loss"] == pytest.approx(lr)
    # frozen parameters did not move and AdamW keeps no state for them
    for p in tr.opt.params:
        if p.group == "vision.embeddings":
            assert torch.equal(p.param, frozen_before[p.name])
            assert not tr.opt.optimizer.state.get(p.param)
        elif p.name in vision:
            assert int(tr.opt.optimizer.state[p.param]["step"]) == 1  # fresh state on unfreezing

    # stage 3: everything trains at the stage's multipliers with semi-hard mining
    lr = _step_at(tr, batch, 12, 0)
    assert _names_with_grad(tr) >= vision | text | adapters
    lrs = _group_lrs(tr)
    for g, v in lrs.items():
        want = 0.02 if g.startswith(("vision.", "text.")) else 1.0
        assert v == pytest.approx(lr * want), g
    assert tr.opt.loss is tr.opt.stage_losses["hard_negative"]
    assert tr.opt.stage_losses["hard_negative"].options.mining == "semi-hard"


def test_progressive_unfreeze_in_the_engine(tmp_path) -> None:
    tr = _trainer(tmp_path, schedule={"name": "progressive-unfreeze", "warmup_steps": 0},
                  optim={"layer_decay": 0.5})
    batch = next(iter(tr.loader))
    adapters = {p.name for p in tr.opt.params if "adapter" in p.group}
    encoders = {p.name for p in tr.opt.params if p.group.startswith(("vision.", "text."))}
    _step_at(tr, batch, 0, 0)  # epoch 0: encoders frozen
    assert _names_with_grad(tr) & encoders == set()
    assert adapters <= _names_with_grad(tr)
    lr = _step_at(tr, batch, 20, 1)  # epoch 1: the top block (TINY has depth 1) and head
    top = {p.name for p in tr.opt.params
           if p.group in ("vision.layers.0", "vision.head", "text.layers.0", "text.head")}
    assert _names_with_grad(tr) & encoders == top
    assert tr.opt.plan == StagePlan("top-1", 1, ("vision.embeddings", "text.embeddings"))
    lr = _step_at(tr, batch, 40, 2)  # epoch 2: the embeddings too
    assert _names_with_grad(tr) >= encoders
    lrs = _group_lrs(tr)
    assert lrs["vision.layers.0"] == pytest.approx(lr * 0.5)
    assert lrs["vision.embeddings"] == pytest.approx(lr * 0.25)


def test_static_freeze_and_lr_mult(tmp_path) -> None:
    tr = _trainer(tmp_path, optim={"freeze": ["text"], "lr_mult": {"vision": 0.1}},
                  schedule={"name": "constant"})
    batch = next(iter(tr.loader))
    lr = _step_at(tr, batch, 0, 0)
    assert not any(n.startswith("text.") for n in _names_with_grad(tr))
    assert any(n.startswith("vision.") for n in _names_with_grad(tr))
    lrs = _group_lrs(tr)
    assert lrs["vision.head"] == pytest.approx(0.1 * lr)
    assert lrs["text_adapter"] == pytest.approx(lr)


def test_onecycle_sets_beta1_in_the_engine(tmp_path) -> None:
    tr = _trainer(tmp_path, schedule={"name": "onecycle"})
    batch = next(iter(tr.loader))
    lr = _step_at(tr, batch, 0, 0)
    assert lr == pytest.approx(tr.recipe.optim.lr / 25)
    assert [g["betas"][0] for g in tr.opt.optimizer.param_groups] == pytest.approx(
        [0.95] * len(tr.opt.optimizer.param_groups))
    assert math.isclose(tr.opt.optimizer.param_groups[0]["betas"][1], 0.98)
