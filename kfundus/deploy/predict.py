"""``kfundus predict``: images -> a CSV of probabilities and decisions, from a model bundle.

    kfundus predict --bundle saved_models/NAME --images DIR | "GLOB" | list.csv
                    [--format keras|saved_model|tflite] [--tflite int8] [--out predictions.csv]

Everything comes from the bundle (``kfundus export``): labels, decision thresholds chosen
on validation, preprocessing and input size are read from ``model_card.json``.

Images: a folder (every .jpg/.jpeg/.png/.bmp/.tif/.tiff in it, sorted), a glob, or a CSV.
A single-input model reads a CSV's ``image`` column (or its first column); a two-eye model
reads ``left_image``/``right_image`` (or ``left``/``right``) columns, and pairs a folder's
files by the ODIR names ``<id>_left.*`` / ``<id>_right.*``. Whatever a folder or glob holds
that is not read (another extension, a sub-folder, an image a two-eye model cannot pair)
is printed and listed in the output with status ``ignored: <why>``.

Output, one row per image (or patient): ``id``, the input path(s), ``status`` (``ok``, or
why the row was skipped: missing file, corrupt JPEG, ..., or ignored), then per labelled
output (head), primary first: ``prob_<label>`` and ``pred_<label>`` (1 when the
probability is strictly above the label's threshold, the convention of ``kfundus
evaluate``) for sigmoid heads, or ``prob_<label>`` and ``prediction`` (the arg-max label;
``<head>_prediction`` for a second head) for softmax heads. Every head of a multi-task
model (the dual-stream ``abnormal`` head) has its own thresholds, chosen on validation
(``model_card.json`` → ``thresholds.heads``). Unlabelled outputs (an embedding) follow as
``<output>_<unit>`` columns. Unreadable images are listed, never fatal.

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


IGNORED = "ignored"


def _ignored_reason(path: Path) -> str | None:
    """Why a folder or glob entry is not read as an image (None: it is read)."""
    if path.is_dir():
        return "a folder, not searched (give a glob such as 'DIR/**/*.jpg' to read sub-folders)"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        kind = f"extension {path.suffix}" if path.suffix else "no extension"
        return f"not an image by its extension ({kind}; read: {' '.join(IMAGE_EXTENSIONS)})"
    return None


def list_images(spec, inputs: list[str]) -> pd.DataFrame:
    """A table with an ``id``, one path column per model input and a ``status`` column,
    from a folder, glob or CSV.

    ``status`` is empty for the rows to predict. Entries of a folder or glob that are not
    read are rows too, never dropped silently: ``ignored: <why>`` for files whose extension
    is not an image's (``IMAGE_EXTENSIONS``), sub-folders and, for a two-eye model, images
    not named ``<id>_left`` / ``<id>_right``.

    Raises:
        DataError: a missing CSV, or nothing to predict (the message lists what was ignored).
    """
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        if not path.exists():
            raise DataError(f"--images {spec}: CSV not found")
        return _from_csv(path, inputs).assign(status="")
    if path.is_dir():
        entries, where = sorted(path.iterdir()), f"folder {spec}"
    else:
        entries, where = sorted(Path(f) for f in glob.glob(str(spec), recursive=True)), f"pattern {spec!r}"
    files, ignored = [], []
    for entry in entries:
        reason = _ignored_reason(entry)
        if reason:
            ignored.append((entry, reason))
        else:
            files.append(str(entry))
    if not files:
        seen = (
            f"; it has {len(ignored)} other entr(ies), e.g. {', '.join(p.name for p, _ in ignored[:5])}"
            if ignored
            else ""
        )
        raise DataError(f"--images {where}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found{seen}")
    if len(inputs) == 1:
        table = pd.DataFrame({"id": [Path(f).stem for f in files], inputs[0]: files, "status": ""})
    else:
        table, unpaired = _pair_eyes(files, inputs, where)
        ignored += unpaired
    if ignored:
        rows = pd.DataFrame(
            [
                {
                    "id": entry.stem,
                    **dict.fromkeys(inputs, ""),
                    _eye_column(entry, inputs): str(entry),
                    "status": f"{IGNORED}: {reason}",
                }
                for entry, reason in ignored
            ]
        )
        table = pd.concat([table, rows], ignore_index=True)
    return table


def ignored_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a ``list_images`` table that were not read, and why."""
    return table[table["status"].astype(str).str.startswith(IGNORED)]


def _eye_column(entry: Path, inputs: list[str]) -> str:
    """The path column an ignored entry is listed under (its eye's, for two-eye models)."""
    for name in inputs:
        if entry.stem.lower().endswith("_" + name.removesuffix("_image")):
            return name
    return inputs[0]


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


def _pair_eyes(files, inputs, where) -> tuple[pd.DataFrame, list]:
    """``(table, unpaired)``: files paired by the ODIR names ``<id>_left.*`` / ``<id>_right.*``,
    and the files not so named, with the reason."""
    rows, unpaired = {}, []
    for f in files:
        stem = Path(f).stem
        for eye in ("left", "right"):
            if stem.lower().endswith(f"_{eye}"):
                rows.setdefault(stem[: -len(eye) - 1], {})[f"{eye}_image"] = f
                break
        else:
            unpaired.append((Path(f), "not named <id>_left.* or <id>_right.*, so not paired (a two-eye model)"))
    if not rows:
        raise DataError(
            f"--images {where}: this two-eye model needs files named <id>_left.* and "
            f"<id>_right.*, or a CSV with left_image,right_image columns"
        )
    frame = pd.DataFrame([{"id": k, **v} for k, v in sorted(rows.items())])
    for name in inputs:
        frame[name] = frame.get(name, pd.Series([""] * len(frame))).fillna("")
    return frame[["id", *inputs]].assign(status=""), unpaired


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
    """Encoded bytes -> the model input, exactly as the training cache makes it; bytes that
    cannot be an image get the reason the SavedModel's bytes signature gives
    (``encoded_image_problem``), so every backend reports a bad file the same way."""

    def __init__(self, preprocess):
        import tensorflow as tf

        from kfundus.data.images import encoded_image_problem, preprocess_image

        spec = [tf.TensorSpec((), tf.string)]
        self._problem = tf.function(encoded_image_problem, input_signature=spec)
        self._fn = tf.function(lambda c: tf.round(preprocess_image(c, preprocess)), input_signature=spec)

    def __call__(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        import tensorflow as tf

        from kfundus.data.pipeline import decode_error_message

        problem = self._problem(tf.constant(data)).numpy().decode()
        if problem:
            return None, problem
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

    from kfundus.data.images import Preprocess
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

    ignored = ignored_rows(table)
    if len(ignored):
        shown = ", ".join(Path(p).name for p in ignored[inputs].max(axis=1).head(5))
        print(
            f"ignored {len(ignored)} entr(ies) of --images {images} that are not images to read "
            f"(e.g. {shown}): listed with status '{IGNORED}: <why>' in the output"
        )
    status = [s or None for s in table["status"].astype(str)]
    values: dict[int, dict] = {}
    rows = [i for i in range(len(table)) if status[i] is None]
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

    result = _table(table.drop(columns=["status"]), status, values, card)
    skipped = int((result["status"] != "ok").sum()) - len(ignored)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result.to_csv(out, index=False)
        print(
            f"predicted {len(result) - skipped - len(ignored)} of {len(result) - len(ignored)} row(s) with {backend}"
            + (f"; {skipped} skipped (reasons in the status column)" if skipped else "")
            + (f"; {len(ignored)} ignored file(s) listed" if len(ignored) else "")
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
    """The output table: the listed rows, their status and, per labelled output (head), its
    probabilities and decisions (``kfundus.evaluation.predict.decision_columns``, the
    columns ``predictions.csv`` of ``kfundus evaluate`` has)."""
    from kfundus.evaluation.predict import decision_columns

    result = table.copy()
    result["status"] = status
    labels = card["labels"]
    outputs = [o["name"] for o in card["outputs"]]
    primary = card.get("primary_output") or (outputs[0] if len(outputs) == 1 else "probabilities")
    primary_labels = labels[primary] if isinstance(labels, dict) else labels
    rules = card["thresholds"].get("heads") or {}
    chosen = dict(zip(card["thresholds"]["labels"], card["thresholds"]["values"]))
    ok = [i for i in range(len(result)) if i in values]
    order = [primary] + [name for name in outputs if name != primary]
    frames, taken = [result], {str(x) for x in primary_labels}
    for name in order:
        if name not in outputs:
            continue
        width = next(o["shape"][-1] for o in card["outputs"] if o["name"] == name)
        matrix = np.full((len(result), width), np.nan, dtype=np.float64)
        for i in ok:
            matrix[i] = values[i][name]
        if name == primary:
            task = card.get("task")
            cut = None if task == "multiclass" else [chosen.get(str(label), 0.5) for label in primary_labels]
            frames.append(decision_columns(matrix, primary_labels, task, cut))
        elif name in rules:  # another head of a multi-task model, with its rule chosen on validation
            rule = rules[name]
            names = [str(x) for x in rule["labels"]]
            prefix = f"{name}_" if taken & set(names) else ""
            taken |= set(names)
            frames.append(
                decision_columns(
                    matrix, names, rule["task"], rule.get("thresholds"), prefix=prefix, prediction=f"{name}_prediction"
                )
            )
        else:  # unlabelled outputs (an embedding), or a head of a bundle exported without its rule
            names = labels.get(name) if isinstance(labels, dict) else None
            frames.append(pd.DataFrame({f"{name}_{names[k] if names else k}": matrix[:, k] for k in range(width)}))
    return pd.concat(frames, axis=1)
