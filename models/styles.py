"""Style names and style choices of multi-style networks (TransformerNet with ``num_styles`` > 1).

A multi-style ``model.pth`` lists its styles in ``meta["styles"]`` (the style images' stems, in table order).
Users pick a style by name or index, or mix several with weights: ``parse_style`` turns the text they type
(stylize's ``style=``, scripts' options) into a ``StyleChoice``, whose ``weights`` go to ``TransformerNet.for_style``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.errors import FaststyleError


@dataclass(frozen=True)
class StyleChoice:
    """One style or one mix: ``weights`` (num_styles,) >= 0 summing to 1, and a ``label`` for file names."""

    label: str
    weights: tuple[float, ...]


def style_names(meta: dict, num_styles: int) -> list[str]:
    """The names of a network's styles: ``meta["styles"]`` when it fits, else ``style_0``, ``style_1``, ...."""
    names = meta.get("styles")
    if isinstance(names, list | tuple) and len(names) == num_styles and all(isinstance(n, str) for n in names):
        return [str(name) for name in names]
    return [f"style_{i}" for i in range(num_styles)]


def one_style(index: int, names: list[str]) -> StyleChoice:
    """The choice of style ``index`` alone."""
    return StyleChoice(names[index], tuple(1.0 if i == index else 0.0 for i in range(len(names))))


def all_styles(names: list[str]) -> list[StyleChoice]:
    """Every style on its own, in table order."""
    return [one_style(i, names) for i in range(len(names))]


def _index_of(word: str, names: list[str]) -> int:
    word = word.strip()
    if word in names:
        return names.index(word)
    if re.fullmatch(r"\d+", word) and int(word) < len(names):
        return int(word)
    raise FaststyleError(f"unknown style {word!r}: this model's styles are {', '.join(names)} (or 0-{len(names) - 1})")


def parse_style(spec: str | int, names: list[str], option: str = "style") -> StyleChoice:
    """A style name or index (``van_gogh_village_street_auvers``, ``2``), or a mix of weighted styles
    (``hokusai_great_wave:0.3,van_gogh_village_street_auvers:0.7``; weights >= 0, normalised to sum to 1).
    Raises FaststyleError with one line (listing the valid names) for anything else; ``option`` names the option
    the text came from in it (``style``, ``style_end``)."""
    text = str(spec).strip()
    if ":" not in text and "," not in text:
        return one_style(_index_of(text, names), names)
    weights = [0.0] * len(names)
    for part in text.split(","):
        word, sep, amount = part.partition(":")
        if not sep:
            example = f"{names[0]}:0.3,{names[-1]}:0.7"
            raise FaststyleError(f"{option}={text}: write a mix as name:weight pairs, e.g. {example}")
        try:
            value = float(amount)
        except ValueError:
            raise FaststyleError(f"{option}={text}: {amount.strip()!r} is not a number (in {part.strip()!r})") from None
        if not math.isfinite(value) or value < 0:
            raise FaststyleError(f"{option}={text}: weights must be numbers >= 0, got {amount.strip()}")
        weights[_index_of(word, names)] += value
    total = sum(weights)
    if not math.isfinite(total):  # each weight is finite, their sum need not be (1e308 + 1e308)
        raise FaststyleError(
            f"{option}={text}: the weights add up to more than a number can hold; only their ratio counts, so use "
            "small ones, e.g. 0.3 and 0.7"
        )
    if total <= 0:
        raise FaststyleError(f"{option}={text}: the weights are all 0; give at least one positive weight")
    weights = [w / total for w in weights]
    used = [i for i, w in enumerate(weights) if w > 0]
    if len(used) == 1:
        return one_style(used[0], names)
    label = "_".join(f"{names[i]}-{round(100 * weights[i])}" for i in used)
    return StyleChoice(label, tuple(weights))
