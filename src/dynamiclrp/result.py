"""What a user gets back from an explanation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import LedgerEntry


@dataclass
class Stats:
    """Statistics of one run, with the Promise System's counts as the paper defines them.

    ``promises``: operand activations a rule needed that its node had not saved -- one promise *branch* each, as
    the paper's table counts them (``branches`` is the same number); ``origins``: nodes that made promises;
    ``internal_nodes``: nodes whose output was replayed to keep a promise; ``delta`` (δ): the sum of the promises'
    depths; ``rho`` (ρ): promises per node; ``recovered``: distinct activations recovered (each at most once);
    ``gradient_form``: whether the run used the gradient form (:mod:`dynamiclrp.gradient_form`); ``bypassed_kinds``:
    node type -> nodes whose backward it skipped, computing their gradient by a cheaper formula
    (:mod:`dynamiclrp.gradient_bypass`), and ``bypassed`` their total.
    """

    nodes: int
    ops: dict[str, int]
    rules_run: int
    promises: int
    recovered: int
    internal_nodes: int
    delta: int
    origins: int = 0
    gradient_form: bool = False
    bypassed_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def bypassed(self) -> int:
        return sum(self.bypassed_kinds.values())

    @property
    def branches(self) -> int:
        return self.promises

    @property
    def rho(self) -> float:
        return self.promises / self.nodes if self.nodes else 0.0


@dataclass
class Attribution:
    """Relevance of one explanation.

    Attributes
    ----------
    inputs : list of Tensor
        Relevance of each ``wrt`` tensor (for :func:`dynamiclrp.explain`: of each input), same shape.
    tokens : Tensor or None
        Relevance per token (summed over the hidden dimension) at the embedding looked up with the token ids
        (``input_ids``), for token models -- the convention of LXT (relevance at ``inputs_embeds``).
    embeddings : dict
        Relevance per position at every embedding lookup (word, position, token type, ...), by the name of the
        table's parameter; ``tokens`` is the word embedding's entry. Together with ``inputs`` and what went to
        parameters they account for the seed.
    modules : dict
        Relevance of the output of each requested module, by name.
    params : dict
        Relevance of each requested parameter, by name.
    outputs : list of Tensor
        The seed relevance put on each output.
    ledger : list of LedgerEntry
        Per node: relevance in, passed to data operands, given to parameters/constants, absorbed.
    stats : Stats
    approximations : dict
        Node kinds where a documented fallback or approximation was used, with counts.
    """

    inputs: list[torch.Tensor | None]
    outputs: list[torch.Tensor]
    stats: Stats
    ledger: list[LedgerEntry] | None = None
    tokens: torch.Tensor | None = None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, torch.Tensor | None] = field(default_factory=dict)
    params: dict[str, torch.Tensor | None] = field(default_factory=dict)
    approximations: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> torch.Tensor | None:
        """Relevance of the first input."""
        return self.inputs[0] if self.inputs else None

    def total_seed(self) -> float:
        return float(sum(o.sum() for o in self.outputs))

    def conservation(self) -> dict[str, float]:
        """Where the seed relevance went: to inputs (and embedding lookups), to parameters/constants, absorbed."""
        if self.ledger is None:
            raise ValueError("run with ledger=True to get the conservation summary")
        to_params = float(sum(e.r_params for e in self.ledger))
        absorbed = float(sum(e.absorbed for e in self.ledger))
        got = float(sum(r.sum() for r in self.inputs if r is not None))
        got += float(sum(r.sum() for r in self.embeddings.values()))
        return {"seed": self.total_seed(), "inputs": got, "parameters": to_params, "absorbed": absorbed}
