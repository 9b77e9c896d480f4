"""Arguments several commands share."""

from __future__ import annotations


def add_set(parser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )


def add_config(parser, example: str, required: bool = True) -> None:
    parser.add_argument(
        "--config",
        required=required,
        help=f"a shipped config name (kfundus configs lists them), or a YAML file; e.g. {example}",
    )
