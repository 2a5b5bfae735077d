"""Which module created which autograd node, found without changing the model.

Autograd numbers the nodes it creates on a thread in order (``grad_fn._sequence_nr()``). Forward hooks that
only observe read the number the next node will get before and after each module's forward; a graph node numbered
in between belongs to that module (the innermost such module is its *path*). The hooks are removed as soon as the
forward returns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook


def _probe_stamp() -> int:
    """The number autograd gives the next node on this thread, read by making one (and then one more number):
    for a torch without the counter's getter."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True)
        return (probe * 1).grad_fn._sequence_nr() + 1


# the thread's counter read directly (a hundred times cheaper than making a node, and no throw-away node)
_stamp = getattr(torch._C._autograd, "_get_sequence_nr", _probe_stamp)


class ModuleScopes:
    """Sequence-number ranges of each module's forward calls: ``[start, end)``, the numbers its nodes took."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, str]] = []

    def path_of(self, fn: Any) -> str | None:
        """Name of the innermost module whose forward created ``fn`` (None if outside every module)."""
        try:
            seq = fn._sequence_nr()
        except (AttributeError, RuntimeError):
            return None
        best = None
        for start, end, name in self.ranges:
            if start <= seq < end and (best is None or end - start < best[1] - best[0]):
                best = (start, end, name)
        return None if best is None else (best[2] or "<model>")


@contextlib.contextmanager
def record_scopes(model: torch.nn.Module,
                  named: Mapping[str, torch.nn.Module] | None = None) -> Iterator[ModuleScopes]:
    """Record module scopes during the forward passes run inside the ``with`` block, on this thread.

    Two global module hooks (``torch.nn.modules.module.register_module_forward_*hook``) see every module call and
    keep the calls of ``model``'s modules made on this thread (sequence numbers count per thread): registering a
    pair of hooks on each of a transformer's hundreds of modules, and removing them, cost more than the calls.
    ``named``: ``model.named_modules()`` as a mapping, where the caller has it."""
    scopes = ModuleScopes()
    names = {id(module): name for name, module in (model.named_modules() if named is None else named.items())}
    thread = threading.get_ident()
    open_calls: dict[int, list[int]] = {}

    def pre(mod, args):
        if id(mod) in names and threading.get_ident() == thread:
            open_calls.setdefault(id(mod), []).append(_stamp())

    def post(mod, args, out):
        starts = open_calls.get(id(mod)) if threading.get_ident() == thread else None
        if starts:
            scopes.ranges.append((starts.pop(), _stamp(), names[id(mod)]))

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        yield scopes
    finally:
        for h in handles:
            h.remove()
