"""Precision and backends on the CPU, torch.compile, modality gradient balancing, early stopping,
checkpoint retention (last K and best) and periodic checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmfw
from helpers import assert_user_error, cli, tiny_recipe
from mmfw.eval.retrieval import METRIC_KEYS
from mmfw.inference.model import placement
from mmfw.run import checkpoint as ckpt
from mmfw.train.loop import Trainer
from mmfw.train.params import balance_towers
from mmfw_backends.cpufeatures import bf16_flag, cpu_flags

QUIET = {"console": lambda _: None}


def _train(tmp_path: Path, name: str, **sections) -> mmfw.RunResult:
    data = tiny_recipe(tmp_path / "runs", name=name, **sections)
    return mmfw.train(mmfw.load_recipe(data), **QUIET)


def _rows(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["type"] == kind]


def _steps(run_dir: Path) -> list[int]:
    return ckpt.list_steps(run_dir / "checkpoints")


# precision ------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu(tmp_path) -> None:
    backend = mmfw.create("backend", "cpu", precision="bf16")
    with backend.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    assert backend.grad_scaler() is None
    result = _train(tmp_path, "bf16", backend={"precision": "bf16"},
                    run={"max_steps": 6, "log_every": 3})
    rows = _rows(result.run_dir)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert list(result.metrics) == list(METRIC_KEYS)


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512_bf16 vaes
"""
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_name_the_native_bf16_feature() -> None:
    assert bf16_flag(cpu_flags(X86_CPUINFO)) == "avx512_bf16"
    assert bf16_flag(cpu_flags(X86_CPUINFO + "flags\t: amx_bf16 amx_tile\n")) == "amx_bf16"
    assert bf16_flag(cpu_flags(ARM_CPUINFO)) == "bf16"
    assert bf16_flag(cpu_flags(X86_CPUINFO.replace(" avx512_bf16", ""))) is None


@pytest.mark.parametrize("native", ["avx512_bf16", None])
def test_auto_precision_takes_bf16_only_where_the_cpu_has_it(monkeypatch, native) -> None:
    """precision = "auto" (the default): bf16 autocast on a CPU with bf16 matrix instructions,
    fp32 (no autocast) on one without, where emulated bf16 is slower than fp32; inference on
    the run's backend gets the resolved precision."""
    import mmfw_backends.cpufeatures as features

    monkeypatch.setattr(features, "native_bf16", lambda: native)
    backend = mmfw.create("backend", "cpu", precision="auto")
    expected = "bf16" if native else "fp32"
    assert backend.precision == expected
    with backend.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    assert f"{expected} (auto: {native or 'no bf16 matrix instructions'})" in backend.describe()
    assert placement(("cpu", {"precision": "auto"}), None, None)[1] == expected
    # auto is the default, of the cpu backend and of the auto backend's CPU fallback
    assert mmfw.create("backend", "cpu").precision == expected
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert mmfw.create("backend", "auto").precision == expected
        assert mmfw.create("backend", "auto", precision="fp16").precision == "fp32"


def test_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path) -> None:
    """fp16 autocast with a GradScaler (the CUDA fp16 path, run on the CPU): unscaled before
    clipping, its scale saved with each checkpoint and restored on resume."""
    data = tiny_recipe(tmp_path / "runs", name="fp16", backend={"precision": "fp16"},
                       run={"max_steps": 5}, optim={"grad_clip": 1.0}, eval={"val_split": ""})
    result = mmfw.train(mmfw.load_recipe(data), **QUIET)
    state = json.loads((result.run_dir / "checkpoints" / "step-00000005.json").read_text())
    scale = state["scaler"]["scale"]
    assert scale > 0 and math.isfinite(scale)
    grad_norms = [r["optim/grad_norm"] for r in _rows(result.run_dir)]
    assert all(math.isfinite(g) and g < 1e3 for g in grad_norms)  # unscaled norms
    data["run"]["max_steps"] = 7
    trainer = Trainer(mmfw.load_recipe(data), resume=True, **QUIET)
    assert trainer.step == 5
    assert trainer.opt.scaler.get_scale() == scale


# backends -------------------------------------------------------------------------------------


def test_compile_and_channels_last_train_like_eager(tmp_path) -> None:
    """torch.compile (dynamo with its eager backend: the inductor C++ build takes minutes on
    a small CPU) compiles the towers in place: same parameter names, same training."""
    plain = _train(tmp_path, "plain", run={"max_steps": 3}, eval={"val_split": ""})
    compiled = _train(tmp_path, "compiled", run={"max_steps": 3}, eval={"val_split": ""},
                      backend={"compile": True, "compile_backend": "eager",
                               "channels_last": True})
    a = load_file(str(plain.run_dir / "checkpoints" / "step-00000003.safetensors"))
    b = load_file(str(compiled.run_dir / "checkpoints" / "step-00000003.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert compiled.metrics == pytest.approx(plain.metrics)


@pytest.mark.skipif(os.environ.get("MMFW_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ kernels: ~45 s for a tiny model on one CPU "
                           "core; set MMFW_TEST_INDUCTOR=1 to run it")
def test_inductor_compile(tmp_path) -> None:
    result = _train(tmp_path, "inductor", run={"max_steps": 2}, eval={"val_split": ""},
                    backend={"compile": True})
    assert math.isfinite(_rows(result.run_dir)[-1]["loss"])


def test_unavailable_backends_say_why(tmp_path, write_recipe) -> None:
    for name, available, why in (("cuda", torch.cuda.is_available(), "sees no CUDA GPU"),
                                 ("mps", torch.backends.mps.is_available(), "MPS")):
        if available:
            continue
        data = tiny_recipe(tmp_path / "runs", name=name)
        data["backend"] = {"name": name}
        assert_user_error(cli("run", write_recipe(data, f"{name}.toml")),
                          f"backend '{name}' is not available", why)


def test_mps_fallback_hint() -> None:
    """torch reads PYTORCH_ENABLE_MPS_FALLBACK at import: the backend says how to set it."""
    mps = mmfw.create("backend", "mps")
    mps.fallback_active = False
    err = NotImplementedError("The operator 'aten::foo' is not currently implemented for the "
                              "MPS device.")
    hint = mps.explain(err)
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in hint and "aten::foo" in hint
    assert "fallback OFF" in mps.describe()
    assert mps.explain(NotImplementedError("something else")) is None
    mps.fallback_active = True
    assert "even with the CPU fallback on" in mps.explain(err)


def test_cpu_threads_option() -> None:
    before = torch.get_num_threads()
    try:
        backend = mmfw.create("backend", "cpu", threads=2)
        assert torch.get_num_threads() == 2
        assert "2 threads" in backend.describe()
    finally:
        torch.set_num_threads(before)


# modality gradient balancing -----------------------------------------------------------------


def test_balance_towers_math() -> None:
    v = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    t = [torch.nn.Parameter(torch.zeros(4))]
    v[0].grad, v[1].grad = torch.tensor([3.0, 0, 0]), torch.full((2, 2), 2.0)  # |g_v| = 5
    t[0].grad = torch.tensor([0.5, 0, 0, 0])  # |g_t| = 0.5
    stats = balance_towers(v, t, ratio=2.0, strength=1.0)
    gv = math.hypot(float(v[0].grad.norm()), float(v[1].grad.norm()))
    gt = float(t[0].grad.norm())
    assert gv / gt == pytest.approx(2.0)
    assert math.hypot(gv, gt) == pytest.approx(math.hypot(5, 0.5))  # joint norm kept
    assert stats["balance/vision_before"] == pytest.approx(5.0)
    assert stats["balance/vision_after"] == pytest.approx(gv)
    # half strength: part of the way (geometrically)
    t[0].grad = torch.tensor([0.5, 0, 0, 0])
    v[0].grad, v[1].grad = torch.tensor([3.0, 0, 0]), torch.full((2, 2), 2.0)
    half = balance_towers(v, t, ratio=1.0, strength=0.5)
    r = half["balance/vision_after"] / half["balance/text_after"]
    assert r == pytest.approx(10.0 ** 0.5)


def test_modality_balancing_is_visible_in_metrics(tmp_path) -> None:
    result = _train(tmp_path, "balance", run={"max_steps": 10, "log_every": 2},
                    optim={"modality_balance": 1.0, "modality_ratio": 0.5},
                    eval={"val_split": ""})
    rows = _rows(result.run_dir)
    assert len(rows) == 5
    for row in rows:
        before = row["balance/vision_before"] / row["balance/text_before"]
        after = row["balance/vision_after"] / row["balance/text_after"]
        assert after == pytest.approx(0.5, rel=1e-4)
        assert before != pytest.approx(0.5, rel=1e-2)
        assert math.hypot(row["balance/vision_after"], row["balance/text_after"]) == \
            pytest.approx(math.hypot(row["balance/vision_before"], row["balance/text_before"]),
                          rel=1e-4)


# early stopping and checkpoints ----------------------------------------------------------------


def test_early_stopping_on_val_rsum(tmp_path) -> None:
    """A learning rate too small to move the val rsum by min_delta: after `patience`
    evaluations without a gain, training ends, the run still evaluates."""
    result = _train(tmp_path, "early", run={"epochs": 6}, optim={"lr": 1e-9},
                    eval={"patience": 2, "min_delta": 1.0})
    assert result.stopped_by == "early_stopping"
    assert result.steps == 3 * 20  # best at epoch 1, no gain at epochs 2 and 3
    val = [r for r in _rows(result.run_dir, "eval") if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics


def test_keep_last_and_best(tmp_path) -> None:
    data = tiny_recipe(tmp_path / "runs", name="best", run={"epochs": 4, "keep_last": 1},
                       eval={"restore_best": True}, optim={"lr": 3e-3})
    result = mmfw.train(mmfw.load_recipe(data), **QUIET)
    val = [r for r in _rows(result.run_dir, "eval") if r["split"] == "val"]
    best_row = max(val, key=lambda r: (r["rsum"], -r["step"]))  # the first of equal bests
    best = ckpt.best(result.run_dir / "checkpoints")
    assert best == best_row["step"]
    assert _steps(result.run_dir) == sorted({best, 80})  # the last one and the best
    record = json.loads((result.run_dir / "checkpoints" / "best").read_text())
    assert record["rsum"] == best_row["rsum"] and record["epoch"] == best_row["epoch"]
    # restore_best: metrics.json is the best checkpoint's, and load_run/`mmfw eval` agree
    loaded = mmfw.load_run(result.run_dir)
    assert loaded.step == best
    assert mmfw.evaluate(loaded) == result.metrics
    assert mmfw.load_run(result.run_dir, checkpoint="latest").step == 80
    out = cli("eval", result.run_dir)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == result.metrics


def test_checkpoint_every(tmp_path) -> None:
    result = _train(tmp_path, "every", run={"checkpoint_every": 7, "keep_last": 20},
                    eval={"val_split": ""})
    assert _steps(result.run_dir) == [7, 14, 20, 21, 28, 35, 40]
    for step in (7, 35):
        state = json.loads((result.run_dir / "checkpoints" / f"step-{step:08d}.json").read_text())
        assert state["sampler"]["position"] == step % 20
    kept = _train(tmp_path, "every2", run={"checkpoint_every": 7}, eval={"val_split": ""})
    assert _steps(kept.run_dir) == [35, 40]  # run.keep_last = 2 by default


def test_resume_may_change_retention(tmp_path, write_recipe) -> None:
    recipe = write_recipe(tiny_recipe(tmp_path / "runs", name="ret", run={"max_steps": 5},
                                      eval={"val_split": ""}))
    assert cli("run", recipe).exit_code == 0
    result = cli("run", recipe, "--resume", "--set", "run.max_steps=9", "--set",
                 "run.keep_last=5", "--set", "run.checkpoint_every=2")
    assert result.exit_code == 0, result.output
    assert _steps(tmp_path / "runs" / "ret") == [5, 6, 8, 9]


# driving the loop from outside ----------------------------------------------------------------

def test_run_step_is_the_step_fit_takes(tmp_path) -> None:
    """A loop of ``Trainer.run_step`` over the loader ends at the weights ``fit`` ends at
    (fit adds only logging, diagnostics, evaluation and checkpoints), through the schedule."""
    fitted = _train(tmp_path, "fit")
    recipe = mmfw.load_recipe(tiny_recipe(tmp_path / "runs", name="loop"))
    trainer = Trainer(recipe, **QUIET)
    trainer.model.train()
    lrs = []
    for epoch in range(recipe.run.epochs):
        trainer.sampler.set_epoch(epoch)
        for batch in trainer.loader:
            step = trainer.run_step(batch)
            lrs.append(step.lr)
            assert step.image.shape[1] == step.text.shape[1] == recipe.model.embed_dim
            assert math.isfinite(float(step.output.loss.detach()))
    assert trainer.step == fitted.steps == len(lrs)
    logged = {r["step"]: r["lr"] for r in _rows(fitted.run_dir)}
    assert all(lrs[s - 1] == pytest.approx(lr) for s, lr in logged.items())
    want = load_file(str(fitted.run_dir / "checkpoints" / f"step-{fitted.steps:08d}.safetensors"))
    got = {**{"model." + k: v for k, v in trainer.model.state_dict().items()},
           **{"loss." + k: v for k, v in trainer.opt.losses.state_dict().items()}}
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_uint8_hand_over_trains_like_float_pixels(tmp_path) -> None:
    """data.uint8 (default): the loader's batches hold uint8 pixels, normalised in the step on
    the device; a run ends at the weights of the float32 hand-over (data.uint8 = false)."""
    runs = {}
    for uint8 in (True, False):
        recipe = mmfw.load_recipe(tiny_recipe(tmp_path / "runs", name=f"u{int(uint8)}",
                                              data={"uint8": uint8}, run={"epochs": 1}))
        trainer = Trainer(recipe, **QUIET)
        batch = next(iter(trainer.loader))
        assert batch.pixels.dtype == (torch.uint8 if uint8 else torch.float32)
        trainer.fit()
        runs[uint8] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=0, atol=0, msg=k)


def test_encoders_without_a_uint8_path_hand_over_float() -> None:
    from mmfw.data.datasource import pixel_preprocess

    class Plain:
        def preprocess(self, image):
            return torch.zeros(3, 4, 4)

    class Partial(Plain):
        def preprocess_uint8(self, image):
            raise NotImplementedError

        def normalize(self, pixels):
            return pixels.float()

    for enc in (Plain(), Partial()):
        assert pixel_preprocess(enc, True) == enc.preprocess
    full = mmfw.create("encoder", "scratch-vision", image_size=16, patch_size=8, width=16,
                       depth=1, heads=2)
    assert pixel_preprocess(full, True) == full.preprocess_uint8
    assert pixel_preprocess(full, False) == full.preprocess
