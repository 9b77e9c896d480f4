"""``kfundus demo``: synthetic data -> train -> evaluate -> export, in a few minutes on a CPU.

Everything it writes lands under ``out``: ``data/`` (the synthetic ODIR-layout dataset),
``cache/`` (decoded images), ``runs/`` (the run folder and its report) and
``saved_models/`` (the exported bundle)."""

from __future__ import annotations

import time
from pathlib import Path

from kfundus.config import load_config

CONFIG = "demo_synthetic"


def run_demo(out, *, patients: int = 200, epochs: int | None = None) -> dict:
    """Run the demo into ``out``; return where its outputs are and the test macro AUROC."""
    from kfundus.data.synthetic import make_odir
    from kfundus.deploy import export_run
    from kfundus.evaluation import evaluate_run
    from kfundus.workflows.supervised import train

    start = time.time()
    out = Path(out).resolve()
    data = out / "data"
    if not (data / "annotation.csv").exists():
        make_odir(data, n_patients=patients, size=192, seed=0, aspect=1.3)
    print(f"[1/4] synthetic ODIR-layout dataset: {data}")
    overrides = [f"output_dir={out / 'runs'}", f"data.cache_dir={out / 'cache'}", f"export.dir={out / 'saved_models'}"]
    config = load_config(CONFIG, overrides + ([f"train.epochs={epochs}"] if epochs else []), workflow="train")
    print("[2/4] training EfficientNet-B0 from scratch")
    run_dir = train(config, str(data), overwrite=True)
    print("[3/4] evaluating on the held-out test patients")
    metrics = evaluate_run(run_dir, split="test")
    print("[4/4] exporting")
    bundle = export_run(run_dir)
    report = Path(run_dir) / "eval-test" / "report.html"
    print(f"\ndone in {time.time() - start:.0f} s")
    print(f"  test macro AUROC: {metrics.get('macro_auroc')}")
    print(f"  report:  {report}")
    print(f"  run:     {run_dir}")
    print(f"  exports: {bundle}")
    return {"report": report, "run": Path(run_dir), "bundle": Path(bundle), "macro_auroc": metrics.get("macro_auroc")}
