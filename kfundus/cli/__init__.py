"""The kfundus commands: ``kfundus <command>`` or ``python -m kfundus <command>``.

    train     --config configs/X.yaml --data DIR [--set key=value ...] [--run-dir DIR]
    evaluate  --run runs/NAME [--data DIR] [--split test|val|train|all] [--set key=value ...]
    export    --run runs/NAME [--out saved_models/NAME] [--data DIR]   (bundle + model_card.json)
    predict   --bundle saved_models/NAME --images DIR|GLOB|CSV [--format keras|saved_model|tflite]
    explain   --run runs/NAME --images DIR_OR_GLOB | --split test [--classes predicted|G,C] [--out DIR]
    synth     --layout odir|rfmid --out DIR [...]   (synthetic data in the public layouts)
    sweep     --config configs/X.yaml --data DIR --grid KEY=V1,V2 [...]   (comparison table)
    transfer  --config configs/hr_transfer.yaml [--data DIR]   (LP / FT / LP-FT, k-fold comparison)
    pretrain  --config configs/retclip_pretrain.yaml --data DIR   (RET-CLIP; saves a vision preset)
    demo      [--out demo]  synthetic data -> train -> evaluate -> export, in a few minutes

``train.py`` and ``evaluate.py`` at the top of the repository call the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kfundus.errors import KfundusError  # noqa: E402


def _add_set(parser):
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")


def cmd_train(args) -> int:
    from kfundus.bundle import export_run
    from kfundus.config import load_config
    from kfundus.training import train

    config = load_config(args.config, args.overrides)
    run_dir = train(config, args.data, args.run_dir, overwrite=args.overwrite)
    if config.export.formats and not args.no_export:
        export_run(run_dir, None, data_path=args.data)
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
    from kfundus.bundle import export_run

    export_run(args.run, args.out, data_path=args.data)
    return 0


def cmd_demo(args) -> int:
    from kfundus.demo import run_demo

    run_demo(Path(args.out), patients=args.patients, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfundus", description="retinal-image deep learning with Keras 3")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/odir_efficientnet_b0.yaml")
    p.add_argument("--data", help="dataset folder or label file (overrides data.path)")
    p.add_argument("--run-dir", help="where the run goes (default: <output_dir>/<name>)")
    p.add_argument("--no-export", action="store_true", help="skip the export after training")
    p.add_argument("--overwrite", action="store_true", help="train a finished run again from scratch")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run and write the report")
    p.add_argument("--run", required=True, help="a run folder written by train")
    p.add_argument("--data", help="dataset (default: the one the run was trained on)")
    p.add_argument("--split", default="test", help="test, val, train, or all (default: test)")
    p.add_argument("--out", help="report folder (default: <run>/eval-<split>)")
    _add_set(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a run as .keras, SavedModel and TFLite")
    p.add_argument("--run", required=True)
    p.add_argument("--out", help="default: saved_models/<run name>")
    p.add_argument("--data", help="the run's dataset, if it moved (int8 calibration, accuracy per format)")
    p.set_defaults(func=cmd_export)

    sub.add_parser("predict", help="images -> CSV of probabilities and decisions (kfundus predict --help)")
    sub.add_parser("explain", help="Grad-CAM overlays (kfundus explain --help)")
    sub.add_parser("synth", help="write a synthetic dataset in a public layout (kfundus synth --help)")
    sub.add_parser("pretrain", help="RET-CLIP image-report pre-training (kfundus pretrain --help)")
    sub.add_parser("sweep", help="train + evaluate a config over a grid of settings, compare (kfundus sweep --help)")
    sub.add_parser("transfer", help="linear probe vs fine-tune vs LP-FT per backbone, k-fold (kfundus transfer --help)")

    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> export")
    p.add_argument("--out", default="demo")
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--epochs", type=int, help="default: the demo config's")
    p.set_defaults(func=cmd_demo)
    return parser


PASS_THROUGH = {"predict": "kfundus.predict:main", "explain": "kfundus.explain:main_explain",
                "synth": "kfundus.data.synthetic:main"}
PASS_THROUGH["sweep"] = "kfundus.sweep:main"
PASS_THROUGH["transfer"] = "kfundus.transfer:main"
PASS_THROUGH["pretrain"] = "kfundus.pretrain:main"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:  # commands with their own parser (and --help)
        import importlib

        module, func = PASS_THROUGH[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KfundusError as exc:
        print(f"kfundus {args.command}: error: {exc}", file=sys.stderr)
        return 2
