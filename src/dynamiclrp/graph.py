"""Read an autograd graph once: nodes, edges, consumers, a topological order.

The graph is read from ``grad_fn`` objects over ``next_functions``, iteratively (a 20,000-node chain needs no
recursion), and never written to. Fused autograd nodes (``addmm``, convolution with bias, ``addcmul``, scaled
dot-product attention, ...) are split into primitive *parts* as their op entry describes, so that every part gets
its own rule from the preset.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .ops import OPS, spec_for
from .ops.base import NEXT, OpSpec
from .plan import Plan, Skeleton


class Edge(NamedTuple):
    """An input of a node: output slot ``nr`` of node ``child`` (a tuple: a graph has thousands)."""

    child: int
    nr: int


@dataclass(eq=False, slots=True)  # slots: a run builds a thousand or more, and reads their fields constantly
class Node:
    """One operation of the graph (an autograd node, or one part of a fused one)."""

    id: int
    kind: str
    fn: Any
    spec: OpSpec
    inputs: list[Edge | None]
    part: int = 0
    data: bool = False
    n_consumers: int = 0

    def __repr__(self) -> str:
        return f"<{self.kind} #{self.id}>"


@dataclass
class Graph:
    """The nodes below a set of output roots, with consumers and a topological order."""

    nodes: list[Node] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    head: dict[Any, int] = field(default_factory=dict)
    consumers: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)
    skeleton: Skeleton | None = None  # the plan's record of this graph's structure (built with a plan)

    def parts(self, fn: Any, head: int | None = None) -> list[Node]:
        """The nodes ``fn`` was split into (one for an unfused node), head first: they are numbered in a row.
        ``head``: the head's id, where the caller has it."""
        i, out = self.head[fn] if head is None else head, []
        while i < len(self.nodes) and self.nodes[i].fn is fn:
            out.append(self.nodes[i])
            i += 1
        return out

    def node_of(self, fn: Any) -> Node | None:
        """The node that produces ``fn``'s outputs (the head part of a fused node)."""
        i = self.head.get(fn)
        return None if i is None else self.nodes[i]

    @classmethod
    def build(cls, root_fns: list[Any], plan: Plan | None = None) -> Graph:
        """Read the graph below ``root_fns``; with a ``plan``, reuse the skeleton of an identical graph read before
        (same fingerprint: every node's type, decomposition and edges, in discovery order)."""
        fns, nexts = _discover(root_fns)
        layouts = _layouts(fns, nexts)
        if plan is None:
            return cls._assemble(root_fns, fns, nexts, layouts)
        index = {fn: i for i, fn in enumerate(fns)}
        fingerprint = _fingerprint(root_fns, fns, nexts, layouts, index)
        skeleton = plan.skeleton(fingerprint)
        if skeleton is not None:
            return cls._from_skeleton(skeleton, fns)
        g = cls._assemble(root_fns, fns, nexts, layouts)
        sources = _data_sources(g.nodes)
        g.skeleton = Skeleton(
            nodes=[(index[n.fn], n.kind, n.spec, n.inputs, n.part, n.data, n.n_consumers) for n in g.nodes],
            order=g.order, heads=[g.head[fn] for fn in fns], consumers=g.consumers,
            sources=[(i, g.nodes[i].data) for i in sources])
        plan.store(fingerprint, g.skeleton)
        return g

    @classmethod
    def _assemble(cls, root_fns, fns, nexts, layouts) -> Graph:
        g = cls()
        nodes, head = g.nodes, g.head
        # create nodes: a fused fn becomes several parts, part 0 (the head) producing the fn's outputs
        for fn, layout in zip(fns, layouts):
            head[fn] = len(nodes)
            for k, (kind, part_spec, _) in enumerate(layout):
                nodes.append(Node(len(nodes), kind, fn, part_spec, [], k))
        consumers, uses = g.consumers, [0] * len(nodes)
        for fn, nx, layout in zip(fns, nexts, layouts):
            base = head[fn]
            for k, (_, _, refs) in enumerate(layout):
                nid, inputs = base + k, nodes[base + k].inputs
                for i, ref in enumerate(refs):
                    if ref is None:
                        e = None
                    elif ref[0] == NEXT:
                        child, nr = nx[ref[1]]
                        e = None if child is None else Edge(head[child], nr)
                    else:
                        e = Edge(base + ref[1], 0)
                    inputs.append(e)
                    if e is not None:
                        held = consumers.get(e)
                        if held is None:
                            consumers[e] = [(nid, i)]
                        else:
                            held.append((nid, i))
                        uses[e.child] += 1
        for node, n in zip(nodes, uses):
            node.n_consumers = n
        g.order = _topological(g.nodes, [g.head[f] for f in root_fns])
        _mark_data(g)
        return g

    @classmethod
    def _from_skeleton(cls, sk: Skeleton, fns: list[Any]) -> Graph:
        """A graph with a stored skeleton's structure (shared, read-only) and the new autograd nodes."""
        g = cls(order=sk.order, consumers=sk.consumers, skeleton=sk)
        g.nodes = [Node(i, kind, fns[f], spec, inputs, part, data, nc)
                   for i, (f, kind, spec, inputs, part, data, nc) in enumerate(sk.nodes)]
        g.head = dict(zip(fns, sk.heads))
        # which nodes are data follows from the sources: a leaf's kind of tensor (parameter or input) is not in
        # the fingerprint, so each source is asked again, and the flags are worked out anew if one answers otherwise
        if any(g.nodes[i].spec.is_data_source(g.nodes[i]) != was for i, was in sk.sources):
            _mark_data(g)
        return g


def _fingerprint(root_fns, fns, nexts, layouts, index) -> tuple:
    """The topology of a graph as one flat tuple (cheap to hash and to compare in full): the roots, and for every
    node in discovery order its type, each part's op entry and operand references, and its edges. A node kept
    whole by a registered op entry is named by its shared layout (:data:`_WHOLE`: one per type, entry and number of
    inputs, never freed), as a 1-tuple that no other item of the sequence can equal."""
    flat: list = [index[f] for f in root_fns if f is not None]
    put = flat.append
    for fn, layout, nx in zip(fns, layouts, nexts):
        if type(layout) is _Whole:
            put(layout.token)
        else:
            put(type(fn))
            for kind, spec, refs in layout:
                put(kind)
                put(id(spec))
                put(len(refs))
                flat.extend(refs)
            put(len(nx))
        for c, nr in nx:
            put(-1 if c is None else index[c])
            put(nr)
    return tuple(flat)


class _Whole(list):
    """The layout of a node kept whole (one part, its inputs in order), with a token that names it in a
    fingerprint."""

    token: tuple


#: layouts of nodes kept whole by a registered op entry, by (node type, entry, number of inputs): shared by every
#: graph, so that a fingerprint can name one by identity
_WHOLE: dict[tuple, _Whole] = {}


def _layouts(fns: list[Any], nexts: list[tuple]) -> list:
    """Every node's decomposition into parts (its op entry's ``decompose``). Most entries keep the node whole,
    with its inputs in order: that layout depends on the node's type, entry and number of inputs alone, and is
    built once (shared, read-only) instead of once per node."""
    out, entries, local = [], {}, {}
    for fn, nx in zip(fns, nexts):
        t = type(fn)
        entry = entries.get(t)
        if entry is None:
            spec = spec_for(fn)
            # a registered entry's whole layout is kept for good; another (a node without a rule: a new Missing
            # entry each time) for this graph only
            entry = entries[t] = (spec, type(spec).decompose is not OpSpec.decompose,
                                  _WHOLE if OPS.get(t.__name__) is spec else local)
        spec, own, table = entry
        if own:
            out.append(spec.decompose(fn))
            continue
        key = (t, spec, len(nx))
        layout = table.get(key)
        if layout is None:
            whole = [(t.__name__, spec, [(NEXT, j) for j in range(len(nx))])]
            if table is _WHOLE:  # named by its token in fingerprints: it must live as long as they do (for good)
                whole = _Whole(whole)
                whole.token = (id(whole),)
            layout = table[key] = whole
        out.append(layout)
    return out


def _data_sources(nodes: list[Node]) -> list[int]:
    """The nodes whose op entry decides for itself whether they are data (``is_data_source`` overridden: a leaf,
    an embedding lookup); all others are data exactly when an operand is."""
    return [n.id for n in nodes if _decides_data(n.spec)]


def _decides_data(spec: OpSpec) -> bool:
    """Whether an op entry decides for itself whether its nodes are data (``is_data_source`` overridden)."""
    return type(spec).is_data_source is not OpSpec.is_data_source


def _mark_data(g: Graph) -> None:
    """Which nodes depend on the model's input (producers before consumers)."""
    nodes = g.nodes
    for i in reversed(g.order):
        node = nodes[i]
        data = _decides_data(node.spec) and node.spec.is_data_source(node)
        if not data:  # a loop, not any() over a generator: this runs for every node of every graph
            for e in node.inputs:
                if e is not None and nodes[e.child].data:
                    data = True
                    break
        node.data = data


def _discover(root_fns: list[Any]) -> tuple[list[Any], list[tuple]]:
    """Every grad_fn reachable from the roots, each once (iterative, no recursion limit), and its
    ``next_functions`` (read once: each read builds a new tuple)."""
    seen: dict[Any, tuple] = {}
    stack = [f for f in root_fns if f is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        nx = seen[fn] = fn.next_functions
        for child, _ in nx:
            if child is not None and child not in seen:
                stack.append(child)
    return list(seen), list(seen.values())


def _topological(nodes: list[Node], roots: list[int]) -> list[int]:
    """Kahn's order: a node comes after every node that consumes its outputs."""
    pending = [n.n_consumers for n in nodes]
    ready = deque(r for r in dict.fromkeys(roots) if pending[r] == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for e in nodes[i].inputs:
            if e is not None:
                pending[e.child] -= 1
                if pending[e.child] == 0:
                    ready.append(e.child)
    if len(order) != len(nodes):  # pragma: no cover - autograd graphs are acyclic
        raise RuntimeError("autograd graph is not acyclic")
    return order
