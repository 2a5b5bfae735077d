"""Token heatmaps: subword pieces joined into words, HTML with a colour per word, and an ANSI terminal rendering.

Pieces are joined into words from the tokenizer's character offsets when they are given (a piece that starts where
the previous one ended continues the word) and otherwise from the piece markers (WordPiece ``##`` continues a word;
byte-level BPE ``Ġ`` and SentencePiece ``▁`` start one). A word's relevance is the sum of its pieces' relevance,
so the rendering conserves what the explanation gave the tokens. Special tokens (``[CLS]``, ``<s>``, …) are kept
as words of their own and marked.

>>> words = group_tokens(["[CLS]", "play", "##ing", "!", "[SEP]"], [0.1, 0.5, 0.25, 0.0, -0.1],
...                      special=[True, False, False, False, True])
>>> [(w.text, w.relevance) for w in words]
[('[CLS]', 0.1), ('playing', 0.75), ('!', 0.0), ('[SEP]', -0.1)]
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .colormaps import apply_colormap

_BPE_SPACE = ("Ġ", "▁")


@dataclass
class Word:
    """A word made of one or more token pieces.

    Attributes
    ----------
    text : str
        The word as shown (from the original text when offsets are known).
    relevance : float
        Sum of the pieces' relevance.
    pieces : list of str
        The tokenizer's pieces.
    piece_relevance : list of float
    special : bool
        A special token ([CLS], [SEP], <s>, padding, ...).
    space : str
        Whitespace before the word in the original text.
    """

    text: str
    relevance: float
    pieces: list[str] = field(default_factory=list)
    piece_relevance: list[float] = field(default_factory=list)
    special: bool = False
    space: str = " "


def _clean(piece: str) -> str:
    if piece.startswith("##"):
        return piece[2:]
    return piece.lstrip("".join(_BPE_SPACE)).replace("Ċ", "\n")


def group_tokens(tokens: Sequence[str], relevance: Any, special: Sequence[bool] | None = None,
                 offsets: Sequence[tuple[int, int]] | None = None, text: str | None = None,
                 join: bool = True) -> list[Word]:
    """Join subword pieces into words and sum their relevance.

    Parameters
    ----------
    tokens : sequence of str
        The tokenizer's pieces (``tokenizer.convert_ids_to_tokens(ids)``).
    relevance : array-like
        One value per token.
    special : sequence of bool, optional
        Which tokens are special (``tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)``).
    offsets : sequence of (start, end), optional
        Character offsets of each token in ``text`` (fast tokenizers' ``return_offsets_mapping=True``).
    text : str, optional
        The original text; words are then shown as written in it.
    join : bool
        False keeps one word per piece.

    Returns
    -------
    list of Word
    """
    rel = np.asarray(relevance.detach().cpu().double() if hasattr(relevance, "detach") else relevance,
                     dtype=np.float64).reshape(-1)
    if len(rel) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(rel)} relevance values")
    special = list(special) if special is not None else [False] * len(tokens)
    use_offsets = offsets is not None and text is not None
    markers = any(t.startswith(_BPE_SPACE) for t in tokens)
    words: list[Word] = []
    prev_end = None
    for i, tok in enumerate(tokens):
        sp = bool(special[i])
        if use_offsets and not sp:
            s, e = (int(v) for v in offsets[i])
            cont = join and words and not words[-1].special and prev_end is not None and s == prev_end and s < e
            space = text[prev_end:s] if prev_end is not None and prev_end <= s else (" " if words else "")
            piece_text = text[s:e]
            lead = len(piece_text) - len(piece_text.lstrip())
            if lead:  # byte-level BPE offsets include the space before a word: it starts a new word
                space, piece_text, cont = space + piece_text[:lead], piece_text[lead:], False
            prev_end = e
        else:
            if sp:
                cont = False
            elif markers:
                cont = join and words and not words[-1].special and not tok.startswith(_BPE_SPACE)
            else:
                cont = join and words and not words[-1].special and tok.startswith("##")
            piece_text = tok if sp else _clean(tok)
            space = "" if not words else " "
        if cont:
            w = words[-1]
            w.text += piece_text
            w.relevance += float(rel[i])
            w.pieces.append(tok)
            w.piece_relevance.append(float(rel[i]))
        else:
            words.append(Word(piece_text, float(rel[i]), [tok], [float(rel[i])], sp, space))
    return words


def _as_words(tokens: Sequence[str] | Sequence[Word], relevance: Any = None, **kwargs: Any) -> list[Word]:
    if tokens and isinstance(tokens[0], Word):
        return list(tokens)  # type: ignore[arg-type]
    if relevance is None:
        raise ValueError("give the relevance of each token")
    return group_tokens(tokens, relevance, **kwargs)  # type: ignore[arg-type]


def _scale(words: list[Word], scale: float | None, include_special: bool) -> float:
    if scale is not None:
        return scale
    vals = [abs(w.relevance) for w in words if include_special or not w.special]
    m = max(vals) if vals else 0.0
    return m if m > 0 else 1.0


def _text_colour(rgb: np.ndarray) -> str:
    return "#000" if float(rgb @ np.array([0.299, 0.587, 0.114])) > 140 else "#fff"


CSS = """
.dlrp-tokens { font-family: -apple-system, 'Segoe UI', Roboto, sans-serif; line-height: 2.1; font-size: 15px; }
.dlrp-tok { padding: 2px 3px; border-radius: 3px; }
.dlrp-special { border: 1px dashed #888; font-family: monospace; font-size: 12px; color: #555; }
.dlrp-legend { font-size: 12px; color: #444; margin-top: 4px; }
.dlrp-legend span { display: inline-block; width: 18px; height: 10px; }
"""


def token_html(tokens: Sequence[str] | Sequence[Word], relevance: Any = None, *, cmap: str = "bwr",
               scale: float | None = None, include_special: bool = False, title: str | None = None,
               legend: bool = True, **group: Any) -> str:
    """An HTML fragment: each word on a background coloured by its relevance (blue negative, red positive).

    The scale is the largest ``|R|`` over the non-special words unless ``scale`` is given (``include_special``
    includes special tokens, which often collect much relevance). Hovering a word shows its value and pieces.
    Use :func:`token_html_page` for a full page (with the CSS :data:`CSS`).

    Parameters
    ----------
    tokens : sequence of str, or the words of :func:`group_tokens`
    relevance : array-like, optional
        One value per token (not needed for words).
    cmap : str
        A colour map of :mod:`dynamiclrp.viz.colormaps`.
    title : str, optional
        A caption above the text.
    **group
        Passed to :func:`group_tokens` (``special``, ``offsets``, ``text``, ``join``).

    Examples
    --------
    >>> frag = token_html(["a", "<b>"], [1.0, -1.0])
    >>> "&lt;b&gt;" in frag and "<b>" not in frag
    True
    """
    words = _as_words(tokens, relevance, **group)
    s = _scale(words, scale, include_special)
    parts = []
    if title:
        parts.append(f'<div class="dlrp-title"><b>{html.escape(title)}</b></div>')
    parts.append('<div class="dlrp-tokens">')
    for w in words:
        rgb = apply_colormap(np.array([w.relevance / s]), cmap)[0]
        tip = f"{w.relevance:+.4g}"
        if len(w.pieces) > 1:
            tip += " = " + " + ".join(f"{p} {r:+.3g}" for p, r in zip(w.pieces, w.piece_relevance))
        cls = "dlrp-tok dlrp-special" if w.special else "dlrp-tok"
        space = html.escape(w.space).replace("\n", "<br>")
        parts.append(f'{space}<span class="{cls}" style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]});'
                     f'color:{_text_colour(rgb)}" title="{html.escape(tip, quote=True)}">'
                     f"{html.escape(w.text) or '&#8203;'}</span>")
    parts.append("</div>")
    if legend:
        lo, mid, hi = (apply_colormap(np.array([v]), cmap)[0] for v in (-1.0, 0.0, 1.0))
        sw = "".join(f'<span style="background:rgb({c[0]},{c[1]},{c[2]})"></span>' for c in (lo, mid, hi))
        parts.append(f'<div class="dlrp-legend">{sw} −{s:.3g} … 0 … +{s:.3g}'
                     f'{" (special tokens dashed)" if any(w.special for w in words) else ""}</div>')
    return "".join(parts)


def token_html_page(fragments: Sequence[str], title: str = "dynamiclrp token relevance") -> str:
    """A standalone HTML page holding fragments of :func:`token_html`."""
    body = "\n<hr>\n".join(fragments)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>body{{max-width:60em;margin:2em auto;padding:0 1em}}{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def save_token_html(path: str | Path, fragments: Sequence[str] | str, title: str = "dynamiclrp token relevance"
                    ) -> Path:
    """Write :func:`token_html` fragment(s) as one standalone page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frags = [fragments] if isinstance(fragments, str) else list(fragments)
    path.write_text(token_html_page(frags, title), encoding="utf-8")
    return path


def token_ansi(tokens: Sequence[str] | Sequence[Word], relevance: Any = None, *, cmap: str = "bwr",
               scale: float | None = None, include_special: bool = False, color: bool = True,
               **group: Any) -> str:
    """The words with 24-bit ANSI background colours for a terminal (``color=False``: ``word[+0.12]`` text).

    Special tokens are shown dimmed. Arguments as in :func:`token_html`.

    Examples
    --------
    >>> token_ansi(["hi", "there"], [1.0, 0.0], color=False)
    'hi[+1] there[+0]'
    """
    words = _as_words(tokens, relevance, **group)
    s = _scale(words, scale, include_special)
    out = []
    for w in words:
        space = w.space.replace("\n", " ") if out else ""
        if not color:
            out.append(f"{space}{w.text}[{w.relevance:+.3g}]")
            continue
        if w.special:
            out.append(f"{space}\x1b[2m{w.text}\x1b[0m")
            continue
        r, g, b = (int(v) for v in apply_colormap(np.array([w.relevance / s]), cmap)[0])
        fg = "30" if _text_colour(np.array([r, g, b])) == "#000" else "97"
        out.append(f"{space}\x1b[{fg};48;2;{r};{g};{b}m{w.text}\x1b[0m")
    return "".join(out)
