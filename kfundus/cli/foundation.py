"""``kfundus convert``: a released foundation-model checkpoint -> a kfundus model folder."""

from __future__ import annotations

import json

from kfundus.cli.options import add_set
from kfundus.errors import ConfigError

KINDS = ("retfound", "flair", "retclip")


def cmd_convert(args) -> int:
    from kfundus.config import apply_overrides
    from kfundus.convert import CONVERSION_FILE, convert

    options = apply_overrides({}, args.overrides)
    nested = sorted(k for k, v in options.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"--set {nested[0]}.…: converter options are flat (e.g. --set pooling=token)")
    out = convert(args.kind, args.checkpoint, args.out, overwrite=args.overwrite, **options)
    record = json.loads((out / CONVERSION_FILE).read_text())
    print(f"converted {args.checkpoint} -> {out}: {record['model']}")
    if record["ignored_keys"]:
        shown = ", ".join(record["ignored_keys"][:6]) + (" ..." if len(record["ignored_keys"]) > 6 else "")
        print(f"dropped {len(record['ignored_keys'])} checkpoint key(s) on purpose: {shown}")
    print(f"{record['seconds']} s, peak memory {record['peak_memory_mb']} MB; record: {out / CONVERSION_FILE}")
    if record.get("use"):
        print(f"use it with {record['use']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="a released RETFound / FLAIR / RET-CLIP checkpoint -> a kfundus model folder",
        description="Convert a released PyTorch checkpoint (read without PyTorch and without running its "
        "pickle) into a Keras model folder that model.weights or transfer.backbones[].weights can name.",
    )
    p.add_argument("--from", dest="kind", required=True, choices=KINDS, help="which model the checkpoint is")
    p.add_argument("checkpoint", help="the released .pth / .bin / .safetensors file, or a Hugging Face folder")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    add_set(p)
    p.set_defaults(func=cmd_convert)
