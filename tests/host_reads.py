"""Counting the host's reads of device values in a test (``bool(t)``, ``t.item()``): on a GPU each one waits for
the device to drain, so the engine avoids them where the graph or a plan already knows the answer."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.n``: the ``aten._local_scalar_dense`` calls inside."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))
