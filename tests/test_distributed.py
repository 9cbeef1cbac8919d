"""Features gathered across 2 gloo processes give the single-process gradient of the whole batch."""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mmfw
from helpers import EXACT_BACKEND, SUBPROCESS_ENV, tiny_recipe
from mmfw.model import build_model
from mmfw.parallel import distributed as D
from mmfw.parallel import sharding
from mmfw.parallel.sharding import full
from mmfw.parallel.strategy import GlobalBatch
from mmfw_losses.hard_negative import HardNegative
from mmfw_losses.infonce import InfoNCE
from mmfw_losses.memory_queue import MemoryQueue
from mmfw_losses.ntxent import NTXent
from mmfw_losses.siglip import SigLIP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: seconds a spawned 2-rank test may take (they take 5-25 s): past it, the test fails
SPAWN_TIMEOUT = 120.0


def _spawn(fn, *args: object, nprocs: int = 2, timeout: float = SPAWN_TIMEOUT) -> None:
    """``torch.multiprocessing.spawn``, bounded: workers still running after ``timeout``
    seconds (a collective waiting for a rank that never comes) are terminated and the test
    fails, instead of hanging CI. A worker's exception fails the test with its traceback."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"{fn.__name__}: ranks {alive} of {nprocs} still running after "
                            f"{timeout:.0f} s (hung collective?): terminated", pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def _bounded_run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout)`` that, on the timeout, kills torchrun's
    workers too (subprocess.run kills the launcher alone, leaving its workers running), then
    fails the test with the output so far."""
    with subprocess.Popen(cmd, cwd=cwd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd[1:])!r} still running after {timeout:.0f} s: killed\n"
                        + out[-3000:] + err[-3000:], pytrace=False)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _hang(rank: int) -> None:
    time.sleep(600)


def test_a_hung_spawned_worker_fails_the_test_and_is_terminated() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"_hang: ranks \[0, 1\] of 2 still running"):
        _spawn(_hang, timeout=0.5)
    assert multiprocessing.active_children() == []


def test_a_hung_subprocess_fails_the_test_and_its_children_are_killed(tmp_path: Path) -> None:
    """As torchrun's launcher: a child whose own child would outlive a plain kill."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "print(f'[{child.pid}]', flush=True)\n"
              "time.sleep(600)\n")
    with pytest.raises(pytest.fail.Exception, match="still running after 2 s") as failed:
        _bounded_run([sys.executable, "-c", script], tmp_path, timeout=2)
    pid = int(re.search(r"\[(\d+)\]", str(failed.value)).group(1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # killed: gone, or a zombie its new parent reaps
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {pid} outlived the timeout")


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(12, 8), nn.Linear(10, 8)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_img, x_txt = torch.randn(8, 12, generator=g), torch.randn(8, 10, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5])  # duplicates: multi-positive across ranks too
    return x_img, x_txt, ids


def _grads(vision: nn.Module, text: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    named = [*(("v." + k, p) for k, p in vision.named_parameters()),
             *(("t." + k, p) for k, p in text.named_parameters()),
             *(("loss." + k, p) for k, p in loss.named_parameters())]
    return {k: p.grad.detach().clone() for k, p in named}


def _single_process() -> dict[str, torch.Tensor]:
    vision, text = _models()
    loss = mmfw.create("loss", "infonce")
    x_img, x_txt, ids = _data()
    out = loss(vision(x_img), text(x_txt), image_ids=ids, text_ids=ids)
    out.loss.backward()
    return _grads(vision, text, loss)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = D.init(torch.device("cpu"))
    assert world.rank == rank and world.distributed
    vision, text = _models()
    vision = nn.parallel.DistributedDataParallel(vision)
    text = nn.parallel.DistributedDataParallel(text)
    loss = mmfw.create("loss", "infonce")
    x_img, x_txt, ids = _data()
    mine = slice(rank * 4, rank * 4 + 4)
    img = D.gather_with_grad(vision(x_img[mine]))
    txt = D.gather_with_grad(text(x_txt[mine]))
    all_ids = D.gather(ids[mine])
    out = loss(img, txt, image_ids=all_ids, text_ids=all_ids)
    out.loss.backward()
    torch.save(_grads(vision.module, text.module, loss), Path(out_dir) / f"rank{rank}.pt")
    del vision, text, out, img, txt  # DDP's reducer holds the group: free it before destroying
    gc.collect()
    D.shutdown()


def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    _spawn(_worker, _free_port(), str(tmp_path))
    expected = _single_process()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_without_a_process_group_gathering_is_the_identity() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert D.gather_with_grad(x) is x
    assert D.gather(x) is x
    if "WORLD_SIZE" not in os.environ:
        assert D.world_from_env() == D.World()


# unequal shards: ranks holding different numbers of image and text rows ----------------------

#: rank 0: 5 images / 9 captions, rank 1: 3 images / 6 captions (a rank's batch keeps one row
#: per image). Ids are global: captions on one rank match images on the other, two captions
#: share an image, image 8 has no caption and caption 99 no image anywhere (unmatched rows).
UNEQUAL_IMAGE_IDS = ([0, 1, 2, 3, 4], [5, 6, 8])
UNEQUAL_TEXT_IDS = ([0, 0, 1, 2, 3, 4, 5, 6, 6], [6, 5, 4, 1, 99, 0])
#: every loss supporting local_loss, built directly: the registry's plugin discovery would cost
#: each spawned rank seconds (mixture, which builds its terms by name, is tested in one process)
UNEQUAL_LOSSES = {
    "infonce": (InfoNCE, {}),
    "infonce-smoothed": (InfoNCE, {"label_smoothing": 0.1}),
    "infonce-soft": (InfoNCE, {"soft_targets": 0.3}),
    "siglip": (SigLIP, {}),
    "ntxent": (NTXent, {"learn_temperature": True}),
    "hard_negative": (HardNegative, {"learn_temperature": True, "top_k": 2}),
    "memory_queue": (MemoryQueue, {}),
}


def _unequal_inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each rank's image and text input rows (rank order)."""
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(len(ids), 12, generator=g) for ids in UNEQUAL_IMAGE_IDS]
    texts = [torch.randn(len(ids), 10, generator=g) for ids in UNEQUAL_TEXT_IDS]
    return images, texts


def _unequal_loss(case: str) -> nn.Module:
    cls, options = UNEQUAL_LOSSES[case]
    loss = cls(cls.Options(**options))
    fill = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    for module in loss.modules():  # a queue holding ids of the batch (excluded candidates)
        if isinstance(module, MemoryQueue):
            module(fill, fill.flip(0), image_ids=torch.arange(4), text_ids=torch.arange(4))
    return loss


def _unequal_step(loss: nn.Module, x_img: torch.Tensor, x_txt: torch.Tensor,
                  image_ids: torch.Tensor, text_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step from leaf input rows: the loss, every gradient, the queues afterwards."""
    vision, text = _models()
    x_img, x_txt = x_img.clone().requires_grad_(True), x_txt.clone().requires_grad_(True)
    out = loss(vision(x_img), text(x_txt), image_ids=image_ids, text_ids=text_ids)
    out.loss.backward()
    inner = loss.inner if isinstance(loss, GlobalBatch) else loss  # the same names
    result = {"__loss": out.loss.detach().reshape(1), "__x_img": x_img.grad,
              "__x_txt": x_txt.grad, **_grads(vision, text, inner)}
    result.update({f"__buf.{k}": b.detach().clone() for k, b in inner.named_buffers()})
    return result


def _unequal_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init(torch.device("cpu"), timeout_minutes=1)  # a mismatched collective fails, not hangs
    try:
        # distributed.gather: padded to the longest rank, trimmed, rank order (values, dtypes)
        for rows in ((5, 3), (2, 0), (0, 4), (3, 3)):
            n = rows[rank]
            want = torch.arange(sum(rows) * 2, dtype=torch.float64).view(-1, 2) - 7
            mine = want[sum(rows[:rank]):][:n]
            torch.testing.assert_close(D.gather(mine), want, rtol=0, atol=0, msg=str(rows))
            ids = torch.arange(sum(rows))
            assert torch.equal(D.gather(ids[sum(rows[:rank]):][:n]), ids), rows
            flags = ids % 3 == 0
            assert torch.equal(D.gather(flags[sum(rows[:rank]):][:n]), flags), rows
            # gather_rows: this rank's slice, and the gradient of its rows (every rank's loss)
            leaf = mine.clone().requires_grad_(True)
            got, where = D.gather_rows(leaf)
            assert torch.equal(got, want) and where == slice(sum(rows[:rank]), sum(rows[:rank + 1]))
            weights = torch.arange(want.numel(), dtype=want.dtype).view_as(want)
            (got * weights * (rank + 1)).sum().backward()
            torch.testing.assert_close(leaf.grad, 3 * weights[where], rtol=0, atol=0)
        images, texts = _unequal_inputs()
        image_ids = torch.tensor(UNEQUAL_IMAGE_IDS[rank])
        text_ids = torch.tensor(UNEQUAL_TEXT_IDS[rank])
        results = {}
        for case in UNEQUAL_LOSSES:
            for local in (False, True):
                got = _unequal_step(GlobalBatch(_unequal_loss(case), local=local), images[rank],
                                    texts[rank], image_ids, text_ids)
                for k, v in got.items():  # DDP: the mean over ranks of the parameters' grads
                    if not k.startswith("__"):
                        dist.all_reduce(v)
                        v /= dist.get_world_size()
                results[case, local] = got
        torch.save(results, Path(out_dir) / f"unequal-rank{rank}.pt")
    finally:
        D.shutdown()


def test_unequal_shards_on_two_ranks_match_one_process_on_the_concatenated_batch(
        tmp_path: Path) -> None:
    """Ranks holding different numbers of image rows and of text rows (5/9 and 3/6), unmatched
    rows on both sides: through GlobalBatch (global and local_loss) every rank's gradients,
    averaged over ranks as DDP does, are one process's on the concatenated batch, and so are
    the loss (local: its mean over ranks), each rank's input rows' gradients (summed over the
    ranks' losses: over 2) and the memory queues afterwards. Also gather's padding."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    _spawn(_unequal_worker, _free_port(), str(tmp_path))
    ranks = [torch.load(tmp_path / f"unequal-rank{r}.pt") for r in range(2)]
    images, texts = _unequal_inputs()
    image_ids = torch.tensor([i for ids in UNEQUAL_IMAGE_IDS for i in ids])
    text_ids = torch.tensor([i for ids in UNEQUAL_TEXT_IDS for i in ids])
    cut_i, cut_t = len(UNEQUAL_IMAGE_IDS[0]), len(UNEQUAL_TEXT_IDS[0])
    for case in UNEQUAL_LOSSES:
        want = _unequal_step(_unequal_loss(case), torch.cat(images), torch.cat(texts),
                             image_ids, text_ids)
        assert any(k.startswith("loss.") for k in want), case  # a learnt temperature
        for local in (False, True):
            got = [r[case, local] for r in ranks]
            where = f"{case}, local={local}"
            losses = torch.cat([g["__loss"] for g in got])
            if local:
                assert not torch.allclose(losses[0], losses[1]), where  # each rank its rows
                losses = losses.mean().reshape(1)
            for loss in losses:
                torch.testing.assert_close(loss.reshape(1), want["__loss"], rtol=1e-5, atol=1e-6,
                                           msg=f"{where}: loss")
            for r, (rows_i, rows_t) in enumerate(((slice(0, cut_i), slice(0, cut_t)),
                                                  (slice(cut_i, None), slice(cut_t, None)))):
                assert got[r].keys() == want.keys(), where
                for k in want.keys() - {"__loss"}:
                    rows = {"__x_img": rows_i, "__x_txt": rows_t}.get(k)
                    expected = want[k] if rows is None else want[k][rows] * 2
                    torch.testing.assert_close(got[r][k], expected, rtol=1e-5, atol=1e-6,
                                               msg=f"{where}, rank {r}: {k}")


# the engine under torchrun ---------------------------------------------------------------------

def _engine_recipe(root: Path, name: str, **sections: object) -> Path:
    sections.setdefault("backend", EXACT_BACKEND)  # compared with another way of training
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(tiny_recipe(root / "runs", name=name, **sections)),
                    encoding="utf-8")
    return path


def _one_step(recipe_path: str) -> dict[str, torch.Tensor]:
    """The gradients (and loss) of the engine's first training step."""
    from mmfw.train.loop import Trainer

    trainer = Trainer(mmfw.load_recipe(recipe_path))
    batch = next(iter(trainer.loader))
    out = trainer.run_step(batch).output
    named = [*trainer.model.named_parameters(),
             *(("loss." + k, p) for k, p in trainer.opt.losses.named_parameters())]
    grads = {k: full(p.grad).detach().clone() for k, p in named if p.grad is not None}
    trainer.release()
    return {**grads, "__loss": out.loss.detach().reshape(1)}


def _engine_worker(rank: int, port: int, recipe_paths: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        for i, path in enumerate(recipe_paths):
            torch.save(_one_step(path), Path(out_dir) / f"engine{i}-rank{rank}.pt")
    finally:
        gc.collect()  # the Trainers' DDP wrappers hold the group: free them before destroying
        D.shutdown()


def test_an_engine_step_on_two_ranks_matches_one_process_on_the_global_batch(
        tmp_path: Path) -> None:
    """batch_size is the global batch: 2 ranks x 8 rows give the gradient of 1 process x 16
    (the random sampler's plan does not depend on the per-rank batch size); also with
    GradCache accumulation, which gathers in its loss stage."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    cases = [({"accumulate": 1}, {}), ({"accumulate": 2}, {}),
             # FSDP: sharded parameters, gradients reduce-scattered (also with GradCache)
             ({"accumulate": 1, "grad_clip": 0.5}, {"strategy": "fsdp"}),
             ({"accumulate": 2}, {"strategy": "fsdp"}),
             # each rank's own rows against the global batch: the same gradients
             ({"accumulate": 1}, {"local_loss": True}),
             ({"accumulate": 2}, {"strategy": "fsdp", "local_loss": True})]
    two = [str(_engine_recipe(tmp_path, f"two{i}", optim=o, distributed=d))
           for i, (o, d) in enumerate(cases)]
    _spawn(_engine_worker, _free_port(), two, str(tmp_path), timeout=300)
    for i, (optim, d) in enumerate(cases):
        expected = _one_step(str(_engine_recipe(tmp_path, f"one{i}", optim=optim)))
        got_all = [torch.load(tmp_path / f"engine{i}-rank{rank}.pt") for rank in range(2)]
        if d.get("local_loss"):  # each rank's loss is its rows' share: the mean is the loss
            mean = (got_all[0]["__loss"] + got_all[1]["__loss"]) / 2
            assert not torch.allclose(got_all[0]["__loss"], got_all[1]["__loss"])
            torch.testing.assert_close(mean, expected["__loss"], rtol=1e-5, atol=1e-6)
        for got in got_all:
            assert got.keys() == expected.keys()
            for k in expected.keys() - ({"__loss"} if d.get("local_loss") else set()):
                torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6,
                                           msg=f"{cases[i]}: {k}")


def test_torchrun_two_processes_train_the_tiny_recipe_into_one_run_dir(tmp_path: Path) -> None:
    recipe = _engine_recipe(tmp_path, "ddp")
    proc = _bounded_run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mmfw", "run", str(recipe)], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs"
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    run_dir = runs / "ddp"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"rsum", "i2t_R@1", "t2i_R@1"} <= metrics.keys()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["type"] == "train"]
    assert train_steps == sorted(set(train_steps)), "one rank logs, once per step"
    # 2 epochs of 320 pairs in global batches of 16: as many steps as one process takes
    assert train_steps[-1] == 40
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.safetensors")
                   if ".train." not in p.name)
    assert steps == ["step-00000020.safetensors", "step-00000040.safetensors"]
    assert "step 40/40" in proc.stdout and proc.stdout.count("run directory:") == 1


def _torchrun(recipe: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = _bounded_run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mmfw", "run", str(recipe), *extra], cwd, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = sorted((run_dir / "checkpoints").glob("step-*[0-9].safetensors"))[-1]
    return load_file(str(last))


def test_fsdp_trains_checkpoints_resumes_and_matches_ddp(tmp_path: Path) -> None:
    """distributed.strategy = "fsdp": sharded training writes one-process checkpoints (whole
    tensors), validates and evaluates on rank 0, resumes sharded, and ends where DDP ends."""
    fsdp = {"strategy": "fsdp"}
    ddp = _engine_recipe(tmp_path, "ddp2", run={"epochs": 2})
    one = _engine_recipe(tmp_path, "fsdp", distributed=fsdp)
    _torchrun(ddp, tmp_path)
    out = _torchrun(one, tmp_path)
    assert "fsdp: 2 units over 2 ranks" in out.stdout
    run_dir = tmp_path / "runs" / "fsdp"
    assert (run_dir / "metrics.json").is_file()
    # the checkpoint is whole: a plain one-process model loads it and reproduces the metrics
    again = mmfw.evaluate(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert again == pytest.approx(metrics)
    out = _torchrun(one, tmp_path, "--resume", "--set", "run.epochs=2")
    assert "resumed" in out.stdout
    got, want = _weights(run_dir), _weights(tmp_path / "runs" / "ddp2")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4, msg=k)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "eval" and r.get("split") == "val"] == [20, 40]


def test_torchrun_trains_an_ensemble_and_distils_it(tmp_path: Path) -> None:
    """An ensemble's members share one process group; rank 0 alone prepares the ensemble
    directory and evaluates the ensemble; a distillation student then learns from it."""
    ens = _engine_recipe(tmp_path, "ens", ensemble={"seeds": [1, 2]}, run={"epochs": 1})
    out = _torchrun(ens, tmp_path)
    ens_dir = tmp_path / "runs" / "ens"
    summary = json.loads((ens_dir / "ensemble.json").read_text())
    assert sorted(summary["member_metrics"]) == ["seed-1", "seed-2"]
    assert out.stdout.count("ensemble of 2 on test") == 1  # rank 0 talks, once
    metrics = json.loads((ens_dir / "metrics.json").read_text())
    assert mmfw.evaluate(ens_dir) == pytest.approx(metrics)
    student = _engine_recipe(tmp_path, "student", run={"epochs": 1},
                             loss={"name": "distillation", "alpha": 0.5},
                             distill={"teacher": str(ens_dir)})
    _torchrun(student, tmp_path)
    rows = [json.loads(ln) for ln in
            (tmp_path / "runs" / "student" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert train_rows and all(math.isfinite(r["loss"]) for r in train_rows)
    assert (tmp_path / "runs" / "student" / "metrics.json").is_file()


def _tiny_bert(folder: Path) -> Path:
    """A 2-layer random BERT and its tokenizer, saved as a hub download would be."""
    import transformers as tf

    words = ["a", "an", "the", "of", "and", "on", "left", "right", "above", "below", "red",
             "blue", "green", "yellow", "small", "large", "circle", "square", "triangle",
             "star", "its", "is", "with"]
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = tf.BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_fsdp_shards_hf_and_timm_encoders_block_by_block(tmp_path: Path) -> None:
    """The encoders FSDP is for: a transformers BERT (hf-text, loaded from a saved folder)
    and a timm ViT (timm-vision), one FSDP unit per block; one step's gradients equal one
    process's on the global batch."""
    bert = _tiny_bert(tmp_path / "bert")
    model = {"vision": {"name": "timm-vision", "model": "test_vit", "pretrained": False},
             "text": {"name": "hf-text", "model": str(bert), "pooling": "mean"}}

    def recipe(name: str, **sections: object) -> str:
        sections.setdefault("backend", EXACT_BACKEND)  # FSDP against DDP
        data = tiny_recipe(tmp_path / "runs", name=name, **sections)
        data["model"].update(model)  # replace the scratch towers, options and all
        path = tmp_path / f"{name}.toml"
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
        return str(path)

    two = recipe("two", distributed={"strategy": "fsdp"})
    _spawn(_engine_worker, _free_port(), [two], str(tmp_path), timeout=300)
    expected = _one_step(recipe("one"))
    for rank in range(2):
        got = torch.load(tmp_path / f"engine0-rank{rank}.pt")
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)
    units = sharding.unit_modules(build_model(mmfw.load_recipe(two).model),
                                  ("vision.layers.*", "text.layers.*"))
    assert len(units) == 6 + 2  # test_vit's 6 blocks, BERT's 2 layers


STAGES = {  # freezing and unfreezing towers, and a loss change at each stage
    "name": "three-stage", "warmup_steps": 0,
    "stages": [
        {"name": "heads", "steps": 6, "freeze": ["vision", "text"], "loss": "infonce"},
        {"name": "queue", "steps": 6, "freeze": ["vision.embeddings", "text"],
         "lr_mult": {"vision.layers.*": 0.1}, "loss": {"name": "memory_queue", "size": 64}},
        {"name": "all", "lr_mult": {"vision": 0.1, "text": 0.1},
         "loss": {"name": "hard_negative", "mining": "semi-hard"}},
    ],
}


def test_fsdp_follows_a_three_stage_schedule_like_ddp(tmp_path: Path) -> None:
    """Stages freeze and unfreeze sharded parameters and switch losses (queue state included);
    with local_loss too, the FSDP run ends with the DDP run's weights."""
    ddp = _engine_recipe(tmp_path, "ddp", schedule=STAGES, run={"epochs": 1})
    fsdp = _engine_recipe(tmp_path, "fsdp", schedule=STAGES, run={"epochs": 1},
                          distributed={"strategy": "fsdp", "local_loss": True})
    _torchrun(ddp, tmp_path)
    out = _torchrun(fsdp, tmp_path)
    assert "stage 'all' from step 12" in out.stdout
    got, want = _weights(tmp_path / "runs" / "fsdp"), _weights(tmp_path / "runs" / "ddp")
    assert got.keys() == want.keys() and any(k.startswith("loss.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4, msg=k)


# cross-attention fusion under DDP: contrastive terms on the global batch, ITM per rank ----------

FUSION = {"fusion": {"name": "cross-attention", "layers": 1, "heads": 2}}
ITM_MIXTURE = {"name": "mixture", "terms": [{"name": "infonce"}, {"name": "itm", "weight": 0.5}]}


def _fusion_worker(rank: int, port: int, recipe_path: str, out_dir: str) -> None:
    from mmfw.train.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        trainer = Trainer(mmfw.load_recipe(recipe_path))
        batch = next(iter(trainer.loader))
        saved = {"pixels": batch.pixels.clone(), "tokens": dict(batch.tokens),
                 "image_ids": batch.image_ids.clone(), "text_ids": batch.text_ids.clone()}
        out = trainer.run_step(batch).output
        grads = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters()
                 if p.grad is not None}
        grads.update({"loss." + k: p.grad.detach().clone()
                      for k, p in trainer.opt.losses.named_parameters() if p.grad is not None})
        torch.save({"batch": saved, "grads": grads, "terms": out.terms},
                   Path(out_dir) / f"fusion-rank{rank}.pt")
        trainer.release()
    finally:
        gc.collect()
        D.shutdown()


def test_fusion_under_ddp_scores_each_ranks_own_pairs(tmp_path: Path) -> None:
    """[model.fusion] under torchrun: infonce sees the gathered batch, the ITM head scores each
    rank's own pairs (token features are not gathered), and the gradients are the mean over the
    ranks of (global infonce + rank's ITM), fusion head included. Two pairs a rank, so every
    row has at most one negative: the draws are deterministic and one process can replay them."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from mmfw.model import fused_forward
    from mmfw.train.loop import Trainer

    sections = {"model": FUSION, "loss": ITM_MIXTURE, "sampler": {"batch_size": 4}}
    path = _engine_recipe(tmp_path, "fusion-ddp", **sections)
    _spawn(_fusion_worker, _free_port(), str(path), str(tmp_path))
    ranks = [torch.load(tmp_path / f"fusion-rank{r}.pt") for r in range(2)]

    one = Trainer(mmfw.load_recipe(_engine_recipe(tmp_path, "fusion-one", **sections)))
    halves = [fused_forward(one.model, one.model.prepare_pixels(r["batch"]["pixels"]),
                            r["batch"]["tokens"], {}) for r in ranks]
    img = torch.cat([h[0] for h in halves])
    txt = torch.cat([h[1] for h in halves])
    iid = torch.cat([r["batch"]["image_ids"] for r in ranks])
    tid = torch.cat([r["batch"]["text_ids"] for r in ranks])
    total, oi, ot = 0.0, 0, 0
    for (i, t, ctx) in halves:
        match = ctx["match"].within(slice(oi, oi + len(i)), slice(ot, ot + len(t)))
        total = total + one.opt.loss(img, txt, image_ids=iid, text_ids=tid, match=match, step=0,
                                 epoch=0).loss / 2
        oi, ot = oi + len(i), ot + len(t)
    total.backward()
    expected = {k: p.grad for k, p in one.model.named_parameters() if p.grad is not None}
    expected.update({"loss." + k: p.grad for k, p in one.opt.losses.named_parameters()
                     if p.grad is not None})
    assert any(k.startswith("fusion.") for k in expected)
    for r in ranks:
        assert r["grads"].keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(r["grads"][k], expected[k], rtol=1e-4, atol=1e-6, msg=k)
    assert "itm.accuracy" in ranks[0]["terms"]


def test_torchrun_trains_fusion_and_reranks(tmp_path: Path) -> None:
    """A 2-process run with the ITM head and eval re-ranking writes one run dir, and its
    checkpoint reproduces the metrics in one process (the head trained like every weight)."""
    recipe = _engine_recipe(tmp_path, "fusion", model=FUSION, loss=ITM_MIXTURE,
                            eval={"rerank_top_k": 4}, run={"epochs": 1},
                            distributed={"local_loss": True})
    _torchrun(recipe, tmp_path)
    run_dir = tmp_path / "runs" / "fusion"
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert train and all(math.isfinite(r["loss/itm"]) for r in train)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert mmfw.evaluate(run_dir) == pytest.approx(metrics)


def test_a_recipe_mistake_under_torchrun_is_reported_once(tmp_path: Path) -> None:
    """Every rank reads the same recipe; rank 0 alone says what is wrong, every rank exits 2."""
    data = tiny_recipe(tmp_path / "runs", name="typo")
    data["loss"] = {"name": "infonc"}
    recipe = tmp_path / "typo.toml"
    recipe.write_text(tomli_w.dumps(data), encoding="utf-8")
    proc = _bounded_run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mmfw", "run", str(recipe)], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert "'infonc'" in proc.stderr and "infonce" in proc.stderr  # the close match
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary: the user-error exit code
