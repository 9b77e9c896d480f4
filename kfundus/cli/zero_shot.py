"""``kfundus zero-shot``: a converted FLAIR or RET-CLIP model classifies a dataset without training."""

from __future__ import annotations

from kfundus.cli.options import add_config, add_set
from kfundus.errors import ConfigError


def cmd_zero_shot(args) -> int:
    from kfundus.config import load_config
    from kfundus.workflows.zero_shot import run_zero_shot

    config = load_config(args.config, args.overrides)
    if config.workflow not in ("zero_shot", "train"):
        raise ConfigError(
            f"{args.config} is a config for `kfundus {config.workflow.replace('_', '-')}`; zero-shot reads a "
            "zero_shot config (e.g. --config flair_zero_shot) or a train config with a zero_shot section "
            "(--config retclip_odir)"
        )
    run_zero_shot(config, args.data, args.out, split=args.split, batch_size=args.batch_size)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "zero-shot",
        aliases=["zero_shot"],  # the workflow's name in config files
        help="classify a dataset with a converted FLAIR / RET-CLIP model and text prompts, no training",
        description="Zero-shot classification: class prompts through the text encoder, images through the "
        "image encoder, softmax over the scaled similarities; per-class AUROC and accuracy against the labels.",
    )
    add_config(p, "flair_zero_shot")
    p.add_argument("--data", help="dataset folder or label file (overrides data.path)")
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"), help="rows to classify")
    p.add_argument("--out", help="output folder (default: <output_dir>/<name>)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    add_set(p)
    p.set_defaults(func=cmd_zero_shot)
