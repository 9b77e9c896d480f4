"""Ablation of the dual-stream WLSRL network on imbalanced DR grades (Kaloi et al., iCoMET 2023).

Cells, all trained by ``kfundus.workflows.supervised.train`` from the shipped ``fundus_dual_stream_wlsr``
with the same patient-level split (``data.split.seed``), schedule and image size:

- ``dual + WLSRL``      the method: both streams, weighted label smoothing (per-sample weights)
- ``dual + WLSRL class-term``  the same with the per-class-term weighting (``weight_by: class``)
- ``dual + CE``         plain cross-entropy (``train.loss=bce``)
- ``dual + Keras LS``   Keras' own label smoothing (``train.loss=label_smoothing``)
- ``conv only + WLSRL`` one Conv2D stream whose width is chosen for the dual network's
  parameter count (closest integer width)
- ``sep only + WLSRL``  (``--separable``) one SeparableConv2D stream, the same budget

Reported on the held-out test patients (best-validation-QWK checkpoint): macro F1 and
quadratic weighted kappa of the grade head, macro AUROC, and the AUROC of the
normal/abnormal head. ``--cross DIR`` also evaluates the ``dual + WLSRL`` model on another
DR dataset it never saw (e.g. ``../shared/data/idrid-grading``: full-resolution photographs
from another camera).

    python benchmarks/dual_stream_ablation.py --data synthetic --size 64
    python benchmarks/dual_stream_ablation.py --data ../shared/data/eyepacs-sample --size 96 \\
        --cross ../shared/data/idrid-grading

Writes ``<out>/results.md``, ``results.csv`` and ``results.png`` and prints the table.
Measured, not asserted: one split and one seed per cell, so small differences are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIG = "fundus_dual_stream_wlsr"
# EyePACS-like grade shares (eyepacs-sample: 557 / 47 / 108 / 23 / 15 of 750)
IMBALANCED = (0.743, 0.063, 0.144, 0.031, 0.02)


def matched_width(width: int, depth: int, convs: int, stream: str, image_size: int) -> tuple[int, int, int]:
    """The width of a single ``stream`` whose parameter count is closest to the dual
    network's; returns (width, its params, dual params)."""
    from kfundus.systems.dual_stream.model import build_dual_stream

    def params(w, streams):
        return build_dual_stream(
            5, image_size=image_size, depth=depth, width=w, convs_per_block=convs, streams=streams, normal_class="no_dr"
        ).count_params()

    target = params(width, "both")
    low, high = 1, 8 * width  # the count grows with the width: bisect, then take the nearer
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if params(mid, stream) < target else (low, mid)
    best = min((low, high), key=lambda w: abs(params(w, stream) - target))
    return best, params(best, stream), target


def cells(args) -> list[tuple[str, list[str], int]]:
    depth, convs = args.depth, 2
    conv_w, conv_p, dual_p = matched_width(args.width, depth, convs, "conv", args.size)
    out = [
        ("dual + WLSRL", ["train.loss=wlsr"], dual_p),
        ("dual + WLSRL class-term", ["train.loss=wlsr"], dual_p),
        ("dual + CE", ["train.loss=bce"], dual_p),
        ("dual + Keras LS", ["train.loss=label_smoothing"], dual_p),
        (
            "conv only + WLSRL",
            ["train.loss=wlsr", "model.options.streams=conv", f"model.options.width={conv_w}"],
            conv_p,
        ),
    ]
    if args.separable:
        sep_w, sep_p, _ = matched_width(args.width, depth, convs, "separable", args.size)
        out.append(
            (
                "sep only + WLSRL",
                ["train.loss=wlsr", "model.options.streams=separable", f"model.options.width={sep_w}"],
                sep_p,
            )
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", required=True, help="'synthetic' or a DR-grading folder/CSV (EyePACS, APTOS, IDRiD)")
    add("--out", default=None, help="output folder (default runs/ablation_<data name>)")
    add("--size", type=int, default=64)
    add("--depth", type=int, default=3)
    add("--width", type=int, default=16)
    add("--epochs", type=int, default=12)
    add("--batch", type=int, default=16)
    add("--lr", type=float, default=0.003)
    add("--patients", type=int, default=200, help="synthetic: patients (2 eyes each)")
    add("--separable", action="store_true", help="add the SeparableConv2D-only cell")
    add("--only", nargs="*", help="run only these cells (names as in the table)")
    add("--cross", help="a DR dataset to evaluate the dual + WLSRL model on (never trained on)")
    add("--set", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args(argv)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kfundus.config import load_config
    from kfundus.data.synthetic import make_dr
    from kfundus.evaluation import evaluate_run
    from kfundus.workflows.supervised import train

    name = "synthetic" if args.data == "synthetic" else Path(args.data).name
    out = Path(args.out or REPO / "runs" / f"ablation_{name}")
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data == "synthetic":
        data = str(make_dr(out / "data", n_patients=args.patients, size=args.size, seed=7, shares=IMBALANCED))
    base = [
        f"output_dir={out}",
        f"data.image_size={args.size}",
        f"model.options.depth={args.depth}",
        f"model.options.width={args.width}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        f"train.learning_rate={args.lr}",
        "export.formats=[]",
        *args.overrides,
    ]
    rows = []
    for cell, overrides, params in cells(args):
        if args.only and cell not in args.only:
            continue
        slug = cell.replace(" + ", "_").replace(" ", "_").lower()
        extra = ["train.loss_options.weight_by=class"] if cell.endswith("class-term") else []
        config = load_config(CONFIG, base + overrides + extra + [f"name={slug}"])
        print(f"\n=== {cell} ({params} parameters) ===", flush=True)
        start = time.time()
        run = train(config, data, run_dir=out / slug, overwrite=True)
        seconds = time.time() - start
        m = evaluate_run(run, data, split="test", gallery=False)
        rows.append(
            {
                "cell": cell,
                "params": params,
                "test_rows": m["n_samples"],
                "macro_f1": m["macro_f1"],
                "qwk": m["quadratic_kappa"],
                "macro_auroc": m["macro_auroc"],
                "balanced_accuracy": m["balanced_accuracy"],
                "abnormal_auroc": m["heads"]["abnormal"]["auroc"],
                "train_s": round(seconds),
            }
        )
        if cell == "dual + WLSRL" and args.cross:
            x = evaluate_run(run, args.cross, split="test", gallery=False, out_dir=out / slug / "eval-cross")
            cross = {
                "cross_dataset": str(args.cross),
                "rows": x["n_samples"],
                "scope": x["scope"],
                "qwk": x["quadratic_kappa"],
                "macro_f1": x["macro_f1"],
                "macro_auroc": x["macro_auroc"],
                "abnormal_auroc": x["heads"]["abnormal"]["auroc"],
                "confusion": x["confusion_matrix"],
            }
            (out / "cross_dataset.json").write_text(json.dumps(cross, indent=1))
            print("cross-dataset:", json.dumps(cross))
        pd.DataFrame(rows).to_csv(out / "results.csv", index=False)

    table = pd.DataFrame(rows)
    grades = pd.read_csv(out / rows[0]["cell"].replace(" + ", "_").replace(" ", "_").lower() / "splits.csv")
    counts = grades[grades["split"] == "test"]["grade"].value_counts().sort_index().to_dict()
    lines = [
        f"Data: {args.data} ({name}); test grades {counts}; {args.size} px, depth {args.depth}, "
        f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, best-val-QWK checkpoint.",
        "",
        "| cell | params | test macro F1 | test QWK | macro AUROC | balanced acc. | abnormal AUROC | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['params']:,} | {r['macro_f1']:.3f} | {r['qwk']:.3f} | "
            f"{r['macro_auroc']:.3f} | {r['balanced_accuracy']:.3f} | {r['abnormal_auroc']:.3f} | "
            f"{r['train_s']} |"
        )
    if (out / "cross_dataset.json").exists():
        c = json.loads((out / "cross_dataset.json").read_text())
        lines += [
            "",
            f"Cross-dataset (dual + WLSRL, never trained on it): {c['cross_dataset']}, {c['rows']} "
            f"images: QWK {c['qwk']:.3f}, macro F1 {c['macro_f1']:.3f}, macro AUROC "
            f"{c['macro_auroc']:.3f}, abnormal AUROC {c['abnormal_auroc']:.3f}",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ["macro_f1", "qwk"], ["test macro F1", "test quadratic kappa"]):
        ax.barh(table["cell"], table[key], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(f"Dual-stream ablation on {name} ({args.size} px)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    print(f"wrote {out / 'results.md'}, results.csv, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
