"""dynamiclrp.evaluate.evaluate sharded over 2 CPU processes (gloo): the gathered curves equal a one-process run."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynamiclrp import evaluate as ev


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # 7: shards of 4 and 3
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return model, x, y


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = _setup()
        res = ev.evaluate(model, x, y, ev.lrp("epsilon"), steps=8, batch_size=2, replace="noise",
                          progress=False)
        if rank == 0:
            torch.save({"morf": res.morf, "lerf": res.lerf, "world": res.meta["world_size"]}, out)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gathered.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out)
    model, x, y = _setup()
    ref = ev.evaluate(model, x, y, ev.lrp("epsilon"), steps=8, batch_size=7, replace="noise", progress=False)
    assert got["world"] == 2
    assert got["morf"].shape == (7, 9)
    assert torch.allclose(got["morf"], ref.morf, atol=1e-6)
    assert torch.allclose(got["lerf"], ref.lerf, atol=1e-6)
    assert not torch.allclose(ref.morf, ref.lerf)  # the curves differ, so the comparison can fail
