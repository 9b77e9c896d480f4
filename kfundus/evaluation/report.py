"""The one-page HTML report of an evaluation."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd


def write_html(out: Path, metrics: dict) -> None:
    """A one-page report: headline metrics, the per-class table, the plots."""
    headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v is not None}
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in headline.items())
    table = ""
    per_class = out / "per_class.csv"
    if per_class.exists():
        table = pd.read_csv(per_class).to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a")
    odir = metrics.get("odir")
    odir_html = ""
    if odir:
        odir_html = (
            "<h2>Official ODIR score (pooled over patients x labels, threshold 0.5)</h2><p>"
            + ", ".join(f"{k} = {_fmt(v)}" for k, v in odir.items())
            + "</p>"
        )
    names = ["roc.png", "pr.png", "confusion.png"] + sorted(p.name for p in out.glob("gallery_*.png"))
    images = "".join(
        f'<figure><img src="{name}" width="600"><figcaption>{name}</figcaption></figure>'
        for name in names
        if (out / name).exists()
    )
    page = (
        f"<html><head><meta charset='utf-8'><title>kfundus evaluation</title></head><body>"
        f"<h1>kfundus evaluation</h1><table>{rows}</table>{odir_html}<h2>Per class</h2>{table}{images}"
        f"<p>All figures: metrics.json. Macro means exclude classes without both positives and negatives "
        f"in this set.</p></body></html>"
    )
    (out / "report.html").write_text(page)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (floats to 4 decimals, None as empty)."""

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
