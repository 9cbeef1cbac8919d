"""Features gathered across 2 gloo processes give the single-process gradient of the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mmfw
from mmfw import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    D.shutdown()


def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
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
