"""The one-page HTML report of an evaluation."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

# What was evaluated, from metrics.json, in the order the report lists it.
PROVENANCE = (
    ("data", "data evaluated"),
    ("split", "split"),
    ("scope", "rows taken"),
    ("rows", "rows evaluated"),
    ("skipped", "rows skipped (unreadable)"),
    ("level", "level"),
    ("model_file", "model file"),
    ("run", "run"),
    ("kfundus_version", "kfundus version"),
    ("evaluated", "evaluated at (UTC)"),
)
_NOT_HEADLINE = {key for key, _ in PROVENANCE} | {"task", "threshold_source", "n_samples"}


def write_html(out: Path, metrics: dict, primary: str | None = None) -> None:
    """A one-page report: what was evaluated (data, split, model file, kfundus version,
    time), the headline metrics with the classes left out of the macro means, the official
    ODIR score, a per-class table for every head (sigmoid and softmax alike) with its
    decision rule, and the plots and galleries.

    Args:
        out: the evaluation folder (``report.html`` is written there; the PNGs in it are
            shown).
        metrics: the evaluation's ``metrics.json`` dict.
        primary: the name of the model output ``metrics`` describes at the top level (the
            primary head of a multi-task model), to avoid repeating it among the heads.
    """
    provenance = "".join(
        f"<tr><th>{html.escape(title)}</th><td>{_fmt(metrics[key])}</td></tr>"
        for key, title in PROVENANCE
        if metrics.get(key) is not None
    )
    sections = [
        "<h1>kfundus evaluation</h1>",
        f"<h2>What was evaluated</h2><table>{provenance}</table>",
        _head_section("Metrics", metrics, primary, top=True),
    ]
    odir = metrics.get("odir")
    if odir:
        sections.append(
            "<h2>Official ODIR score (pooled over patients x labels, threshold 0.5)</h2><p>"
            + ", ".join(f"{k} = {_fmt(v)}" for k, v in odir.items())
            + "</p>"
        )
    for head, report in (metrics.get("heads") or {}).items():
        if head != primary:
            sections.append(_head_section(f"Head {head}", report, head))
    names = ["roc.png", "pr.png", "confusion.png"] + sorted(p.name for p in out.glob("gallery_*.png"))
    sections += [
        f'<figure><img src="{name}" width="600"><figcaption>{name}</figcaption></figure>'
        for name in names
        if (out / name).exists()
    ]
    sections.append(
        "<p>All figures: metrics.json. Macro means exclude classes without both positives and negatives "
        "in this set (listed above); training's val_auroc excludes them the same way on validation.</p>"
    )
    page = (
        "<html><head><meta charset='utf-8'><title>kfundus evaluation</title></head><body>"
        + "".join(sections)
        + "</body></html>"
    )
    (out / "report.html").write_text(page)


def _decision(report: dict) -> str:
    if report.get("task") == "multiclass":
        return "the arg-max class"
    source = report.get("threshold_source", "chosen on validation (thresholds.json)")
    return f"probability &gt; threshold, thresholds {html.escape(source)}"


def _head_section(title: str, report: dict, head: str | None, top: bool = False) -> str:
    """Headline scalars, excluded classes, decision rule and per-class table of one head."""
    headline = {
        k: v
        for k, v in report.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_HEADLINE and v is not None
    }
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in headline.items())
    excluded = report.get("excluded_classes") or []
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        f"<p>{html.escape(str(report.get('task', '')))}"
        + (f" (output {html.escape(head)})" if head and top else "")
        + f"; decision: {_decision(report)}.</p>",
        f"<table>{rows}</table>",
    ]
    if excluded:
        parts.append(
            "<p>Left out of the macro means (no positives or no negatives here): "
            + html.escape(", ".join(str(x) for x in excluded))
            + "</p>"
        )
    per_class = report.get("per_class")
    if per_class:
        table = pd.DataFrame(per_class).to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a")
        parts.append(f"<h3>Per class</h3>{table}")
    return "".join(parts)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (floats to 4 decimals, None as empty)."""

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
