"""``kfundus predict``: images -> a CSV of probabilities and decisions, from a model bundle.

    kfundus predict --bundle saved_models/NAME --images DIR | "GLOB" | list.csv
                    [--format keras|saved_model|tflite] [--tflite int8] [--out predictions.csv]

Everything comes from the bundle (``kfundus export``): labels, decision thresholds chosen
on validation, preprocessing and input size are read from ``model_card.json``.

Images: a folder (every .jpg/.jpeg/.png/.bmp/.tif/.tiff in it, sorted), a glob, or a CSV.
A single-input model reads a CSV's ``image`` column (or its first column); a two-eye model
reads ``left_image``/``right_image`` (or ``left``/``right``) columns, and pairs a folder's
files by the ODIR names ``<id>_left.*`` / ``<id>_right.*``.

Output, one row per image (or patient): ``id``, the input path(s), ``status`` (``ok``, or
why the row was skipped: missing file, corrupt JPEG, ...), ``prob_<label>`` and
``pred_<label>`` (1 when the probability reaches the label's threshold) for sigmoid
outputs, or ``prediction`` (the arg-max label) for a softmax output. Other named outputs
of multi-task models follow as ``<output>_<unit>`` columns. Unreadable images are listed,
never fatal.

Backends: ``keras`` (``model.keras``), ``saved_model`` (its ``serving_default`` signature
on the encoded bytes: preprocessing runs inside the graph) and ``tflite`` (any of the
bundle's ``.tflite`` files, with ``ai_edge_litert``'s interpreter when installed).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kfundus.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
BACKENDS = ("keras", "saved_model", "tflite")


# ---------------------------------------------------------------------------
# which images


def list_images(spec, inputs: list[str]) -> pd.DataFrame:
    """A table with an ``id`` and one path column per model input, from a folder, glob or CSV."""
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        if not path.exists():
            raise DataError(f"--images {spec}: CSV not found")
        return _from_csv(path, inputs)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        where = f"folder {spec}"
    else:
        files = sorted(f for f in glob.glob(str(spec), recursive=True) if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        where = f"pattern {spec!r}"
    if not files:
        raise DataError(f"--images {where}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    if len(inputs) == 1:
        return pd.DataFrame({"id": [Path(f).stem for f in files], inputs[0]: files})
    return _pair_eyes(files, inputs, where)


def _from_csv(path: Path, inputs: list[str]) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str)
    columns = {}
    for name in inputs:
        short = name.removesuffix("_image")
        found = next((c for c in (name, short, f"{short}_path") if c in table), None)
        if found is None and len(inputs) == 1:
            found = table.columns[0]
        if found is None:
            raise DataError(
                f"{path}: no column for model input {name!r}; name it {name!r} or {short!r} "
                f"(columns: {list(table.columns)})"
            )
        columns[name] = table[found].fillna("").astype(str)
    frame = pd.DataFrame(columns)
    base = path.parent
    for name in inputs:  # relative paths are relative to the CSV
        frame[name] = [p if not p or os.path.isabs(p) else str(base / p) for p in frame[name]]
    ids = table["id"] if "id" in table else frame[inputs[0]].map(lambda p: Path(p).stem)
    frame.insert(0, "id", ids.astype(str).to_numpy())
    return frame


def _pair_eyes(files, inputs, where) -> pd.DataFrame:
    rows = {}
    for f in files:
        stem = Path(f).stem
        for eye in ("left", "right"):
            if stem.lower().endswith(f"_{eye}"):
                rows.setdefault(stem[: -len(eye) - 1], {})[f"{eye}_image"] = f
    if not rows:
        raise DataError(
            f"--images {where}: this two-eye model needs files named <id>_left.* and "
            f"<id>_right.*, or a CSV with left_image,right_image columns"
        )
    frame = pd.DataFrame([{"id": k, **v} for k, v in sorted(rows.items())])
    for name in inputs:
        frame[name] = frame.get(name, pd.Series([""] * len(frame))).fillna("")
    return frame[["id", *inputs]]


# ---------------------------------------------------------------------------
# reading and preprocessing, with reasons


def _read(path: str) -> tuple[bytes | None, str | None]:
    if not path:
        return None, "no file given for this eye"
    if not os.path.exists(path):
        return None, "file not found"
    data = Path(path).read_bytes()
    return (data, None) if data else (None, "empty file")


class _Preprocessor:
    """Encoded bytes -> the model input, exactly as the training cache makes it."""

    def __init__(self, preprocess):
        import tensorflow as tf

        from kfundus.data.pipeline import preprocess_image

        self._fn = tf.function(
            lambda c: tf.round(preprocess_image(c, preprocess)), input_signature=[tf.TensorSpec((), tf.string)]
        )

    def __call__(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        import tensorflow as tf

        from kfundus.data.pipeline import decode_error_message

        try:
            return self._fn(tf.constant(data)).numpy(), None
        except tf.errors.OpError as err:
            return None, decode_error_message(err)


# ---------------------------------------------------------------------------
# backends: each returns {output: array} for a batch


def _keras_runner(bundle: Path, inputs: list[str]):
    from kfundus.systems import load_model

    model = load_model(bundle / "model.keras")

    def run(batch: dict) -> dict:
        out = model.predict(batch if len(inputs) > 1 else batch[inputs[0]], verbose=0)
        if isinstance(out, dict):
            return {k: np.asarray(v) for k, v in out.items()}
        return {model.output_names[0]: np.asarray(out)}

    return run


def _tflite_file(bundle: Path, card: dict, choice: str | None) -> Path:
    from kfundus.deploy.tflite import TFLITE_FILES

    choice = choice or "float32"
    if choice in TFLITE_FILES:
        path = bundle / TFLITE_FILES[choice]
    else:
        path = Path(choice) if os.path.isabs(choice) else bundle / choice
    if not path.exists():
        present = sorted(p.name for p in bundle.glob("*.tflite"))
        raise ConfigError(
            f"--tflite {choice}: {path} not found; the bundle has {present or 'no .tflite files'}"
            f" (variants: {', '.join(TFLITE_FILES)})"
        )
    return path


def _tflite_runner(path: Path):
    from kfundus.deploy.tflite import run_tflite

    return lambda batch: run_tflite(path, batch)


# ---------------------------------------------------------------------------
# the command


def predict_images(
    bundle,
    images,
    *,
    backend: str = "keras",
    tflite: str | None = None,
    batch_size: int = 16,
    out=None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run a bundle on images; return (and write to ``out``) the predictions table.

    Args:
        bundle: a folder written by ``kfundus export``.
        images: a folder, a glob pattern or a CSV (see the module docstring).
        backend: ``keras``, ``saved_model`` or ``tflite``.
        tflite: with ``backend="tflite"``: a variant (``float32``, ``float16``,
            ``dynamic_int8``, ``int8``) or a ``.tflite`` file name/path.
        batch_size: images per model call.
        out: CSV path to write (None: not written).
    """
    from tqdm.auto import tqdm

    from kfundus.data.pipeline import Preprocess
    from kfundus.deploy.bundle import read_card

    if backend not in BACKENDS:
        raise ConfigError(f"--format {backend!r}: choose one of {', '.join(BACKENDS)}")
    bundle = Path(bundle)
    card = read_card(bundle)
    inputs = [i["name"] for i in card["inputs"]]
    table = list_images(images, inputs)
    pre = card["preprocessing"]
    preprocess = Preprocess(
        image_size=pre["image_size"], crop_fundus=pre["crop_fundus"], fov_threshold=pre["fov_threshold"]
    )
    if backend == "saved_model":
        runner, prepare = _saved_model_runner(bundle, inputs), None
    else:
        runner = (
            _keras_runner(bundle, inputs) if backend == "keras" else _tflite_runner(_tflite_file(bundle, card, tflite))
        )
        prepare = _Preprocessor(preprocess)

    status = [None] * len(table)
    values: dict[int, dict] = {}
    rows = list(range(len(table)))
    bar = tqdm(total=len(rows), desc=f"predicting ({backend})", unit="img", disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        chunk, feed = [], {name: [] for name in inputs}
        for i in rows[start : start + batch_size]:
            items = []
            for name in inputs:
                data, reason = _read(table[name].iloc[i])
                if data is not None and prepare is not None:
                    data, reason = prepare(data)
                if reason:
                    status[i] = f"skipped: {Path(table[name].iloc[i]).name or name}: {reason}"
                    break
                items.append(data)
            else:
                chunk.append(i)
                for name, item in zip(inputs, items):
                    feed[name].append(item)
        if chunk:
            if prepare is not None:
                batch_out = runner({k: np.stack(v).astype("float32") for k, v in feed.items()})
            else:
                batch_out, failed = runner(feed)
                for j in failed:  # the graph does not say which eye of a pair failed: name both
                    files = " / ".join(Path(table[name].iloc[chunk[j]]).name for name in inputs)
                    status[chunk[j]] = f"skipped: {files}: {failed[j]}"
                chunk = [c for j, c in enumerate(chunk) if j not in failed]
            for j, i in enumerate(chunk):
                values[i] = {k: v[j] for k, v in batch_out.items()}
                status[i] = "ok"
        bar.update(len(rows[start : start + batch_size]))
    bar.close()

    result = _table(table, status, values, card)
    skipped = int((result["status"] != "ok").sum())
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result.to_csv(out, index=False)
        print(
            f"predicted {len(result) - skipped} of {len(result)} row(s) with {backend}"
            + (f"; {skipped} skipped (reasons in the status column)" if skipped else "")
            + f": {out}"
        )
    return result


def _saved_model_runner(bundle: Path, inputs: list[str]):
    """The bytes signature; a batch that fails is retried item by item to name the bad file."""
    import tensorflow as tf

    from kfundus.data.pipeline import decode_error_message

    signature = tf.saved_model.load(str(bundle / "saved_model")).signatures["serving_default"]

    def call(feed):
        args = {f"{name}_bytes": tf.constant(np.array(feed[name], dtype=object), dtype=tf.string) for name in inputs}
        out = signature(**args)
        return {k: v.numpy() for k, v in out.items() if not k.startswith("labels")}

    def run(feed):
        try:
            return call(feed), {}
        except tf.errors.OpError:
            pass
        n = len(feed[inputs[0]])
        good, failed, outs = [], {}, []
        for j in range(n):
            try:
                outs.append(call({k: v[j : j + 1] for k, v in feed.items()}))
                good.append(j)
            except tf.errors.OpError as err:
                failed[j] = decode_error_message(err)
        merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}
        return merged, failed

    return run


def _table(table: pd.DataFrame, status, values: dict, card: dict) -> pd.DataFrame:
    result = table.copy()
    result["status"] = status
    labels = card["labels"]
    primary = card.get("primary_output")
    thresholds = dict(zip(card["thresholds"]["labels"], card["thresholds"]["values"]))
    outputs = [o["name"] for o in card["outputs"]]
    primary = primary or (outputs[0] if len(outputs) == 1 else "probabilities")
    primary_labels = labels[primary] if isinstance(labels, dict) else labels
    softmax = card.get("task") == "multiclass"
    ok = [i for i in range(len(result)) if i in values]
    for name in outputs:
        width = next(o["shape"][-1] for o in card["outputs"] if o["name"] == name)
        matrix = np.full((len(result), width), np.nan, dtype=np.float64)
        for i in ok:
            matrix[i] = values[i][name]
        if name == primary:
            for k, label in enumerate(primary_labels):
                result[f"prob_{label}"] = matrix[:, k]
            if softmax:
                best = np.nanargmax(np.where(np.isnan(matrix), -1, matrix), axis=1)
                result["prediction"] = [primary_labels[b] if i in values else "" for i, b in enumerate(best)]
            else:
                for k, label in enumerate(primary_labels):
                    decided = (matrix[:, k] >= thresholds.get(label, 0.5)).astype(float)
                    result[f"pred_{label}"] = pd.array(np.where(np.isnan(matrix[:, k]), np.nan, decided), dtype="Int64")
        else:
            names = labels.get(name) if isinstance(labels, dict) else None
            for k in range(width):
                result[f"{name}_{names[k] if names else k}"] = matrix[:, k]
    return result
