"""Commands that use a trained model: explain (Grad-CAM overlays) and predict (a bundle on images)."""

from __future__ import annotations

import sys
from pathlib import Path

from kfundus.errors import ConfigError


def _explain_setup(args):
    """(model, labels, preprocess, thresholds) from --run and/or --model."""
    from kfundus.data.pipeline import Preprocess
    from kfundus.run import RunFolder
    from kfundus.systems import load_model

    run = RunFolder(args.run).require_finished("explain") if args.run else None
    model_file = Path(args.model) if args.model else run.model_file
    if not model_file.exists():
        raise ConfigError(f"no model file {model_file}: give --model path/to/model.keras or --run runs/NAME")
    model = load_model(model_file)
    thresholds = 0.5 if args.threshold is None else args.threshold
    if run is not None:  # the run's labels, size, crop and validation thresholds
        info = run.read_info()
        if args.threshold is None:
            thresholds = run.read_thresholds()["thresholds"]
        return model, list(info["labels"]), Preprocess.from_config(run.read_config().data), thresholds
    labels_file = model_file.parent / "labels.txt"  # an exported bundle has one
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    elif labels_file.exists():
        labels = [x.strip() for x in labels_file.read_text().splitlines() if x.strip()]
    else:
        labels = [f"class{i}" for i in range(int(model.outputs[0].shape[-1]))]
    size = args.image_size or int(model.inputs[0].shape[1])
    return model, labels, Preprocess(size, crop_fundus=not args.no_crop), thresholds


def _split_images(run_dir, split: str) -> list[Path]:
    from kfundus.run import RunFolder

    run = RunFolder(run_dir)
    table = run.read_splits()
    if "image" not in table.columns:
        raise ConfigError(
            f"{run / 'splits.csv'} has no 'image' column: two-eye runs are not supported by Grad-CAM "
            "yet; explain the eyes with --images"
        )
    chosen = table if split == "all" else table[table["split"] == split]
    if chosen.empty:
        raise ConfigError(
            f"--split {split}: {run / 'splits.csv'} has no such rows (its splits: {sorted(set(table['split']))})"
        )
    return [Path(p) for p in chosen["image"]]


def cmd_explain(args) -> int:
    from kfundus.deploy.predict import list_images
    from kfundus.explain import save_overlays

    if not (args.run or args.model) or bool(args.images) == bool(args.split) or (args.split and not args.run):
        raise ConfigError(
            "give --run runs/NAME or --model FILE.keras, and one of --images DIR_OR_GLOB or "
            "--split NAME (--split needs --run)"
        )
    model, labels, preprocess, thresholds = _explain_setup(args)
    paths = (
        [Path(p) for p in list_images(args.images, ["image"])["image"]]
        if args.images
        else _split_images(args.run, args.split)
    )
    classes = "predicted" if args.classes == "predicted" else [c.strip() for c in args.classes.split(",")]
    out = Path(args.out or (Path(args.run) / "explain" if args.run else "explain"))
    table = save_overlays(
        model,
        paths,
        out,
        labels=labels,
        preprocess=preprocess,
        classes=classes,
        threshold=thresholds,
        batch_size=args.batch_size,
        layer=args.layer,
        alpha=args.alpha,
    )
    table.to_csv(out / "overlays.csv", index=False)
    none = len(paths) - table["image"].nunique()
    print(
        f"wrote {len(table)} Grad-CAM overlay(s) for {len(paths)} image(s) to {out} (index: overlays.csv)"
        + (f"; {none} image(s) had no class above the threshold" if none and classes == "predicted" else "")
    )
    return 0


def cmd_predict(args) -> int:
    from kfundus.deploy import predict_images

    predict_images(
        args.bundle,
        args.images,
        backend=args.format,
        tflite=args.tflite,
        batch_size=args.batch_size,
        out=args.out,
        progress=sys.stderr.isatty(),
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM overlays for a folder of images or a run's split")
    add = p.add_argument
    add("--run", help="a run folder (labels, image size, crop and thresholds come from it)")
    add("--model", help="a .keras model (default with --run: <run>/model.keras)")
    add("--images", help="a folder of images or a glob pattern ('data/**/*.jpg')")
    add("--split", help="with --run: explain that split of the run's splits.csv (test, val, train, all)")
    add("--out", help="output folder (default: <run>/explain, or ./explain)")
    add("--classes", default="predicted", help="'predicted' (default) or labels, e.g. G,C")
    add("--labels", help="with --model alone: the output names, e.g. N,G,C (default: labels.txt beside it)")
    add("--image-size", type=int, help="with --model alone: input side (default: the model's)")
    add("--no-crop", action="store_true", help="with --model alone: do not crop the fundus border")
    add("--threshold", type=float, help="decision threshold (default: the run's thresholds, else 0.5)")
    add("--layer", help="convolutional layer (default: the last one, e.g. top_activation)")
    add("--batch-size", type=int, default=16)
    add("--alpha", type=float, default=0.4, help="heat-map weight of the overlay")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("predict", help="images -> CSV of probabilities and decisions, from an exported bundle")
    p.add_argument("--bundle", required=True, help="a folder written by kfundus export (saved_models/NAME)")
    p.add_argument("--images", required=True, help="a folder, a glob pattern (quoted) or a CSV of paths")
    p.add_argument("--format", default="keras", help="which model of the bundle runs: keras, saved_model or tflite")
    p.add_argument(
        "--tflite", help="with --format tflite: float32 (default), float16, dynamic_int8, int8, or a .tflite file"
    )
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_predict)
