"""Commands around a training run: configs, train, evaluate, export, sweep, demo."""

from __future__ import annotations

import json
from pathlib import Path

from kfundus.cli.options import add_config, add_set


def cmd_configs(args) -> int:
    from kfundus.config import config_summary, shipped_configs

    rows = [config_summary(path) for path in shipped_configs().values()]
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  kfundus {r['workflow'].replace('_', '-'):<9}  {r['description']}")
    print(
        "\nuse one by name: kfundus train --config odir_efficientnet_b0 --data DIR "
        "(kfundus configs --show NAME prints it)"
    )
    if args.show:
        print(f"\n# {shipped_configs()[args.show]}\n" + shipped_configs()[args.show].read_text())
    return 0


def cmd_train(args) -> int:
    from kfundus.config import load_config
    from kfundus.workflows.supervised import train

    config = load_config(args.config, args.overrides, workflow="train")
    run_dir = train(config, args.data, args.run_dir, overwrite=args.overwrite)
    if config.export.formats and not args.no_export:
        from kfundus.deploy import export_run

        export_run(run_dir, data_path=args.data)
    return 0


def cmd_evaluate(args) -> int:
    from kfundus.evaluation import evaluate_run

    metrics = evaluate_run(args.run, args.data, split=args.split, overrides=args.overrides, out_dir=args.out)
    keys = ["macro_auroc", "macro_ap", "macro_f1", "accuracy", "quadratic_kappa", "auroc", "kappa"]
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=1))
    if "odir" in metrics:
        print("official ODIR score:", json.dumps(metrics["odir"]))
    return 0


def cmd_export(args) -> int:
    from kfundus.deploy import export_run

    export_run(args.run, args.out, data_path=args.data)
    return 0


def cmd_sweep(args) -> int:
    from kfundus.workflows.sweep import parse_grid, run_sweep

    run_sweep(
        args.config,
        parse_grid(args.grid),
        data=args.data,
        overrides=args.overrides,
        out=args.out,
        split=args.split,
        overwrite=args.overwrite,
    )
    return 0


def cmd_demo(args) -> int:
    from kfundus.workflows.demo import run_demo

    run_demo(Path(args.out), patients=args.patients, epochs=args.epochs)
    return 0


def register(sub) -> None:
    from kfundus.config import shipped_configs

    p = sub.add_parser("configs", help="list the shipped configs (the published setups)")
    p.add_argument("--show", choices=sorted(shipped_configs()), help="also print one of them")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("train", help="train a model from a config")
    add_config(p, "odir_efficientnet_b0")
    p.add_argument("--data", help="dataset folder or label file (overrides data.path)")
    p.add_argument("--run-dir", help="where the run goes (default: <output_dir>/<name>)")
    p.add_argument("--no-export", action="store_true", help="skip the export after training")
    p.add_argument("--overwrite", action="store_true", help="train a finished run again from scratch")
    add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run and write the report")
    p.add_argument("--run", required=True, help="a run folder written by train")
    p.add_argument("--data", help="dataset (default: the one the run was trained on)")
    p.add_argument("--split", default="test", help="test, val, train, or all (default: test)")
    p.add_argument("--out", help="report folder (default: <run>/eval-<split>)")
    add_set(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a run as .keras, SavedModel and TFLite")
    p.add_argument("--run", required=True)
    p.add_argument("--out", help="default: <export.dir>/<run name>")
    p.add_argument("--data", help="the run's dataset, if it moved (int8 calibration, accuracy per format)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="train + evaluate a config over a grid of settings, compare")
    add_config(p, "odir_clip_lora_shadow")
    p.add_argument("--data", help="dataset folder or label file (overrides data.path)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a setting and its values, e.g. model.options.lora_rank=4,8 (repeatable)",
    )
    add_set(p)
    p.add_argument("--out", help="sweep folder (default: <output_dir>/sweep_<name>)")
    p.add_argument("--split", default="test", help="split evaluated per cell (default test; val to choose)")
    p.add_argument("--overwrite", action="store_true", help="train finished cells again")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> export, all under --out")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: demo)")
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--epochs", type=int, help="default: the demo config's")
    p.set_defaults(func=cmd_demo)
