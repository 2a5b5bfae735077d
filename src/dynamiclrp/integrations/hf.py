"""Hugging Face helpers: token relevance aligned to the tokenizer's output, QA and next-token targets.

Nothing here knows a model family: any ``PreTrainedModel`` (or any module taking ``input_ids``) is run through
:func:`dynamiclrp.explain`, which reads token relevance at the embedding looked up with ``input_ids``
(``Attribution.tokens``). These helpers only tokenize, pick targets and align the result with the tokens.

>>> import torch
>>> f = next_token_target(7)               # explain logit 7 at the last position
>>> seed = f(torch.ones(1, 3, 10))
>>> seed.nonzero().tolist()
[[0, 2, 7]]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..api import explain
from ..result import Attribution
from ..viz.text import Word, group_tokens, token_ansi, token_html


@dataclass
class TokenRelevance:
    """Relevance of each token of one tokenized sequence, aligned with the tokenizer's output.

    Attributes
    ----------
    tokens : list of str
        ``tokenizer.convert_ids_to_tokens(ids)``.
    ids : list of int
    relevance : numpy.ndarray
        One value per token (``Attribution.tokens`` of this row; padding included).
    special : list of bool
        Special tokens ([CLS], [SEP], <s>, padding).
    offsets : list of (int, int) or None
        Character offsets into ``text`` (fast tokenizers).
    text : str or None
        The text the offsets refer to (question and context joined by a space for pairs).
    label : str
        What was explained (class name, "start", "next token ' Paris'", ...).
    attended : list of bool or None
        False at padding (``attention_mask`` 0); padding is left out of :meth:`words` and the renderings.
    """

    tokens: list[str]
    ids: list[int]
    relevance: np.ndarray
    special: list[bool]
    offsets: list[tuple[int, int]] | None = None
    text: str | None = None
    label: str = ""
    attended: list[bool] | None = None

    def words(self, join: bool = True) -> list[Word]:
        """Pieces joined into words (:func:`dynamiclrp.viz.group_tokens`), padding left out."""
        keep = [i for i in range(len(self.tokens)) if self.attended is None or self.attended[i]]
        return group_tokens([self.tokens[i] for i in keep], self.relevance[keep],
                            special=[self.special[i] for i in keep],
                            offsets=None if self.offsets is None else [self.offsets[i] for i in keep],
                            text=self.text, join=join)

    def html(self, **kwargs: Any) -> str:
        """HTML fragment (:func:`dynamiclrp.viz.token_html`), titled with ``label``."""
        kwargs.setdefault("title", self.label or None)
        return token_html(self.words(), **kwargs)

    def ansi(self, **kwargs: Any) -> str:
        """Terminal rendering (:func:`dynamiclrp.viz.token_ansi`)."""
        return token_ansi(self.words(), **kwargs)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` non-special words with the largest relevance."""
        ws = sorted((w for w in self.words() if not w.special), key=lambda w: -w.relevance)
        return [(w.text, w.relevance) for w in ws[:k]]


@dataclass
class TextExplanation:
    """What :func:`explain_text` returns: the attribution and per-row token relevance."""

    attribution: Attribution
    rows: list[TokenRelevance]
    logits: torch.Tensor | tuple[torch.Tensor, ...]
    targets: list[Any] = field(default_factory=list)


def model_inputs(model: torch.nn.Module, encoding: Any) -> dict[str, Any]:
    """The tokenizer outputs the model's ``forward`` accepts (``token_type_ids`` only where taken, ...), and
    ``use_cache=False`` where it is a parameter (no cache objects are built for the explanation)."""
    params = inspect.signature(model.forward).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    drop = {"offset_mapping", "special_tokens_mask", "overflow_to_sample_mapping", "length"}
    out = {k: v for k, v in dict(encoding).items() if k not in drop and (takes_all or k in params)}
    if "use_cache" in params:
        out["use_cache"] = False
    return out


def encode(tokenizer: Any, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None,
           **kwargs: Any) -> Any:
    """Tokenize to PyTorch tensors with padding, and character offsets where the tokenizer is fast."""
    kw: dict[str, Any] = {"return_tensors": "pt", "padding": True}
    if getattr(tokenizer, "model_max_length", 0) < 1_000_000:  # a real limit (else truncation only warns)
        kw["truncation"] = True
    if getattr(tokenizer, "is_fast", False):
        kw["return_offsets_mapping"] = True
    kw.update(kwargs)
    if text_pair is None:
        return tokenizer(text, **kw)
    return tokenizer(text, text_pair, **kw)


def token_relevance(relevance: Any, tokenizer: Any, encoding: Any, row: int = 0, text: str | None = None,
                    text_pair: str | None = None, label: str = "") -> TokenRelevance:
    """Align one row of token relevance (``Attribution.tokens[row]``) with the tokenizer's output.

    Parameters
    ----------
    relevance : Tensor
        ``Attribution.tokens`` (``(batch, seq)``) or one row of it.
    tokenizer : PreTrainedTokenizer(Fast)
    encoding : BatchEncoding
        The tokenizer's output the model ran on (with ``offset_mapping`` for word joining).
    row : int
    text, text_pair : str, optional
        The texts of this row, for showing words as written.
    label : str
        What was explained.
    """
    ids = encoding["input_ids"][row].tolist()
    rel = relevance[row] if getattr(relevance, "dim", lambda: 1)() == 2 else relevance
    rel = rel.detach().double().cpu().numpy() if isinstance(rel, torch.Tensor) else np.asarray(rel, np.float64)
    if len(rel) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {len(rel)} relevance values")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = [bool(s) for s in tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)]
    mask = encoding.get("attention_mask") if hasattr(encoding, "get") else None
    attended = [bool(m) for m in mask[row].tolist()] if mask is not None else None
    if attended is not None:
        special = [s or not a for s, a in zip(special, attended)]
    offsets = None
    full = text
    om = encoding.get("offset_mapping") if hasattr(encoding, "get") else None
    if om is not None and text is not None:
        offsets = [tuple(int(v) for v in o) for o in om[row].tolist()]
        if text_pair is not None and hasattr(encoding, "sequence_ids"):
            seq = encoding.sequence_ids(row)
            shift = len(text) + 1
            offsets = [(s + shift, e + shift) if sid == 1 else (s, e) for (s, e), sid in zip(offsets, seq)]
            full = f"{text} {text_pair}"
    return TokenRelevance(tokens, ids, rel, special, offsets, full, label, attended)


def _capturing(target: Any, seen: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    """Wrap a target so that the output it is applied to is kept (the logits, without a second forward)."""
    def wrapped(out: torch.Tensor) -> Any:
        seen.append(out)
        return target(out) if callable(target) and not isinstance(target, torch.Tensor) else target

    return wrapped


def _label(model: torch.nn.Module, idx: int) -> str:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return str(id2label.get(idx, id2label.get(str(idx), idx)))


def explain_text(model: torch.nn.Module, tokenizer: Any, text: str | Sequence[str],
                 text_pair: str | Sequence[str] | None = None, target: Any = None, preset: Any = "attnlrp",
                 **kwargs: Any) -> TextExplanation:
    """Explain a text classifier (any module taking the tokenizer's outputs) on one text or a batch.

    Parameters
    ----------
    model : PreTrainedModel or nn.Module
        Its output (or ``.logits``) is ``(batch, classes)``.
    tokenizer : PreTrainedTokenizer(Fast)
    text, text_pair : str or list of str
    target : as in :func:`dynamiclrp.explain`
        Default: the predicted class of each row.
    preset : str or Preset
        Default ``"attnlrp"``.
    **kwargs
        Passed to :func:`dynamiclrp.explain`.

    Returns
    -------
    TextExplanation
        ``rows[i]`` is the :class:`TokenRelevance` of text ``i``, labelled with the explained class;
        ``logits`` the model's output.
    """
    texts = [text] if isinstance(text, str) else list(text)
    pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
    enc = encode(tokenizer, texts, pairs)
    inputs = model_inputs(model, enc)
    seen: list[torch.Tensor] = []
    att = explain(model, inputs, target=_capturing(target, seen), preset=preset, **kwargs)
    if att.tokens is None:
        raise ValueError("the model did not look its input_ids up in an embedding; no token relevance")
    targets = []
    rows = []
    for i in range(len(texts)):
        t = int(att.outputs[0][i].abs().argmax())
        targets.append(t)
        rows.append(token_relevance(att.tokens, tokenizer, enc, i, texts[i], pairs[i] if pairs else None,
                                    label=_label(model, t)))
    return TextExplanation(att, rows, seen[0], targets)


def qa_targets(start: int | None = None, end: int | None = None, which: str = "both") -> tuple[Any, Any]:
    """Targets for an extractive QA model's ``(start_logits, end_logits)``.

    Parameters
    ----------
    start, end : int, optional
        Token positions to explain; None: the arg-max of each.
    which : {"both", "start", "end"}
        Explain the sum of both logits, or one of them (the other gets a zero seed).

    Returns
    -------
    tuple
        Pass as ``target=`` to :func:`dynamiclrp.explain` on a model returning start and end logits.

    Examples
    --------
    >>> qa_targets(3, 5)
    (3, 5)
    """
    def zero(out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out)

    if which == "both":
        return start, end
    if which == "start":
        return start, zero
    if which == "end":
        return zero, end
    raise ValueError(f"which must be 'both', 'start' or 'end', not {which!r}")


def explain_qa(model: torch.nn.Module, tokenizer: Any, question: str, context: str, preset: Any = "attnlrp",
               **kwargs: Any) -> dict[str, Any]:
    """Explain an extractive QA model's predicted answer span: start and end separately.

    Returns
    -------
    dict
        ``answer`` (text), ``start``, ``end`` (token positions), and ``start_relevance`` and ``end_relevance``
        (:class:`TokenRelevance`), ``attributions`` (the two :class:`~dynamiclrp.Attribution`).
    """
    enc = encode(tokenizer, [question], [context])
    inputs = model_inputs(model, enc)
    with torch.no_grad():
        out = model(**inputs)
    start = int(out.start_logits[0].argmax())
    end = int(out.end_logits[0].argmax())
    result: dict[str, Any] = {"start": start, "end": end, "attributions": {}}
    ids = enc["input_ids"][0].tolist()
    result["answer"] = tokenizer.decode(ids[start:end + 1]) if end >= start else ""
    for which, pos in (("start", start), ("end", end)):
        att = explain(model, inputs, target=qa_targets(start, end, which), preset=preset, **kwargs)
        result["attributions"][which] = att
        tok = tokenizer.convert_ids_to_tokens([ids[pos]])[0]
        result[f"{which}_relevance"] = token_relevance(att.tokens, tokenizer, enc, 0, question, context,
                                                       label=f"answer {which}: token {pos} {tok!r}")
    return result


def next_token_target(token_id: int | None = None, position: int = -1, seed: str = "value"
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A target for a causal LM's logits ``(batch, seq, vocab)``: one token's logit at one position.

    Parameters
    ----------
    token_id : int, optional
        The next token to explain; None: the arg-max at ``position`` (greedy prediction).
    position : int
        Sequence position whose prediction is explained (default the last).
    seed : {"value", "one"}
        Seed the logit's value (default) or 1.

    Returns
    -------
    callable
        Output → explicit seed tensor, for ``target=`` of :func:`dynamiclrp.explain`.
    """
    def target(out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 3:
            raise ValueError(f"next-token targets need logits of shape (batch, seq, vocab), got {tuple(out.shape)}")
        s = torch.zeros_like(out)
        last = out[:, position, :]
        idx = last.argmax(-1) if token_id is None else torch.full((out.shape[0],), token_id, device=out.device)
        rows = torch.arange(out.shape[0], device=out.device)
        s[rows, position, idx] = last[rows, idx] if seed == "value" else 1.0
        return s

    return target


def explain_next_token(model: torch.nn.Module, tokenizer: Any, prompt: str, token: str | int | None = None,
                       preset: Any = "attnlrp", **kwargs: Any) -> TokenRelevance:
    """Explain a causal LM's next token after ``prompt`` (given as text or id; default: its greedy prediction).

    A text ``token`` is tokenized without special tokens and its first piece is explained.
    """
    enc = encode(tokenizer, [prompt])
    inputs = model_inputs(model, enc)
    if isinstance(token, str):
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"{token!r} tokenizes to nothing")
        token = int(pieces[0])
    seen: list[torch.Tensor] = []
    att = explain(model, inputs, target=_capturing(next_token_target(token), seen), preset=preset, **kwargs)
    tid = int(seen[0][0, -1].argmax()) if token is None else int(token)
    return token_relevance(att.tokens, tokenizer, enc, 0, prompt,
                           label=f"next token {tokenizer.decode([tid])!r} (id {tid})")


def explain_generation(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 5,
                       preset: Any = "attnlrp", **kwargs: Any) -> list[TokenRelevance]:
    """Greedy-generate ``max_new_tokens`` tokens and explain each one given everything before it.

    Returns one :class:`TokenRelevance` per generated token (over the prompt and the tokens generated before it).
    """
    enc = encode(tokenizer, [prompt])
    ids = enc["input_ids"]
    results = []
    for _ in range(max_new_tokens):
        inputs = model_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        seen: list[torch.Tensor] = []
        att = explain(model, inputs, target=_capturing(next_token_target(None), seen), preset=preset, **kwargs)
        nxt = int(seen[0][0, -1].argmax())
        text = tokenizer.decode(ids[0].tolist())
        cur = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        results.append(token_relevance(att.tokens, tokenizer, cur, 0, None,
                                       label=f"{text!r} → {tokenizer.decode([nxt])!r}"))
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], dim=1)
    return results
