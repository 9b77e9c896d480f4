"""Dataset readers: every public layout built small in tmp_path, every validation error,
and the real samples in ../shared/data."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kfundus import labels as kl
from kfundus.data import readers as sources
from kfundus.data.splits import check_patient_disjoint
from kfundus.errors import ConfigError, DataError
from tests.conftest import shared_dataset


def write_image(path, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (120, 40, 20)).save(path)
    return path


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- ODIR

ODIR_ROWS = [  # ID, age, sex, left keywords, right keywords, patient labels N..O
    (1, 60, "Female", "cataract", "normal fundus", "00010000"),
    (2, 51, "Male", "normal fundus", "normal fundus", "10000000"),
    (3, 70, "Male", "glaucoma，lens dust", "lens dust", "00100000"),
]


def _odir(tmp_path, rows=ODIR_ROWS, images=True, name="annotation.csv", header=None):
    header = header or sources.ODIR_COLUMNS
    table = [
        (i, age, sex, f"{i}_left.jpg", f"{i}_right.jpg", f'"{lk}"', f'"{rk}"', *labels)
        for i, age, sex, lk, rk, labels in rows
    ]
    if images:
        for row in rows:
            for side in ("left", "right"):
                write_image(tmp_path / "images" / f"{row[0]}_{side}.jpg")
    return write_csv(tmp_path / name, header, table)


def test_read_odir_eye_rows_get_per_eye_keyword_labels(tmp_path):
    path = _odir(tmp_path)
    with pytest.warns(UserWarning, match=r"3 right"):
        m = sources.read_odir(path)
    f = m.frame
    assert len(m) == 6 and m.level == "eye" and m.labels == kl.ODIR_LABELS
    assert list(f["eye"]) == ["left", "right"] * 3
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in f["image"])
    assert f["image"].iloc[0] == str(tmp_path / "images" / "1_left.jpg")
    by = f.set_index(["patient_id", "eye"])
    # patient 1 has a cataract in the left eye only: the right eye is a normal fundus
    assert by.loc[("1", "left"), "C"] == 1 and by.loc[("1", "left"), "N"] == 0
    assert by.loc[("1", "right"), "N"] == 1 and by.loc[("1", "right"), "C"] == 0
    assert by.loc[("1", "right"), "patient_C"] == 1
    # "lens dust" says nothing about disease: that eye has no label
    assert by.loc[("3", "right"), kl.ODIR_LABELS].sum() == 0
    assert by.loc[("3", "left"), "G"] == 1
    assert by.loc[("3", "left"), "text"] == "left eye: glaucoma, lens dust."
    assert by.loc[("1", "left"), "age"] == 60 and by.loc[("1", "left"), "sex"] == "Female"


def test_read_odir_patient_level_and_patient_eye_labels(tmp_path):
    path = _odir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = sources.read_odir(path, level="patient")
        e = sources.read_odir(path, eye_labels="patient")
    assert p.level == "patient" and len(p) == 3
    expected = np.array([[int(c) for c in row[5]] for row in ODIR_ROWS])
    np.testing.assert_array_equal(p.targets(), expected)
    assert p.frame["text"].iloc[0] == "left eye: cataract. right eye: normal fundus."
    assert p.frame["right_image"].iloc[1].endswith("2_right.jpg")
    # with patient labels both eyes of patient 1 are C
    np.testing.assert_array_equal(e.targets(), np.repeat(expected, 2, axis=0))


def test_read_odir_xlsx_equals_csv(tmp_path):
    path = _odir(tmp_path)
    table = pd.read_csv(path, dtype=str)
    table.to_excel(tmp_path / "annotation.xlsx", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sources.read_odir(path).frame
        b = sources.read_odir(tmp_path / "annotation.xlsx").frame
    pd.testing.assert_frame_equal(a, b)


def test_read_odir_strips_header_spaces_and_finds_training_images(tmp_path):
    header = [c + " " for c in sources.ODIR_COLUMNS]
    path = _odir(tmp_path, ODIR_ROWS[:2], images=False, header=header)
    for i in (1, 2):
        for side in ("left", "right"):
            write_image(tmp_path / "Training Images" / f"{i}_{side}.jpg")
    m = sources.read_odir(path)
    assert "Training Images" in m.frame["image"].iloc[0]


def test_read_odir_missing_column_lists_columns(tmp_path):
    path = _odir(tmp_path)
    table = pd.read_csv(path).drop(columns=["G"])
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"\['G'\].*annotation.csv|annotation.csv.*\['G'\]") as error:
        sources.read_odir(path)
    assert "Patient Age" in str(error.value)  # the columns the file does have


def test_read_odir_bad_label_names_row_column_value(tmp_path):
    rows = list(ODIR_ROWS)
    rows[1] = rows[1][:5] + ("10200000",)
    path = _odir(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 3 of .*annotation.csv, column 'G'.*'2'"):
        sources.read_odir(path)


def test_read_odir_duplicate_ids(tmp_path):
    rows = ODIR_ROWS + [ODIR_ROWS[0]]
    path = _odir(tmp_path, rows)
    with pytest.raises(DataError, match=r"duplicate patient ID.*'1'.*rows \[2, 5\]"):
        sources.read_odir(path)


@pytest.mark.filterwarnings("ignore:.*non-diagnostic")
def test_read_odir_missing_image_names_row_or_skips(tmp_path):
    path = _odir(tmp_path)
    missing = tmp_path / "images" / "2_right.jpg"
    missing.unlink()
    with pytest.raises(DataError, match=r"row 3: .*2_right.jpg[\s\S]*--set data.options.skip_missing=true"):
        sources.read_odir(path)
    with pytest.warns(UserWarning, match="skipped 1 row"):
        m = sources.read_odir(path, skip_missing=True)
    assert len(m) == 5 and str(missing) not in set(m.frame["image"])
    assert m.skipped["path"].tolist() == [str(missing)]
    assert m.skipped["source_row"].tolist() == [3] and m.skipped["reason"].tolist() == ["missing"]
    assert "row 3" in m.skipped["detail"].iloc[0]
    with pytest.warns(UserWarning, match="skipped 1 row"):
        p = sources.read_odir(path, level="patient", skip_missing=True)
    assert p.frame["patient_id"].tolist() == ["1", "3"]
    assert len(sources.read_odir(path, check_files=False)) == 6


def test_read_odir_real_sample_eye_labels_agree_with_patient_labels(odir_sample):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sample has no mismatch and no label-less eye
        eyes = sources.read_odir(odir_sample / "annotation.csv")
    patients = sources.read_odir(odir_sample / "annotation.csv", level="patient")
    assert len(eyes) == 950 and len(patients) == 475
    assert patients.counts() == {"N": 338, "D": 12, "G": 74, "C": 65, "A": 4, "H": 4, "M": 2, "O": 7}
    # independent union: a disease in either eye counts; N only when no eye has a disease
    y = eyes.frame.groupby("patient_id", sort=False)[kl.ODIR_LABELS].max()
    disease = y.drop(columns="N").max(axis=1)
    y["N"] = ((y["N"] == 1) & (disease == 0)).astype(int)
    truth = patients.frame.set_index("patient_id")[kl.ODIR_LABELS].loc[y.index]
    mismatch = (y.to_numpy() != truth.to_numpy()).any(axis=1).mean()
    assert mismatch == 0.0
    # per-eye truth is not the patient's: some eyes lack a disease their patient has
    f = eyes.frame
    assert sum(((f[f"patient_{c}"] == 1) & (f[c] == 0)).sum() for c in kl.ODIR_LABELS[1:]) > 0


def test_read_odir_kaggle_uses_the_eye_keywords_not_target(tmp_path):
    header = ["filename", *sources.ODIR_COLUMNS, "target"]
    rows = [
        (
            "0_left.jpg",
            0,
            69,
            "Female",
            "0_left.jpg",
            "0_right.jpg",
            "cataract",
            "normal fundus",
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            '"[1, 0, 0, 0, 0, 0, 0, 0]"',
        ),
        (
            "0_right.jpg",
            0,
            69,
            "Female",
            "0_left.jpg",
            "0_right.jpg",
            "cataract",
            "normal fundus",
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            '"[0, 0, 0, 1, 0, 0, 0, 0]"',
        ),
    ]
    path = write_csv(tmp_path / "full_df.csv", header, rows)
    for name in ("0_left.jpg", "0_right.jpg"):
        write_image(tmp_path / "preprocessed_images" / name)
    m = sources.read_odir_kaggle(path)
    f = m.frame.set_index("eye")
    assert f.loc["left", "C"] == 1 and f.loc["left", "N"] == 0
    assert f.loc["right", "N"] == 1 and f.loc["right", "C"] == 0 and f.loc["right", "patient_C"] == 1
    assert "preprocessed_images" in f.loc["left", "image"]
    bad = write_csv(tmp_path / "bad.csv", header, [("0.jpg",) + rows[0][1:]])
    with pytest.raises(DataError, match=r"row 2 of .*bad.csv.*'0.jpg'"):
        sources.read_odir_kaggle(bad, tmp_path)


def test_read_odir_kaggle_real_table_matches_official_reader(odir_sample, shared_sources):
    with pytest.warns(UserWarning, match="skipped"):
        k = sources.read_odir_kaggle(shared_sources / "odir5k_full_df.csv", odir_sample / "images", skip_missing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = sources.read_odir(odir_sample / "annotation.csv")
    assert len(k) == len(e) == 950
    a = k.frame.set_index("image")[kl.ODIR_LABELS].sort_index()
    b = e.frame.set_index("image")[kl.ODIR_LABELS].sort_index()
    pd.testing.assert_frame_equal(a, b)


@pytest.fixture
def shared_sources():
    return shared_dataset("_sources")


# -------------------------------------------------------------------------- RFMiD


def _rfmid(folder, split, rows):
    """rows: (ID, {label: 1, ...}); images in folder/<split folder>/<ID>.png."""
    names = {"Training": "Training", "Validation": "Validation", "Testing": "Test"}
    table = [(i, *[int(c in pos) for c in kl.RFMID_46]) for i, pos in rows]
    for i, _ in rows:
        write_image(folder / names[split] / f"{i}.png")
    return write_csv(folder / f"RFMiD_{split}_Labels.csv", ["ID", *kl.RFMID_46], table)


def test_read_rfmid_views_split_and_image_dir(tmp_path):
    path = _rfmid(tmp_path, "Training", [(1, {"Disease_Risk", "DR"}), (2, {"Disease_Risk", "CWS"}), (3, {})])
    m = sources.read_rfmid(path)
    assert m.labels == kl.RFMID_46 and len(m) == 3
    assert set(m.frame["split"]) == {"train"}
    assert m.frame["image"].iloc[0] == str(tmp_path / "Training" / "1.png")
    assert m.frame.loc[0, "DR"] == 1 and m.frame.loc[1, "CWS"] == 1
    r = sources.read_rfmid(path, view="29")
    assert r.labels == kl.RIADD_29 and "CWS" not in r.frame.columns
    assert r.frame["OTHER"].tolist() == [0, 1, 0]  # CWS is one of the rare, pooled diseases


def test_read_rfmid_dir_concatenates_splits_with_distinct_patients(tmp_path):
    _rfmid(tmp_path / "a", "Training", [(1, {"DR"}), (2, {})])
    _rfmid(tmp_path / "b", "Validation", [(1, {"ARMD"})])
    _rfmid(tmp_path / "c", "Testing", [(1, {}), (2, {"MH"})])
    m = sources.read_rfmid_dir(tmp_path, view="29")
    assert m.frame["split"].tolist() == ["train", "train", "val", "test", "test"]
    assert m.frame["patient_id"].is_unique  # ids restart at 1 in every split
    check_patient_disjoint({s: m.subset(m.frame["split"] == s) for s in ("train", "val", "test")})
    assert m.frame["image"].iloc[3].endswith(os.path.join("c", "Test", "1.png"))
    assert sources.load_source("rfmid", tmp_path).frame.equals(sources.read_rfmid_dir(tmp_path).frame)


def test_read_rfmid_dir_warns_on_a_missing_split_and_errors_without_tables(tmp_path):
    _rfmid(tmp_path, "Training", [(1, {"DR"})])
    with pytest.warns(UserWarning, match=r"\['val', 'test'\]"):
        sources.read_rfmid_dir(tmp_path)
    with pytest.raises(DataError, match="no RFMiD"):
        sources.read_rfmid_dir(tmp_path / "Training")


def test_read_rfmid_missing_label_column(tmp_path):
    path = _rfmid(tmp_path, "Training", [(1, {"DR"})])
    pd.read_csv(path).drop(columns=["ODE", "PT"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"\['ODE', 'PT'\]"):
        sources.read_rfmid(path)


# --------------------------------------------------------------------- DR grades


def test_read_dr_grades_aptos(tmp_path):
    rows = [("a1", 0), ("b2", 3), ("c3", 4)]
    for name, _ in rows:
        write_image(tmp_path / "train_images" / f"{name}.png")
    m = sources.read_dr_grades(write_csv(tmp_path / "train.csv", ["id_code", "diagnosis"], rows))
    assert m.name == "aptos" and m.task == "multiclass" and m.labels == kl.DR_GRADES
    assert m.frame["grade"].tolist() == [0, 3, 4]
    np.testing.assert_array_equal(m.targets().argmax(1), [0, 3, 4])
    assert m.targets().sum(1).tolist() == [1, 1, 1]
    assert m.frame["patient_id"].tolist() == ["a1", "b2", "c3"]


def test_read_dr_grades_eyepacs_layout_and_bad_grade(tmp_path):
    rows = [("7_left", 0), ("7_right", 2), ("9_left", 1)]
    for name, _ in rows:
        write_image(tmp_path / "train" / f"{name}.jpeg")
    path = write_csv(tmp_path / "trainLabels.csv", ["image", "level"], rows)
    m = sources.read_dr_grades(path)
    assert m.name == "eyepacs"
    assert m.frame["patient_id"].tolist() == ["7", "7", "9"]
    assert m.frame["eye"].tolist() == ["left", "right", "left"]
    write_csv(path, ["image", "level"], rows + [("9_right", 5)])
    write_image(tmp_path / "train" / "9_right.jpeg")
    with pytest.raises(DataError, match=r"row 5 of .*trainLabels.csv, column 'level'.*'5'"):
        sources.read_dr_grades(path)


def test_read_dr_grades_unknown_header(tmp_path):
    path = write_csv(tmp_path / "x.csv", ["file", "grade"], [("a", 1)])
    with pytest.raises(DataError, match=r"x.csv.*\['file', 'grade'\].*id_code"):
        sources.read_dr_grades(path)
    with pytest.raises(ConfigError, match="aptos"):
        sources.read_dr_grades(path, layout="messidor")


def test_read_dr_grades_real_eyepacs(eyepacs_sample):
    m = sources.read_dr_grades(eyepacs_sample / "trainLabels.csv")
    assert m.name == "eyepacs" and len(m) == 750
    assert np.bincount(m.frame["grade"], minlength=5).tolist() == [557, 47, 108, 23, 15]
    raw = pd.read_csv(eyepacs_sample / "trainLabels.csv")
    np.testing.assert_array_equal(m.targets().argmax(1), raw["level"])
    assert m.frame.groupby("patient_id")["eye"].apply(lambda e: sorted(e) == ["left", "right"]).all()


def test_read_dr_grades_real_idrid(idrid_grading):
    m = sources.read_dr_grades(idrid_grading / "test.csv")
    assert m.name == "idrid" and len(m) == 103
    assert np.bincount(m.frame["grade"], minlength=5).tolist() == [34, 5, 32, 19, 13]
    assert m.frame["image"].iloc[0].endswith(os.path.join("images", "test", "IDRiD_001.jpg"))
    raw = pd.read_csv(idrid_grading / "test.csv")
    np.testing.assert_array_equal(m.frame["dme_risk"], raw["Risk of macular edema "])


# ------------------------------------------------------------------ class folders


def _kermany(root, counts, split_names=("train", "test")):
    for split in split_names:
        for label, n in counts.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                write_image(root / split / label / f"{label}-{100 + k}-{k}.jpeg")


def test_read_class_folders_kermany_layout(tmp_path):
    _kermany(tmp_path, {"CNV": 2, "DME": 1, "DRUSEN": 1, "NORMAL": 3})
    (tmp_path / "train" / "CNV" / "notes.txt").write_text("not an image")
    m = sources.read_class_folders(tmp_path)
    assert m.labels == kl.OCT_CLASSES and m.task == "multiclass"
    assert len(m) == 14 and set(m.frame["split"]) == {"train", "test"}
    row = m.frame[m.frame["image"].str.endswith(os.path.join("train", "NORMAL", "NORMAL-102-2.jpeg"))].iloc[0]
    assert row["patient_id"] == "102" and row["NORMAL"] == 1 and row[["CNV", "DME", "DRUSEN"]].sum() == 0
    ordered = sources.read_class_folders(tmp_path, classes=["NORMAL", "CNV", "DME", "DRUSEN"])
    assert ordered.labels[0] == "NORMAL"
    np.testing.assert_array_equal(ordered.targets()[:, 0], ordered.frame["label"] == "NORMAL")


def test_read_class_folders_empty_class_is_an_error(tmp_path):
    _kermany(tmp_path, {"CNV": 1, "NORMAL": 1})
    (tmp_path / "test" / "DME").mkdir()
    (tmp_path / "train" / "DME").mkdir()
    with pytest.raises(DataError, match=r"class folder .*test.DME has no images"):
        sources.read_class_folders(tmp_path)


def test_read_class_folders_flat_layout_and_patient_pattern(tmp_path):
    write_image(tmp_path / "healthy" / "p01_scan3.png")
    write_image(tmp_path / "sick" / "p02_scan1.png")
    m = sources.read_class_folders(tmp_path)
    assert "split" not in m.frame.columns and m.labels == ["healthy", "sick"]
    assert m.frame["patient_id"].tolist() == ["p01_scan3", "p02_scan1"]
    m = sources.read_class_folders(tmp_path, patient_pattern=r"^(p\d+)_")
    assert m.frame["patient_id"].tolist() == ["p01", "p02"]
    with pytest.raises(DataError, match=r"p01_scan3.png does not match"):
        sources.read_class_folders(tmp_path, patient_pattern=r"^q\d+")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="mixes split folders"):
        sources.read_class_folders(tmp_path)


# ---------------------------------------------------------------------- plain CSV


def test_read_csv_plain_table(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        write_image(tmp_path / "imgs" / name)
    path = write_csv(
        tmp_path / "labels.csv",
        ["image", "patient_id", "split", "x", "y"],
        [("a.png", "p1", "training", 1, 0), ("b.png", "p1", "training", 0, 1), ("sub/c.png", "p2", "Test", 1, 1)],
    )
    m = sources.read_csv(path, image_dir=tmp_path / "imgs")
    assert m.labels == ["x", "y"] and m.frame["split"].tolist() == ["train", "train", "test"]
    assert m.frame["image"].iloc[2] == str(tmp_path / "imgs" / "sub" / "c.png")
    assert m.frame["patient_id"].tolist() == ["p1", "p1", "p2"]
    with pytest.raises(DataError, match=r"\['z'\].*valid label columns: \['x', 'y'\]"):
        sources.read_csv(path, image_dir=tmp_path / "imgs", label_columns=["z"])
    with pytest.raises(DataError, match=r"row 4 of .*labels.csv.*multiclass"):
        sources.read_csv(path, image_dir=tmp_path / "imgs", task="multiclass")
    with pytest.raises(DataError, match=r"(?s)3 image file\(s\).*row 2: .*a.png"):
        sources.read_csv(path)  # relative to the CSV's folder: not there


def test_read_csv_bad_values(tmp_path):
    write_image(tmp_path / "a.png")
    path = write_csv(tmp_path / "t.csv", ["image", "split", "x"], [("a.png", "holdout", 1)])
    with pytest.raises(DataError, match=r"row 2 of .*t.csv, column 'split': 'holdout'"):
        sources.read_csv(path)
    path = write_csv(tmp_path / "t.csv", ["image", "x"], [("a.png", "yes")])
    with pytest.raises(DataError, match=r"row 2 of .*t.csv, column 'x'.*'yes'"):
        sources.read_csv(path)
    path = write_csv(tmp_path / "t.csv", ["file", "x"], [("a.png", 1)])
    with pytest.raises(DataError, match=r"\['image'\].*\['file', 'x'\]"):
        sources.read_csv(path)


# ------------------------------------------------------------ dispatch, selection


def test_load_source_dispatch_and_option_errors(tmp_path):
    _odir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sources.load_source("odir", tmp_path, level="patient")
        sel = sources.load_source("odir", tmp_path / "annotation.csv", labels=["N", "C"], drop_empty=True)
    assert m.level == "patient" and len(m) == 3
    assert sel.labels == ["N", "C"] and len(sel) == 4  # patient 1: C and N eyes, 2: two N, 3: neither
    with pytest.raises(
        ConfigError, match=r"'odri'.*\['csv', 'dr', 'folders', 'hrdc', 'odir', 'odir_kaggle', 'rfmid'\]"
    ):
        sources.load_source("odri", tmp_path)
    with pytest.raises(ConfigError, match=r"\['levels'\].*'level'"):
        sources.load_source("odir", tmp_path, levels="eye")
    with pytest.raises(DataError, match="no label table"):
        sources.load_source("dr", tmp_path / "images")


def test_select_labels(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sources.read_odir(_odir(tmp_path))
    s = sources.select_labels(m, ["N", "G", "C"])
    assert s.labels == ["N", "G", "C"] and len(s) == len(m)
    d = sources.select_labels(m, ["G", "C"], drop_empty=True)
    expected = m.frame[(m.frame["G"] == 1) | (m.frame["C"] == 1)]["image"].tolist()
    assert d.frame["image"].tolist() == expected and len(d.skipped) == len(m) - len(expected)
    with pytest.raises(DataError, match=r"\['X'\].*valid labels: \['N', 'D'"):
        sources.select_labels(m, ["N", "X"])


def test_select_labels_multiclass_needs_drop_empty(tmp_path):
    _kermany(tmp_path, {"CNV": 1, "NORMAL": 2}, split_names=("train",))
    m = sources.read_class_folders(tmp_path)
    with pytest.raises(DataError, match="--set data.drop_empty=true"):
        sources.select_labels(m, ["NORMAL"])
    assert len(sources.select_labels(m, ["NORMAL"], drop_empty=True)) == 2


# ------------------------------------------------------------ ODIR keyword table


def test_keyword_table_reproduces_every_patient_label_of_the_kaggle_table(shared_sources):
    """The keyword table, applied per eye and joined per patient, gives the graders' N..O of
    every patient of Kaggle's full_df.csv (the table was derived from it: this guards it)."""
    df = pd.read_csv(shared_sources / "odir5k_full_df.csv", dtype=str, keep_default_na=False)
    patients = df.drop_duplicates("ID")
    cells = pd.concat([patients["Left-Diagnostic Keywords"], patients["Right-Diagnostic Keywords"]])
    seen = {k for cell in cells for k in kl.split_keywords(cell)}
    assert len(seen) == len(kl.ODIR_KEYWORDS) == 94 and all(kl.is_odir_keyword(k) for k in seen)
    derived = pd.DataFrame(
        [
            kl.odir_patient_labels(kl.odir_keywords_to_labels(a), kl.odir_keywords_to_labels(b))
            for a, b in zip(patients["Left-Diagnostic Keywords"], patients["Right-Diagnostic Keywords"])
        ]
    )
    truth = patients[kl.ODIR_LABELS].astype(int).reset_index(drop=True)
    assert len(truth) == 3358
    pd.testing.assert_frame_equal(derived[kl.ODIR_LABELS], truth)


def test_keyword_lookup_ignores_case_spacing_and_hyphens_without_collisions():
    compact = [k.replace(" ", "").replace("-", "") for k in kl.ODIR_KEYWORDS]
    assert len(set(compact)) == len(compact)
    assert kl.odir_keyword_label("Mild Non-Proliferative  Retinopathy") == "D"
    assert kl.odir_keyword_label("moderate nonproliferative retinopathy") == "D"
    assert kl.odir_keyword_label("LENS DUST") is None
    with pytest.raises(DataError, match="--set data.options.unknown_keywords=other"):
        kl.odir_keyword_label("glaucom")
    assert kl.odir_keyword_label("glaucom", "other") == "O" and kl.odir_keyword_label("glaucom", "ignore") is None


def test_keyword_separators_include_the_ideographic_comma_and_semicolons():
    assert kl.split_keywords("glaucoma、cataract；lens dust;drusen，laser spot,normal fundus") == [
        "glaucoma",
        "cataract",
        "lens dust",
        "drusen",
        "laser spot",
        "normal fundus",
    ]
    assert kl.odir_keywords_to_labels("glaucoma、cataract") == {
        **dict.fromkeys(kl.ODIR_LABELS, 0),
        "G": 1,
        "C": 1,
    }


def test_unknown_keywords_stop_with_count_and_rows_or_follow_the_option(tmp_path):
    rows = [
        (1, 60, "Female", "glaucom", "normal fundus", "00100000"),  # a typo
        (2, 51, "Male", "normal fundus", "macular scar", "00000001"),  # not an ODIR keyword
        (3, 70, "Male", "glaucom，cataract", "normal fundus", "00110000"),
        (4, 64, "Female", "cataract/glaucoma", "normal fundus", "00110000"),  # another separator
    ]
    path = _odir(tmp_path, rows)
    with pytest.raises(DataError) as err:
        sources.read_odir(path)
    message = str(err.value)
    assert "3 diagnostic keyword(s) are not ODIR-5K keywords" in message
    assert "'glaucom': 2 time(s), row(s) [2, 4] (did you mean 'glaucoma'?)" in message
    assert "'macular scar': 1 time(s), row(s) [3]" in message and "'cataract/glaucoma'" in message
    assert "--set data.options.unknown_keywords=other" in message
    with pytest.warns(UserWarning, match=r"(?s)data.options.unknown_keywords=other makes them the O label.*glaucom"):
        other = sources.read_odir(path, unknown_keywords="other")
    with pytest.warns(UserWarning, match="give no label"):
        ignored = sources.read_odir(path, unknown_keywords="ignore")
    left = lambda m, i: m.frame[(m.frame["patient_id"] == str(i)) & (m.frame["eye"] == "left")].iloc[0]
    assert left(other, 1)["O"] == 1 and left(ignored, 1)[kl.ODIR_LABELS].sum() == 0
    assert left(other, 3)["O"] == 1 and left(other, 3)["C"] == 1 and left(ignored, 3)["O"] == 0
    with pytest.raises(ConfigError, match=r"data.options.unknown_keywords='maybe'.*--set"):
        sources.read_odir(path, unknown_keywords="maybe")


def test_real_odir_sample_has_no_unknown_keyword(odir_sample):
    table = pd.read_csv(odir_sample / "annotation.csv", dtype=str, keep_default_na=False)
    cells = pd.concat([table["Left-Diagnostic Keywords"], table["Right-Diagnostic Keywords"]])
    assert all(kl.is_odir_keyword(k) for cell in cells for k in kl.split_keywords(cell))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(sources.read_odir(odir_sample / "annotation.csv", unknown_keywords="error")) == 950
