"""``make demo``: synthetic data -> train -> evaluate -> export, in a few minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from kfundus.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_synthetic.yaml"


def run_demo(out: Path, *, patients: int = 200, epochs: int | None = None) -> None:
    from kfundus.bundle import export_run
    from kfundus.data.synthetic import make_odir
    from kfundus.evaluation import evaluate_run
    from kfundus.training import train

    start = time.time()
    data = out / "data"
    if not (data / "annotation.csv").exists():
        make_odir(data, n_patients=patients, size=192, seed=0, aspect=1.3)
    print(f"[1/4] synthetic ODIR-layout dataset: {data}")
    overrides = [f"output_dir={out / 'runs'}", f"data.cache_dir={out / 'cache'}"]
    config = load_config(CONFIG, overrides + ([f"train.epochs={epochs}"] if epochs else []))
    print("[2/4] training EfficientNet-B0 from scratch")
    run_dir = train(config, str(data), overwrite=True)
    print("[3/4] evaluating on the held-out test patients")
    metrics = evaluate_run(run_dir, split="test")
    print("[4/4] exporting")
    bundle = export_run(run_dir, None)
    print(f"\ndone in {time.time() - start:.0f} s")
    print(f"  test macro AUROC: {metrics.get('macro_auroc')}")
    print(f"  report:  {run_dir / 'eval-test' / 'report.html'}")
    print(f"  run:     {run_dir}")
    print(f"  exports: {bundle}")
