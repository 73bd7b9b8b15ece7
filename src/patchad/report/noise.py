"""How uncertain each number of the report is, and the rule that decides a "winner".

Two measured uncertainties, where the results have them:

- the seed spread: half the range (max - min) of a metric over a ``--seeds N`` run's seeds
  (``<metric>_min`` / ``<metric>_max``; 0 for one seed or a method that draws nothing at random);
- the test-set noise: half the width of the 95 % bootstrap interval over the test images
  (``intervals``, :mod:`patchad.bootstrap`).

The rule (``RULE``): a method is named the winner of a metric only when its lead over the
runner-up exceeds the larger seed half-range of the two **and** the larger interval half-width of
the two, i.e. ``lead > margin`` with ``margin = max(spread_a, spread_b, halfwidth_a,
halfwidth_b)``. Otherwise the report says "no clear difference (±margin)". A result without
either measurement has margin 0, so a lead of any size names a winner, as before.
"""

from __future__ import annotations

from typing import Any

from patchad.report.data import esc, num

RULE = (
    "A method is named the winner of a metric only when its lead over the runner-up exceeds both "
    "the larger seed spread (half the min-max range over seeds) of the two and the larger "
    "half-width of their 95 % bootstrap intervals over the test images; otherwise: no clear "
    "difference (± that margin)."
)


def spread(row: dict[str, Any] | None, key: str) -> float:
    """Half the min-max range of ``key`` over the row's seeds (0 when not measured)."""
    if row is None:
        return 0.0
    lo, hi = num(row.get(f"{key}_min")), num(row.get(f"{key}_max"))
    return 0.0 if lo is None or hi is None else (hi - lo) / 2.0


def interval(row: dict[str, Any] | None, key: str) -> tuple[float, float] | None:
    """The row's 95 % bootstrap interval of ``key``, or None."""
    bounds = (row or {}).get("intervals") or {}
    pair = bounds.get(key) if isinstance(bounds, dict) else None
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return None
    lo, hi = num(pair[0]), num(pair[1])
    return None if lo is None or hi is None else (lo, hi)


def halfwidth(row: dict[str, Any] | None, key: str) -> float:
    """Half the width of the row's bootstrap interval of ``key`` (0 when not measured)."""
    pair = interval(row, key)
    return 0.0 if pair is None else (pair[1] - pair[0]) / 2.0


def margin(rows: list[dict[str, Any] | None], key: str) -> float:
    """The lead ``rows``' methods must exceed on ``key`` to name a winner (see ``RULE``)."""
    values = [spread(r, key) for r in rows] + [halfwidth(r, key) for r in rows]
    return max(values, default=0.0)


def clear(lead: float, needed: float) -> bool:
    """Whether a ``lead`` names a winner against the ``needed`` margin (``RULE``)."""
    return lead > needed


def summary_cell(row: dict[str, Any], key: str, text: str) -> str:
    """A summary-table metric cell's HTML: ``text`` (the mean), ``± half-range`` over several
    seeds, and the bootstrap interval in small type, wherever they were measured."""
    out = esc(text)
    if int(row.get("n_seeds") or 1) > 1 and num(row.get(f"{key}_max")) is not None:
        out += f" ± {spread(row, key):.3f}"
    pair = interval(row, key)
    if pair is not None:
        out += f' <span class="ci">[{pair[0]:.3f}, {pair[1]:.3f}]</span>'
    return out
