"""``kfundus sweep``: train and evaluate one config over a grid of settings, and compare.

    kfundus sweep --config odir_clip_lora_shadow --data /data/ODIR-5K \\
        --grid model.options.lora_rank=4,8,16 --grid model.options.lora_alpha=8,16 \\
        --grid train.loss_options.margin=0.2,0.5 [--set key=value ...] [--out runs/sweep] [--split val]

Every cell of the grid (the Cartesian product of the ``--grid`` lists; values read as
YAML, like ``--set``) is one ordinary run, trained by ``kfundus.workflows.supervised.train`` into
``<out>/<cell>/`` and evaluated by ``kfundus.evaluation.evaluate_run``. The comparison
goes to ``<out>/comparison.csv``, ``comparison.md`` and ``comparison.png`` (one row per
cell: its settings, the official ODIR score where the labels are ODIR's at patient level,
macro AUROC, the best validation value of ``train.monitor``, and the training time).

A finished cell is reused when the sweep is run again (so an interrupted sweep continues
where it stopped); ``--overwrite`` trains every cell again. Evaluate on ``--split val``
while choosing settings; the test split is for the one setting chosen at the end.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from kfundus.errors import ConfigError
from kfundus.run import RunFolder


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["a.b=1,2", "c=x,y"]`` -> ``{"a.b": [1, 2], "c": ["x", "y"]}`` (values as YAML)."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,..., e.g. model.options.lora_rank=4,8")
        key, raw = item.split("=", 1)
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {item!r}: no values after '='")
        if key.strip() in grid:
            raise ConfigError(f"--grid {key}: given twice; put all its values in one --grid")
        grid[key.strip()] = values
    return grid


def cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in order."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(cell: dict) -> str:
    """A folder name from the last part of each key: ``lora_rank=4__margin=0.2``."""
    import re

    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in cell.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "__".join(parts)) or "default"


def run_sweep(
    config_path, grid: dict[str, list], *, data=None, overrides=None, out=None, split="test", overwrite=False
) -> pd.DataFrame:
    """Train + evaluate every cell; write and return the comparison table."""
    from kfundus.config import load_config
    from kfundus.engine.callbacks import HISTORY, best_so_far
    from kfundus.evaluation import evaluate_run
    from kfundus.evaluation.report import markdown_table
    from kfundus.workflows.supervised import train

    overrides = list(overrides or [])
    if not grid:
        raise ConfigError("no --grid given: name at least one setting to vary, e.g. --grid model.options.lora_rank=4,8")
    base = load_config(config_path, overrides, workflow="train")  # checks the config and overrides up front
    out = Path(out or Path(base.output_dir) / f"sweep_{base.name}")
    out.mkdir(parents=True, exist_ok=True)
    todo = cells(grid)
    configs = []
    for cell in todo:  # every cell's config is checked before the first one trains
        sets = overrides + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cell.items()]
        configs.append(load_config(config_path, sets, workflow="train"))
    rows = []
    for i, (cell, config) in enumerate(zip(todo, configs), 1):
        run_dir = out / cell_name(cell)
        print(f"\n=== sweep cell {i}/{len(todo)}: {cell} -> {run_dir}")
        finished = RunFolder(run_dir).finished()
        start = time.time()
        seconds = None
        if finished and not overwrite:
            print(f"(finished earlier: reusing {run_dir}; --overwrite trains it again)")
            seconds = (
                json.loads((run_dir / "sweep_cell.json").read_text()).get("train_seconds")
                if (run_dir / "sweep_cell.json").exists()
                else None
            )
        else:
            train(config, data, run_dir, overwrite=overwrite)
            seconds = round(time.time() - start, 1)
            (run_dir / "sweep_cell.json").write_text(json.dumps({"cell": cell, "train_seconds": seconds}))
        metrics = evaluate_run(run_dir, data, split=split, gallery=False)
        row = {**{k.rsplit(".", 1)[-1]: v for k, v in cell.items()}, "run": run_dir.name}
        for key, value in (metrics.get("odir") or {}).items():
            row[f"odir_{key}"] = value
        row["macro_auroc"] = metrics.get("macro_auroc")
        row[f"best_{config.train.monitor}"] = best_so_far(run_dir / HISTORY, config.train.monitor)
        row["train_seconds"] = seconds
        rows.append(row)
        write_comparison(pd.DataFrame(rows), out, split)  # after each cell: partial results survive
    table = pd.DataFrame(rows)
    print(f"\nsweep of {len(rows)} runs on split '{split}': {out / 'comparison.md'}")
    print(markdown_table(table))
    return table


def write_comparison(table: pd.DataFrame, out: Path, split: str) -> None:
    from kfundus.evaluation.plots import plot_bars
    from kfundus.evaluation.report import markdown_table

    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(
        f"# Sweep: evaluation on split '{split}'\n\n{markdown_table(table)}\n\n"
        "odir_*: the official ODIR score (pooled over patients x labels, "
        "threshold 0.5); macro_auroc: mean of per-class AUROCs.\n"
    )
    score = "odir_final" if "odir_final" in table else "macro_auroc"
    plot_bars(table["run"], table[score], out / "comparison.png", ylabel=score, title=f"sweep, split '{split}'")
