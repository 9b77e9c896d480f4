"""Patient identity (issue 18): a reader that cannot find the patient column must not take
every image as its own patient, or one patient's eyes land in two splits. Common names are
recognised, data.options.patient_column declares one, and eye-named files give the patient."""

import warnings

import pytest

from kfundus.data import readers as sources
from kfundus.data.splits import check_patient_disjoint, split_patients, to_patients
from kfundus.errors import DataError
from tests.test_sources import write_csv, write_image


def _two_eye_table(tmp_path, header, n=30, name="labels.csv", image=lambda i, s: f"{i}_{s}.png", patient=str):
    rows = []
    for i in range(n):
        for side in ("left", "right"):
            write_image(tmp_path / image(i, side))
            rows.append((image(i, side), patient(i), int(i % 2 == 0), int(i % 3 == 0)))
    return write_csv(tmp_path / name, header, rows)


@pytest.mark.parametrize("column", ["Patient ID", "PatientID", "patient", "subject_id", "case_id", "patient_no"])
def test_csv_patient_column_with_another_name_keeps_a_patients_eyes_together(tmp_path, column):
    path = _two_eye_table(tmp_path, ["image", column, "x", "y"], image=lambda i, s: f"img{i}{s[0]}.png")
    m = sources.read_csv(path)
    assert m.labels == ["x", "y"] and m.frame["patient_id"].nunique() == 30
    for seed in range(3):
        check_patient_disjoint(split_patients(m, val=0.2, test=0.2, seed=seed))


def test_csv_patient_column_declared_by_option_or_the_error_says_how(tmp_path):
    path = _two_eye_table(tmp_path, ["image", "person", "x", "y"], image=lambda i, s: f"img{i}{s[0]}.png")
    m = sources.load_source("csv", path, patient_column="person", label_columns=["x", "y"])
    assert m.frame["patient_id"].nunique() == 30
    with pytest.raises(DataError, match=r"no patient column 'persn'.*--set data.options.patient_column=NAME"):
        sources.read_csv(path, patient_column="persn", label_columns=["x", "y"])
    # no column, names that do not say the eye: each image its own patient, with a warning
    with pytest.warns(UserWarning, match=r"every image is taken as its own patient.*--set data.options.patient_column"):
        alone = sources.read_csv(path, label_columns=["x", "y"])
    assert alone.frame["patient_id"].nunique() == 60
    # naming the image column declares one image per patient: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            sources.read_csv(path, patient_column="image", label_columns=["x", "y"]).frame["patient_id"].nunique() == 60
        )


@pytest.mark.parametrize(
    "naming",
    [
        lambda i, s: f"{i}_{s}.png",
        lambda i, s: f"{i}_{s[0].upper()}.png",
        lambda i, s: f"{i}-{'OS' if s == 'left' else 'OD'}.jpg",
    ],
)
def test_csv_without_patient_column_takes_patient_and_eye_from_eye_names(tmp_path, naming):
    path = _two_eye_table(tmp_path, ["image", "label_a", "x", "y"], image=naming)  # label_a: a 4th column
    with pytest.warns(UserWarning, match=r"patient id and the eye were taken from the image names"):
        m = sources.read_csv(path, label_columns=["x", "y"])
    assert m.frame["patient_id"].tolist() == [str(i) for i in range(30) for _ in range(2)]
    assert m.frame["eye"].tolist() == ["left", "right"] * 30
    check_patient_disjoint(split_patients(m, val=0.2, test=0.2, seed=1))
    assert len(to_patients(m)) == 30


def test_csv_with_some_eye_names_and_no_patient_column_stops(tmp_path):
    rows = [("7_left.png", 1), ("7_right.png", 0), ("scan_b.png", 1), ("scan_c.png", 0)]
    for name, _ in rows:
        write_image(tmp_path / name)
    path = write_csv(tmp_path / "t.csv", ["image", "y"], rows)
    with pytest.raises(
        DataError, match=r"(?s)no patient column.*'7_left.png', '7_right.png'.*--set data.options.patient_column"
    ):
        sources.read_csv(path)


def test_readers_of_sources_without_patient_ids_find_a_patient_column(tmp_path):
    # CGI-HRDC: one image per patient, quietly; a table that has patient ids is read with them
    rows = [(f"{i}{s}.png", f"P{i}", i % 2) for i in range(6) for s in "ab"]
    for name, _, _ in rows:
        write_image(tmp_path / "images" / name)
    path = write_csv(tmp_path / "labels.csv", ["Image", "Patient_ID", "Hypertensive"], rows)
    m = sources.read_hrdc(path)
    assert m.frame["patient_id"].tolist() == [f"P{i}" for i in range(6) for _ in "ab"]
    # APTOS layout with a patient column
    aptos = [(f"img{i}{s}", f"p{i}", i % 5) for i in range(5) for s in "ab"]
    for name, _, _ in aptos:
        write_image(tmp_path / "train_images" / f"{name}.png")
    path = write_csv(tmp_path / "train.csv", ["id_code", "diagnosis", "subject"], [(a, c, b) for a, b, c in aptos])
    m = sources.read_dr_grades(path)
    assert m.frame["patient_id"].nunique() == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # APTOS, IDRiD, RFMiD, CGI-HRDC: one image per patient, documented
        alone = write_csv(tmp_path / "train2.csv", ["id_code", "diagnosis"], [(a, c) for a, _, c in aptos])
        assert sources.read_dr_grades(alone, tmp_path / "train_images").frame["patient_id"].nunique() == 10
