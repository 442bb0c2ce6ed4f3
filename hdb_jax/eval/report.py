"""The main job's report: per-sample scores -> rows with bootstrap intervals, Markdown, JSON.

Scores are collected per method ("row") and identity as arrays over prompts and seeds:
``identity``, ``subject_fidelity``, ``prompt_fidelity`` ``[P, S]`` and ``prior_realism`` ``[S']``
(1 where an "a face" sample of the personalised model lies on the real renders' manifold).
:func:`summarise` stacks them over identities and reports each metric's mean with a 95%
multi-way bootstrap interval (:func:`hdb_jax.eval.stats.bootstrap`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from hdb_jax.eval import stats

METRICS = ("identity", "subject_fidelity", "prompt_fidelity", "prior_realism")


def summarise(
    row: str, per_identity: Mapping[Any, Mapping[str, Any]], *, replicates: int = 2000, seed: int = 0
) -> dict:
    """One report row from ``{identity: {"identity": [P, S], ..., "steps", "seconds", "bytes"}}``.

    Returns:
      ``{"row", "identity": {"mean", "ci95", "n"}, "subject_fidelity": ..., "prompt_fidelity": ...,
      "prior_realism": ..., "steps", "seconds_per_identity", "bytes", "identities"}``.
    """
    ids = list(per_identity)
    out: dict[str, Any] = {"row": row}
    for metric in METRICS:
        values = np.stack(
            [np.asarray(per_identity[i][metric], np.float64) for i in ids]
        )  # [I, P, S] or [I, S]
        out[metric] = stats.bootstrap(values, replicates=replicates, seed=seed)
    out["steps"] = int(np.max([per_identity[i]["steps"] for i in ids]))
    out["seconds_per_identity"] = float(np.mean([per_identity[i]["seconds"] for i in ids]))
    out["bytes"] = int(np.max([per_identity[i]["bytes"] for i in ids]))
    out["identities"] = len(ids)
    return out


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (means with 95% intervals)."""
    head = "| row | identity | subject fidelity | prompt fidelity | prior realism | steps | s / identity | bytes | identities |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cells = [r["row"]] + [stats.fmt(r[m]) for m in METRICS]
        cells += [
            str(r["steps"]),
            f"{r['seconds_per_identity']:.1f}",
            f"{r['bytes']:,}",
            str(r["identities"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(rows: Sequence[Mapping[str, Any]], better: str, worse: str, metric: str = "identity") -> dict:
    """Whether ``better`` beats ``worse`` on ``metric``: means, and whether their intervals overlap."""
    by = {r["row"]: r for r in rows}
    if better not in by or worse not in by:
        return {"available": False}
    a, b = by[better][metric], by[worse][metric]
    return {
        "available": True,
        "metric": metric,
        better: a["mean"],
        worse: b["mean"],
        "higher": a["mean"] > b["mean"],
        "separated": a["mean"] > b["mean"] and not stats.overlaps(a, b),
    }


def fraction_of(
    scores: Mapping[str, Mapping[Any, Mapping[str, Any]]], row: str, reference: str, metric: str = "identity"
) -> dict:
    """``row``'s mean ``metric`` as a fraction of ``reference``'s, on the identities both were run on.

    Args:
      scores: ``{row: {identity: {metric: array, "steps": int, ...}}}`` (the main job's scores).

    Returns:
      ``{"available", "identities", row, reference, "fraction", "fewer_steps"}``; ``fewer_steps`` is
      ``reference``'s steps over ``row``'s, ``fraction`` is NaN when ``reference``'s mean is <= 0.
    """
    if row not in scores or reference not in scores:
        return {"available": False}
    common = [i for i in scores[reference] if i in scores[row]]
    if not common:
        return {"available": False}
    mean = lambda r: float(
        np.mean([np.nanmean(np.asarray(scores[r][i][metric], np.float64)) for i in common])
    )  # noqa: E731
    steps = lambda r: int(np.max([int(scores[r][i]["steps"]) for i in common]))  # noqa: E731
    a, b = mean(row), mean(reference)
    return {
        "available": True,
        "metric": metric,
        "identities": [int(i) for i in common],
        row: a,
        reference: b,
        "fraction": a / b if b > 0 else float("nan"),
        "fewer_steps": steps(reference) / max(steps(row), 1),
    }
