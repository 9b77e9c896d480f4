"""Patient-level splits: no patient in two splits, stratified, deterministic; k-fold;
eye rows <-> patient rows."""

import warnings

import numpy as np
import pandas as pd
import pytest

from kfundus import labels as kl
from kfundus.data import readers as sources
from kfundus.data.manifest import Manifest
from kfundus.data.splits import check_patient_disjoint, kfold, split_patients, to_eyes, to_patients
from kfundus.errors import ConfigError, DataError


def _odir(folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sources.read_odir(folder / "annotation.csv", **kwargs)


def _patients(manifest):
    return set(manifest.frame["patient_id"])


def _toy(n_patients=40, seed=0, split=None):
    """Two eyes per patient, labels a (30 %) and b (20 %) per patient."""
    rng = np.random.default_rng(seed)
    a = (rng.random(n_patients) < 0.3).astype(int)
    b = (rng.random(n_patients) < 0.2).astype(int)
    frame = pd.DataFrame(
        {
            "patient_id": np.repeat([f"p{i}" for i in range(n_patients)], 2),
            "image": [f"/x/{i}_{e}.png" for i in range(n_patients) for e in ("left", "right")],
            "eye": ["left", "right"] * n_patients,
            "a": np.repeat(a, 2),
            "b": np.repeat(b, 2),
        }
    )
    if split is not None:
        frame["split"] = np.repeat(split, 2)
    return Manifest(frame, ["a", "b"])


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_odir_eye_rows_never_share_a_patient_across_splits(odir_sample, seed):
    m = _odir(odir_sample)
    splits = split_patients(m, val=0.15, test=0.15, seed=seed)
    assert set(splits) == {"train", "val", "test"}
    sets = {k: _patients(v) for k, v in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    # nothing lost or repeated, and both eyes of every patient travel together
    images = sorted(i for v in splits.values() for i in v.frame["image"])
    assert images == sorted(m.frame["image"])
    for v in splits.values():
        assert (v.frame.groupby("patient_id").size() == 2).all()
    n = m.frame["patient_id"].nunique()
    for name in ("val", "test"):
        assert abs(len(sets[name]) - 0.15 * n) <= 1


def test_odir_split_keeps_label_proportions(odir_sample):
    m = _odir(odir_sample)
    patient_cols = ["patient_N", "patient_G", "patient_C"]
    overall = m.frame[patient_cols].mean()
    eye_overall = m.frame[["N", "G", "C"]].mean()
    for seed in range(4):
        for part in split_patients(m, seed=seed).values():
            # stratified on the patient label combination: within 3 points of the whole
            assert (part.frame[patient_cols].mean() - overall).abs().max() < 0.03
            assert (part.frame[["N", "G", "C"]].mean() - eye_overall).abs().max() < 0.04


def test_split_is_deterministic_and_seed_dependent(odir_sample):
    m = _odir(odir_sample)
    a, b = split_patients(m, seed=3), split_patients(m, seed=3)
    c = split_patients(m, seed=4)
    assert all(a[k].frame.equals(b[k].frame) for k in a)
    assert _patients(a["test"]) != _patients(c["test"])


def test_val_zero_means_no_val_split():
    splits = split_patients(_toy(), val=0, test=0.25)
    assert set(splits) == {"train", "test"}
    assert len(_patients(splits["test"])) == 10


def test_bad_fractions():
    with pytest.raises(ConfigError, match="data.split.val \\+ data.split.test"):
        split_patients(_toy(), val=0.5, test=0.5)
    with pytest.raises(ConfigError, match=r"data.split.test=-0.1.*--set data.split.test=0.15"):
        split_patients(_toy(), test=-0.1)


def test_official_train_test_split_is_kept_and_val_carved_from_train():
    official = np.where(np.arange(40) < 30, "train", "test")
    m = _toy(split=official)
    splits = split_patients(m, val=0.2, test=0.3, seed=0)
    assert _patients(splits["test"]) == {f"p{i}" for i in range(30, 40)}
    assert len(_patients(splits["val"])) == 6  # 20 % of the 30 official training patients
    assert not (_patients(splits["val"]) & _patients(splits["train"]))
    assert _patients(splits["val"]) | _patients(splits["train"]) == {f"p{i}" for i in range(30)}
    fresh = split_patients(m, use_official=False, seed=0)
    assert _patients(fresh["test"]) != {f"p{i}" for i in range(30, 40)}


def test_official_three_splits_used_as_given():
    official = np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 10)
    splits = split_patients(_toy(split=official), val=0.5, test=0.5 - 1e-9)
    assert {k: len(_patients(v)) for k, v in splits.items()} == {"train": 20, "val": 10, "test": 10}


def test_user_split_with_a_patient_in_two_splits_raises_with_its_id():
    m = _toy(n_patients=6, split=["train"] * 4 + ["test"] * 2)
    frame = m.frame.copy()
    frame.loc[frame.index[3], "split"] = "test"  # p1's right eye in test, its left in train
    bad = Manifest(frame, m.labels)
    with pytest.raises(DataError, match=r"patient 'p1' is in both the 'train' and the 'test' split"):
        split_patients(bad)
    parts = {s: bad.subset(frame["split"] == s) for s in ("train", "test")}
    with pytest.raises(DataError, match=r"'p1'.*--set data.split.official=false"):
        check_patient_disjoint(parts)
    check_patient_disjoint({s: m.subset(m.frame["split"] == s) for s in ("train", "test")})


def test_unknown_official_split_value():
    m = _toy(n_patients=4, split=["train", "train", "holdout", "test"])
    with pytest.raises(
        DataError, match=r"row 4 \(.*2_left.png\) of .* has split 'holdout'.*--set data.split.official=false"
    ):
        split_patients(m)


def test_kfold_covers_every_patient_once(odir_sample):
    m = _odir(odir_sample)
    folds = kfold(m, 5, seed=0)
    assert len(folds) == 5
    seen = [p for _, val in folds for p in _patients(val)]
    assert len(seen) == len(set(seen)) == m.frame["patient_id"].nunique()
    sizes = [len(_patients(val)) for _, val in folds]
    assert max(sizes) - min(sizes) <= 2
    overall = m.frame["patient_G"].mean()
    for train, val in folds:
        assert not (_patients(train) & _patients(val))
        assert len(train) + len(val) == len(m)
        assert abs(val.frame["patient_G"].mean() - overall) < 0.03
    with pytest.raises(DataError, match="lower --set transfer.folds"):
        kfold(_toy(n_patients=3), 5)


def test_to_patients_matches_the_patient_level_reader(odir_sample):
    eyes = _odir(odir_sample)
    patients = _odir(odir_sample, level="patient")
    merged = to_patients(eyes)
    pd.testing.assert_frame_equal(merged.frame[patients.frame.columns], patients.frame)
    # without patient_* columns: a disease in either eye, N only when neither has one
    plain = Manifest(eyes.frame.drop(columns=[f"patient_{c}" for c in kl.ODIR_LABELS]), eyes.labels)
    ored = to_patients(plain).frame.set_index("patient_id")[kl.ODIR_LABELS]
    expected = eyes.frame.groupby("patient_id")[kl.ODIR_LABELS].max().loc[ored.index]
    expected["N"] *= expected.drop(columns="N").max(axis=1) == 0
    np.testing.assert_array_equal(ored, expected)
    np.testing.assert_array_equal(ored, patients.frame.set_index("patient_id").loc[ored.index, kl.ODIR_LABELS])


def test_to_patients_odir_normal_eye_of_a_diseased_patient():
    frame = pd.DataFrame(
        {
            "patient_id": ["1", "1"],
            "image": ["/l.jpg", "/r.jpg"],
            "eye": ["left", "right"],
            **{c: [int(c == "C"), int(c == "N")] for c in kl.ODIR_LABELS},
        }
    )
    patient = to_patients(Manifest(frame, list(kl.ODIR_LABELS))).frame.iloc[0]
    assert patient["C"] == 1 and patient["N"] == 0


def test_to_patients_multiclass_takes_the_worse_eye(eyepacs_sample):
    eyes = sources.read_dr_grades(eyepacs_sample / "trainLabels.csv")
    patients = to_patients(eyes)
    raw = pd.read_csv(eyepacs_sample / "trainLabels.csv")
    raw["patient"] = raw["image"].str.rsplit("_", n=1).str[0]
    worse = raw.groupby("patient")["level"].max()
    got = patients.frame.set_index("patient_id")
    np.testing.assert_array_equal(got["grade"], worse.loc[got.index])
    np.testing.assert_array_equal(patients.targets().argmax(1), worse.loc[got.index])
    assert len(patients) == 375


def test_to_patients_drops_one_eyed_patients_and_rejects_two_left_eyes():
    m = _toy(n_patients=3)
    one_eyed = m.subset(np.arange(6) != 5)
    with pytest.warns(UserWarning, match=r"1 patient.*\['p2'\]"):
        merged = to_patients(one_eyed)
    assert merged.frame["patient_id"].tolist() == ["p0", "p1"]
    assert merged.skipped["path"].tolist() == ["/x/2_left.png"]
    frame = m.frame.copy()
    frame.loc[1, "eye"] = "left"
    with pytest.raises(DataError, match=r"patient 'p0' has two left images"):
        to_patients(Manifest(frame, m.labels))


def test_to_eyes_reverses_to_patients(odir_sample):
    eyes = _odir(odir_sample)
    back = to_eyes(to_patients(eyes))
    key = ["patient_id", "eye", "image", "keywords"]
    pd.testing.assert_frame_equal(back.frame[key], eyes.frame[key])
    # the labels come back as the patient's
    np.testing.assert_array_equal(back.targets(), eyes.frame[[f"patient_{c}" for c in kl.ODIR_LABELS]])
