"""Commands of the foundation-model systems: pretrain (RET-CLIP) and transfer (LP / FT / LP-FT)."""

from __future__ import annotations

from kfundus.cli.options import add_config, add_set
from kfundus.errors import ConfigError


def cmd_pretrain(args) -> int:
    from kfundus.config import load_config
    from kfundus.workflows.pretrain import evaluate_pretrained, pretrain

    if args.evaluate:
        if not args.run:
            raise ConfigError("--evaluate needs --run runs/NAME")
        evaluate_pretrained(args.run, args.data)
        return 0
    if not args.config:
        raise ConfigError("give --config retclip_pretrain (or --run runs/NAME --evaluate)")
    pretrain(load_config(args.config, args.overrides, workflow="pretrain"), args.data, args.run_dir, args.overwrite)
    return 0


def cmd_transfer(args) -> int:
    from kfundus.config import load_config
    from kfundus.workflows.transfer import run_transfer

    run_transfer(load_config(args.config, args.overrides, workflow="transfer"), args.data, args.out, args.overwrite)
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="RET-CLIP image-report pre-training (saves a vision encoder preset)")
    add_config(p, "retclip_pretrain", required=False)
    p.add_argument("--data", help="image-report pairs (overrides data.path)")
    p.add_argument("--run-dir", help="default: <output_dir>/<name>")
    p.add_argument("--run", help="with --evaluate: a finished pre-training run")
    p.add_argument("--evaluate", action="store_true", help="only evaluate --run (retrieval, zero-shot)")
    p.add_argument("--overwrite", action="store_true", help="train a finished run again from scratch")
    add_set(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("transfer", help="linear probe vs fine-tune vs LP-FT per backbone, k-fold")
    add_config(p, "hr_transfer")
    p.add_argument("--data", help="dataset folder or label file (overrides data.path)")
    add_set(p)
    p.add_argument("--out", help="output folder (default: <output_dir>/<name>)")
    p.add_argument("--overwrite", action="store_true", help="recompute cells already in folds.csv")
    p.set_defaults(func=cmd_transfer)
