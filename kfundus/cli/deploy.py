"""Commands that use a trained model: explain (Grad-CAM overlays, per eye for two-eye runs,
and localisation on lesion masks) and predict (a bundle on images)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from kfundus.errors import ConfigError


def _explain_setup(args):
    """(model, labels, preprocess, thresholds, run) from --run and/or --model; a multi-task
    model is reduced to its primary head (the run's labels)."""
    from kfundus.data.images import Preprocess
    from kfundus.run import RunFolder
    from kfundus.systems import load_model
    from kfundus.systems.dual_stream.objective import primary_model

    run = RunFolder(args.run).require_finished("explain") if args.run else None
    model_file = Path(args.model) if args.model else run.model_file
    if not model_file.exists():
        raise ConfigError(f"no model file {model_file}: give --model path/to/model.keras or --run runs/NAME")
    model = load_model(model_file)
    thresholds = 0.5 if args.threshold is None else args.threshold
    if run is not None:  # the run's labels, size, crop and validation thresholds
        info = run.read_info()
        chosen = run.read_thresholds()
        if args.threshold is None:
            thresholds = chosen["thresholds"]
        model = primary_model(model, chosen.get("primary_output"))
        return model, list(info["labels"]), Preprocess.from_config(run.read_config().data), thresholds, run
    labels_file = model_file.parent / "labels.txt"  # an exported bundle has one
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    elif labels_file.exists():
        labels = [x.strip() for x in labels_file.read_text().splitlines() if x.strip()]
    else:
        labels = [f"class{i}" for i in range(int(model.outputs[0].shape[-1]))]
    size = args.image_size or int(model.inputs[0].shape[1])
    return model, labels, Preprocess(size, crop_fundus=not args.no_crop), thresholds, None


def _split_images(run, split: str, inputs: list[str]):
    """The rows of a run's split as a table of paths by model input (and ``id``)."""
    table = run.read_splits()
    missing = [n for n in inputs if n not in table.columns]
    if missing:
        raise ConfigError(f"{run / 'splits.csv'} has no column(s) {missing} for the model's inputs {inputs}")
    chosen = table if split == "all" else table[table["split"] == split]
    if chosen.empty:
        raise ConfigError(
            f"--split {split}: {run / 'splits.csv'} has no such rows (its splits: {sorted(set(table['split']))})"
        )
    ids = chosen["patient_id"].astype(str) if "patient_id" in chosen else chosen[inputs[0]].map(lambda p: Path(p).stem)
    return pd.DataFrame({"id": ids.to_numpy(), **{n: chosen[n].to_numpy() for n in inputs}})


def _masks_folder(args, run, table, inputs):
    """The synthetic dataset whose masks/ localisation reads: --masks, or the run's data
    folder when it has masks/ and the explained images lie in it (None: no localisation)."""
    from kfundus.explain.saliency import has_mask, mask_dataset

    if args.masks:
        folder = mask_dataset(args.masks)
        if folder is None:
            raise ConfigError(
                f"--masks {args.masks}: no masks/ folder there; give the dataset folder that `kfundus synth` "
                "wrote with its masks (masks/<image>.npz)"
            )
        if not any(has_mask(folder, p) for n in inputs for p in table[n] if p):
            raise ConfigError(
                f"--masks {args.masks}: none of the {len(table)} explained image(s) has a mask there "
                f"(masks/<its path under {folder}>.npz); explain that dataset's own images "
                f"(--images {folder / 'images'})"
            )
        return folder
    if run is None or not run.read_info().get("data_root"):
        return None
    folder = mask_dataset(run.read_info()["data_root"])
    if folder is None or not any(has_mask(folder, p) for n in inputs for p in table[n] if p):
        return None
    return folder


def cmd_explain(args) -> int:
    from kfundus.deploy.predict import ignored_rows, list_images
    from kfundus.explain import save_overlays

    if not (args.run or args.model) or bool(args.images) == bool(args.split) or (args.split and not args.run):
        raise ConfigError(
            "give --run runs/NAME or --model FILE.keras, and one of --images DIR_OR_GLOB or "
            "--split NAME (--split needs --run)"
        )
    model, labels, preprocess, thresholds, run = _explain_setup(args)
    inputs = [t.name for t in model.inputs]
    if args.images:
        table = list_images(args.images, inputs)
        ignored = ignored_rows(table)
        if len(ignored):
            print(f"ignored {len(ignored)} entr(ies) of --images that are not images to read:")
            for row in ignored.itertuples(index=False):
                print(f"  {max(str(getattr(row, n)) for n in inputs) or row.id}: {row.status}")
        table = table[table["status"] == ""].drop(columns=["status"])
    else:
        table = _split_images(run, args.split, inputs)
    folder = _masks_folder(args, run, table, inputs)  # checked before any overlay is drawn
    classes = "predicted" if args.classes == "predicted" else [c.strip() for c in args.classes.split(",")]
    out = Path(args.out or (Path(args.run) / "explain" if args.run else "explain"))
    overlays = save_overlays(
        model,
        table if len(inputs) > 1 else table[inputs[0]].tolist(),
        out,
        labels=labels,
        preprocess=preprocess,
        classes=classes,
        threshold=thresholds,
        batch_size=args.batch_size,
        layer=args.layer,
        alpha=args.alpha,
    )
    overlays.to_csv(out / "overlays.csv", index=False)
    what = "patient(s), one map per eye" if len(inputs) > 1 else "image(s)"
    none = len(table) - (overlays["image"].nunique() // len(inputs))
    print(
        f"wrote {len(overlays)} Grad-CAM overlay(s) for {len(table)} {what} to {out} (index: overlays.csv)"
        + (f"; {none} had no class above the threshold" if none and classes == "predicted" else "")
    )
    if folder is not None:
        _localisation(args, model, labels, preprocess, thresholds, table, inputs, folder, classes, out)
    return 0


def _localisation(args, model, labels, preprocess, thresholds, table, inputs, folder, classes, out) -> None:
    """Energy ratio and pointing game of the maps on the lesion masks: localisation.csv/.png."""
    from kfundus.explain.saliency import localisation_report, plot_localisation

    measured = None if classes == "predicted" else [labels[int(c)] if c.isdigit() else c for c in classes]
    report = localisation_report(
        model,
        folder,
        labels,
        preprocess,
        classes=measured,
        images=table if len(inputs) > 1 else table[inputs[0]].tolist(),
        layer=args.layer,
        tolerance=args.tolerance,
        threshold=thresholds,
        batch_size=args.batch_size,
    )
    report.to_csv(out / "localisation.csv", index=False)
    plot_localisation(report, out / "localisation.png")
    print(
        f"localisation on the lesion masks of {folder} (every image with the lesion, predicted or not; "
        f"pointing-game tolerance {args.tolerance} px): {out / 'localisation.csv'}, {out / 'localisation.png'}"
    )
    print(report.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


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
    add(
        "--masks",
        help="a synthetic dataset folder with masks/ (or that masks/ folder): also measure localisation "
        "(energy ratio, pointing game) into localisation.csv/.png; default with --run: the run's data "
        "folder when it has masks/",
    )
    add("--tolerance", type=int, default=0, help="pointing-game tolerance in pixels (default 0: the pixel itself)")
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
