"""Coverage: which operations of a model's graph have an explicit rule, and which rule the preset applies.

>>> import torch, dynamiclrp
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> report = dynamiclrp.coverage(model, torch.randn(2, 4))
>>> report.node_coverage
1.0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .graph import Graph
from .ops import Missing
from .ops.base import Identity, Routing
from .presets import Preset, get_preset
from .result import Stats


@dataclass
class OpCoverage:
    """One node type of the graph."""

    kind: str
    count: int
    explicit: bool
    rule: str
    paths: list[str] = field(default_factory=list)


@dataclass
class CoverageReport:
    """Node types of a graph, their counts, whether an explicit rule covers each, and the run's statistics."""

    ops: list[OpCoverage]
    preset: str
    stats: Stats | None = None
    error: str | None = None

    @property
    def nodes(self) -> int:
        return sum(o.count for o in self.ops)

    @property
    def covered_nodes(self) -> int:
        return sum(o.count for o in self.ops if o.explicit)

    @property
    def node_coverage(self) -> float:
        return self.covered_nodes / self.nodes if self.nodes else 1.0

    @property
    def unique_ops(self) -> int:
        return len(self.ops)

    @property
    def covered_ops(self) -> int:
        return sum(o.explicit for o in self.ops)

    @property
    def missing(self) -> list[OpCoverage]:
        return [o for o in self.ops if not o.explicit]

    def table(self) -> str:
        """A plain-text table, one row per node type."""
        w = max([len(o.kind) for o in self.ops] + [7])
        lines = [f"{'op':<{w}}  {'nodes':>6}  covered  rule ({self.preset})"]
        for o in self.ops:
            where = f"  [in {', '.join(o.paths[:3])}]" if o.paths else ""
            lines.append(f"{o.kind:<{w}}  {o.count:>6}  {'yes' if o.explicit else 'NO ':<7}  {o.rule}{where}")
        lines.append(f"nodes {self.covered_nodes}/{self.nodes} ({100 * self.node_coverage:.2f} %), "
                     f"unique ops {self.covered_ops}/{self.unique_ops}")
        if self.stats is not None:
            s = self.stats
            lines.append(f"promises {s.promises}, internal nodes {s.internal_nodes}, delta {s.delta}, "
                         f"rho {s.rho:.3f}")
        if self.error:
            lines.append(f"run failed: {self.error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def rule_label(spec: Any, kind: str, preset: Preset) -> str:
    """What the preset does at a node of this type, in words."""
    if isinstance(spec, Missing):
        return "no rule"
    if spec.family is not None:
        rule = preset.rule(spec.family, kind)
        return f"{spec.family}: {type(rule).__name__}"
    if isinstance(spec, Routing):
        return "routing (exact)"
    if isinstance(spec, Identity):
        return "identity"
    if kind == "AccumulateGrad":
        return "leaf"
    if kind in ("MmBackward0", "BmmBackward0", "ConvolutionBackward0"):
        return "dense/conv/input, or product of activations (by operand)"
    return type(spec).__name__


def coverage(
    model_or_outputs: torch.nn.Module | torch.Tensor | Sequence[torch.Tensor],
    inputs: Any = None,
    *,
    preset: str | Preset = "epsilon",
    output: Any = None,
    run: bool = True,
) -> CoverageReport:
    """Coverage report for a model on example inputs, or for output tensors that already have a graph.

    Parameters
    ----------
    model_or_outputs : nn.Module, Tensor or sequence of Tensor
    inputs : example inputs for a model (as for :func:`dynamiclrp.explain`)
    preset : the preset whose rule choice is listed
    output : selects the tensor(s) to explain from the model's output (as for :func:`dynamiclrp.explain`)
    run : also run one explanation (seed 1 at the arg-max) to report the Promise System's statistics
    """
    pre = get_preset(preset)
    if isinstance(model_or_outputs, torch.nn.Module):
        from .api import explain_forward

        outs, scopes, _ = explain_forward(model_or_outputs, inputs, output=output)
    else:
        outs = [model_or_outputs] if isinstance(model_or_outputs, torch.Tensor) else list(model_or_outputs)
        scopes = None
    graph = Graph.build([o.grad_fn for o in outs])
    counts = Counter(n.kind for n in graph.nodes)
    specs = {n.kind: n.spec for n in graph.nodes}
    paths: dict[str, list[str]] = {}
    if scopes is not None:
        for n in graph.nodes:
            if isinstance(n.spec, Missing):
                p = scopes.path_of(n.fn)
                if p and p not in paths.setdefault(n.kind, []):
                    paths[n.kind].append(p)
    ops = [OpCoverage(k, c, not isinstance(specs[k], Missing) and not specs[k].fallback,
                      rule_label(specs[k], k, pre), paths.get(k, []))
           for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    report = CoverageReport(ops, pre.name)
    if run and not report.missing:
        from .api import _propagate

        try:
            def everything(graph):  # every input and token embedding: the whole data path is propagated
                return [(n.id, 0) for n in graph.nodes
                        if n.data and (not n.inputs or n.kind == "EmbeddingBackward0")]

            att = _propagate(outs, None, [], pre, seed="one", ledger=False, extra_record=everything)
            report.stats = att.stats
        except Exception as err:  # noqa: BLE001 - the report says what failed
            report.error = f"{type(err).__name__}: {err}"
    return report
