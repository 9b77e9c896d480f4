"""The kfundus commands: ``kfundus <command>`` or ``python -m kfundus <command>``.

    configs   list the shipped configs (the published setups), one line each
    train     --config NAME|FILE --data DIR [--set key=value ...] [--run-dir DIR]
    evaluate  --run runs/NAME [--data DIR] [--split test|val|train|all] [--set key=value ...]
    explain   --run runs/NAME --images DIR_OR_GLOB | --split test [--classes predicted|G,C] [--out DIR]
    export    --run runs/NAME [--out DIR] [--data DIR]   (bundle + model_card.json)
    predict   --bundle saved_models/NAME --images DIR|GLOB|CSV [--format keras|saved_model|tflite]
    pretrain  --config retclip_pretrain --data DIR   (RET-CLIP; saves a vision encoder preset)
    transfer  --config hr_transfer [--data DIR]      (LP / FT / LP-FT per backbone, k-fold)
    convert   --from retfound|flair|retclip CHECKPOINT --out DIR   (a released checkpoint -> Keras)
    zero-shot --config flair_zero_shot --data DIR    (a converted FLAIR / RET-CLIP model, no training)
    sweep     --config NAME --data DIR --grid KEY=V1,V2 [...]   (comparison table)
    synth     --layout odir|rfmid|dr|oct|hrdc --out DIR [...]   (synthetic data in the public layouts)
    demo      [--out demo]  synthetic data -> train -> evaluate -> export, in a few minutes

All argument parsing lives in this package; the library modules expose functions.
``train.py`` and ``evaluate.py`` at the top of the repository call the first two.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kfundus.cli import data, deploy, foundation, runs, studies, zero_shot
from kfundus.errors import KfundusError

GROUPS = (runs, deploy, studies, foundation, zero_shot, data)


def build_parser() -> argparse.ArgumentParser:
    from kfundus import __version__

    parser = argparse.ArgumentParser(prog="kfundus", description="retinal-image deep learning with Keras 3")
    parser.add_argument("--version", action="version", version=f"kfundus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except KfundusError as exc:
        print(f"kfundus {args.command}: error: {exc}", file=sys.stderr)
        return 2
