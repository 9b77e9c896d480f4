"""Patient-level splits: a patient's images never land in two splits.

Both eyes of a patient share the patient's anatomy, camera session and often the disease;
an eye in training and the other in test leaks. Every function here groups rows by
``patient_id`` and stratifies on the patient's label combination (the OR of its rows'
labels), so each split keeps the label proportions of the whole.

How patients are assigned (deterministic for a seed): patients are sorted by stratum (their
label combination; combinations with too few patients to spread over the splits are merged
into one "rare" stratum) and shuffled inside it; then systematic sampling with a random
offset takes every ``1/fraction``-th patient for test, and likewise for val among the rest.
Every stratum, and every run of consecutive patients, gets the floor or the ceiling of its
share, and the totals hit the requested fractions to within one patient. Fractions count
patients, not images.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from kfundus import labels as kl
from kfundus.data.manifest import Manifest, concat_skipped, skipped_rows
from kfundus.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "eval": "val",
    "evaluation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def _patient_ids(manifest: Manifest) -> pd.Series:
    if "patient_id" not in manifest.frame.columns:
        raise DataError(
            f"the {manifest.name or 'dataset'} manifest has no patient_id column, so a split cannot keep a "
            "patient's images together: name the table's patient column with --set data.options.patient_column=NAME"
        )
    return manifest.frame["patient_id"].astype(str).reset_index(drop=True)


def _patient_strata(manifest: Manifest, pids: pd.Series, min_size: int) -> pd.Series:
    """Per patient (index, in first-appearance order): its label-combination stratum."""
    y = pd.DataFrame(manifest.targets() > 0.5).groupby(pids.to_numpy(), sort=False).max()
    keys = pd.Series(["".join("1" if v else "0" for v in row) for row in y.to_numpy()], index=y.index)
    sizes = keys.map(keys.value_counts())
    return keys.where(sizes >= min_size, "rare")


def _ordered_patients(strata: pd.Series, rng: np.random.Generator) -> np.ndarray:
    """Patients sorted by stratum, in random order inside each stratum."""
    order = np.lexsort((rng.permutation(len(strata)), strata.to_numpy().astype(str)))
    return strata.index.to_numpy()[order]


def _systematic(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A mask picking ``floor(n * fraction + u)`` of ``n`` positions, evenly spread."""
    u = rng.random()
    i = np.arange(n)
    return np.floor((i + 1) * fraction + u) - np.floor(i * fraction + u) > 0


def _assign(manifest: Manifest, pids: pd.Series, test: float, val: float, seed: int) -> dict:
    """patient -> "train" / "val" / "test", stratified (fractions of these patients)."""
    smallest = min(f for f in (test, val, 0.5) if f > 0)
    strata = _patient_strata(manifest, pids, max(2, math.ceil(1 / smallest)))
    rng = np.random.default_rng(seed)
    patients = _ordered_patients(strata, rng)
    split = np.full(len(patients), "train", dtype=object)
    if test > 0:
        split[_systematic(len(patients), test, rng)] = "test"
    if val > 0:
        rest = np.flatnonzero(split == "train")
        split[rest[_systematic(len(rest), val / (1 - test), rng)]] = "val"
    return dict(zip(patients, split))


def _official(manifest: Manifest) -> pd.Series:
    raw = manifest.frame["split"].astype(str).str.strip().str.lower().reset_index(drop=True)
    split = raw.map(SPLIT_ALIASES)
    if split.isna().any():
        i = int(np.flatnonzero(split.isna().to_numpy())[0])
        where = manifest.where(i) or f"row {i} ({manifest.frame[manifest.image_columns[0]].iloc[i]})"
        raise DataError(
            f"{where} of the {manifest.name or 'dataset'} manifest has split {raw.iloc[i]!r}; the split column takes "
            f"{sorted(set(SPLIT_ALIASES))}. Fix the column, or ignore it with --set data.split.official=false"
        )
    return split


def _by_split(manifest: Manifest, split: pd.Series) -> dict[str, Manifest]:
    return {s: manifest.subset((split == s).to_numpy()) for s in SPLITS if (split == s).any()}


def split_patients(manifest: Manifest, *, val=0.15, test=0.15, seed=0, use_official=True) -> dict[str, Manifest]:
    """Split a dataset into train / val / test by patient, stratified on labels.

    Args:
        manifest: eye- or patient-level rows with a ``patient_id`` column.
        val, test: fractions of patients; ``0`` means no such split (its key is absent).
        seed: the seed; the same seed gives the same split.
        use_official: if the manifest has a ``split`` column (an official split of the
            source, e.g. RFMiD), use it. Official splits are kept as given; a split the
            source lacks is carved out of the official train part by patient, ``val`` and
            ``test`` then being fractions of that part (e.g. train/test only: val is
            ``val`` of the official train patients).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``, only the splits that have rows.
        A requested split left empty (a tiny dataset) is warned about.
    """
    for name, fraction in (("val", val), ("test", test)):
        if not 0 <= fraction < 1:
            raise ConfigError(
                f"data.split.{name}={fraction} must be a fraction in [0, 1) (e.g. --set data.split.{name}=0.15)"
            )
    if val + test >= 1:
        raise ConfigError(
            f"data.split.val + data.split.test = {val + test} leaves no training patients; make them sum below 1 "
            "(e.g. --set data.split.test=0.15)"
        )
    pids = _patient_ids(manifest)
    if use_official and "split" in manifest.frame.columns:
        split = _official(manifest)
        check_patient_disjoint(_by_split(manifest, split))
        present = set(split)
        if "train" not in present:
            raise DataError(
                f"the official split column of {manifest.name or 'the dataset'} has no train rows "
                f"(only {sorted(present)}): split it anew with --set data.split.official=false"
            )
        carve_test = test if "test" not in present else 0.0
        carve_val = val if "val" not in present else 0.0
        if carve_test or carve_val:
            train = (split == "train").to_numpy()
            assign = _assign(manifest.subset(train), pids[train].reset_index(drop=True), carve_test, carve_val, seed)
            split = split.copy()
            split[train] = pids[train].map(assign).to_numpy()
    else:
        split = pids.map(_assign(manifest, pids, test, val, seed))
    out = _by_split(manifest, split)
    for name, fraction in (("val", val), ("test", test)):
        if fraction > 0 and name not in out:
            warnings.warn(
                f"the {name} split is empty ({pids.nunique()} patients are too few for {name}={fraction})", stacklevel=2
            )
    check_patient_disjoint(out)
    return out


def kfold(manifest: Manifest, k=5, *, seed=0) -> list[tuple[Manifest, Manifest]]:
    """Patient-grouped, label-stratified k-fold cross-validation.

    Every patient is in the validation part of exactly one fold; fold sizes differ by at
    most one patient (plus one per stratum). Any ``split`` column is ignored: pass the
    part to cross-validate (e.g. ``split_patients(m, test=0.15, val=0)["train"]``).

    Returns:
        ``k`` pairs ``(train, val)``.
    """
    if k < 2:
        raise ConfigError(f"transfer.folds={k}: k-fold needs at least 2 folds (e.g. --set transfer.folds=5)")
    pids = _patient_ids(manifest)
    if pids.nunique() < k:
        raise DataError(f"{pids.nunique()} patients cannot fill {k} folds: lower --set transfer.folds=N")
    rng = np.random.default_rng(seed)
    patients = _ordered_patients(_patient_strata(manifest, pids, k), rng)
    fold_of = dict(zip(patients, (np.arange(len(patients)) + rng.integers(k)) % k))
    folds = pids.map(fold_of).to_numpy()
    return [(manifest.subset(folds != f), manifest.subset(folds == f)) for f in range(k)]


def check_patient_disjoint(splits: dict[str, Manifest]) -> None:
    """Raise :class:`DataError` if a patient is in two splits (naming one such patient and
    the two splits). Guards user-provided split columns."""
    seen: dict[str, set] = {}
    for name, manifest in splits.items():
        if manifest is None or len(manifest) == 0:
            continue
        patients = set(_patient_ids(manifest))
        for other, other_patients in seen.items():
            shared = patients & other_patients
            if shared:
                patient = sorted(shared)[0]
                rows = []
                for m in (splits[other], manifest):
                    i = int(np.flatnonzero(_patient_ids(m).to_numpy() == patient)[0])
                    rows.append(m.where(i) or str(m.frame[m.image_columns[0]].iloc[i]))
                raise DataError(
                    f"patient {patient!r} is in both the {other!r} and the {name!r} split ({rows[0]}; {rows[1]}; "
                    f"{len(shared)} patient(s) are shared): a patient's images must stay in one split, or "
                    "evaluation leaks. Fix the split column so every patient has one split, or split anew "
                    "with --set data.split.official=false."
                )
        seen[name] = patients


def to_patients(manifest: Manifest) -> Manifest:
    """Eye rows -> one row per patient with ``left_image`` and ``right_image``.

    Patient labels are the ``patient_<label>`` columns when every label has one (ODIR's
    official labels), else the OR of the two eyes (ODIR labels: ``N`` only when neither
    eye has a disease; ``"multiclass"``: the higher class, the worse eye for DR grades,
    and ``grade`` their maximum). Other columns equal for both
    eyes stay one column; the rest become ``left_<col>`` / ``right_<col>``; ``text`` is the
    left text followed by the right one. A patient missing an eye is warned about, dropped
    and listed in ``skipped``; a patient with two images of one eye stops with an error.
    """
    if manifest.level == "patient":
        return manifest
    frame = manifest.frame.reset_index(drop=True)
    if "eye" not in frame.columns:
        raise DataError("to_patients needs an eye column (left/right)")
    eye = frame["eye"].astype(str).str.lower()
    bad = np.flatnonzero(~eye.isin(["left", "right"]).to_numpy())
    if len(bad):
        raise DataError(
            f"{manifest.where(int(bad[0])) or frame['image'].iloc[bad[0]]} (patient "
            f"{frame['patient_id'].iloc[bad[0]]!r}) has eye "
            f"{frame['eye'].iloc[bad[0]]!r}: patient-level rows need left or right on every row "
            f"({len(bad)} row(s) lack it)"
        )
    key = frame["patient_id"].astype(str)
    dup = pd.Series(list(zip(key, eye))).duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(
            f"patient {key.iloc[i]!r} has two {eye.iloc[i]} images ({manifest.where(i) or frame['image'].iloc[i]} is "
            "the second): "
            "patient-level rows need one image per eye; remove the extra rows"
        )
    left = frame[eye == "left"].set_index(key[eye == "left"])
    right = frame[eye == "right"].set_index(key[eye == "right"])
    both = [p for p in dict.fromkeys(key) if p in left.index and p in right.index]
    lone = frame[~key.isin(both)]
    if len(lone):
        warnings.warn(
            f"{len(lone)} patient(s) have one eye only and were dropped, e.g. "
            f"{lone['patient_id'].astype(str).tolist()[:5]}",
            stacklevel=2,
        )
    left, right = left.loc[both], right.loc[both]
    out = pd.DataFrame(
        {"patient_id": both, "left_image": left["image"].to_numpy(), "right_image": right["image"].to_numpy()}
    )
    labels = manifest.labels
    patient_cols = [f"patient_{c}" for c in labels]
    if all(c in frame.columns for c in patient_cols):
        y = left[patient_cols].to_numpy()
    elif manifest.task == "multiclass":
        worse = np.maximum(left[labels].to_numpy().argmax(1), right[labels].to_numpy().argmax(1))
        y = np.eye(len(labels), dtype="int64")[worse]
    else:
        y = np.maximum(left[labels].to_numpy(), right[labels].to_numpy())
        if list(labels) == kl.ODIR_LABELS:  # N only when neither eye has a disease
            y[:, 0] = y[:, 0] * (y[:, 1:].max(axis=1) == 0)
    for j, c in enumerate(labels):
        out[c] = y[:, j]
    for c in frame.columns:
        if c in ("image", "eye", "patient_id", *labels, *patient_cols):
            continue
        a, b = left[c].reset_index(drop=True), right[c].reset_index(drop=True)
        if c == "text":
            out[c] = (a.astype(str) + " " + b.astype(str)).to_numpy()
        elif ((a == b) | (a.isna() & b.isna())).all():
            out[c] = a.to_numpy()
        else:
            out[f"left_{c}"], out[f"right_{c}"] = a.to_numpy(), b.to_numpy()
            if c == "grade":
                out[c] = np.maximum(a.to_numpy(), b.to_numpy())
    rows = lone["source_row"] if "source_row" in lone.columns else [None] * len(lone)
    skipped = skipped_rows(rows, lone["image"], "other_eye_missing", "the patient's other eye is missing")
    skipped = concat_skipped(manifest.skipped, skipped)
    return Manifest(out, list(labels), manifest.task, manifest.name, skipped, source=manifest.source)


def to_eyes(manifest: Manifest) -> Manifest:
    """Patient rows -> two eye rows per patient (``image``, ``eye``), the reverse of
    :func:`to_patients`. ``left_<col>`` / ``right_<col>`` columns become ``<col>`` of that
    eye, other columns are copied; the labels are the patient's (also kept as
    ``patient_<label>``): for per-eye truth read the source at eye level instead."""
    if manifest.level == "eye":
        return manifest
    frame = manifest.frame.reset_index(drop=True)
    parts = []
    for side in ("left", "right"):
        part = pd.DataFrame(
            {"patient_id": frame["patient_id"].to_numpy(), "image": frame[f"{side}_image"].to_numpy(), "eye": side}
        )
        shared = [c for c in frame.columns if not c.startswith(("left_", "right_", "patient_id"))]
        own = [c for c in frame.columns if c.startswith(f"{side}_") and c != f"{side}_image"]
        for c in shared + own:  # an eye's own column wins over a shared one of that name
            part[c.removeprefix(f"{side}_")] = frame[c].to_numpy()
        for c in manifest.labels:
            if f"patient_{c}" not in part.columns:
                part[f"patient_{c}"] = frame[c].to_numpy()
        part["_order"] = np.arange(len(frame))
        parts.append(part)
    out = pd.concat(parts, ignore_index=True).sort_values(["_order", "eye"], kind="stable")
    out = out.drop(columns="_order").reset_index(drop=True)
    return Manifest(out, list(manifest.labels), manifest.task, manifest.name, manifest.skipped, source=manifest.source)
