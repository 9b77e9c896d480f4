"""Bad inputs a new user meets: label tables with another delimiter, no rows, a folder for a
file; fixes that must be typeable; rows left out, all in the run's skipped.csv and run.json;
the SavedModel's bytes signature and ``kfundus predict`` on bad and sideways images."""

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kfundus.data import readers as sources
from kfundus.errors import ConfigError, DataError
from tests.conftest import train_args


def _image(path, size=8, value=(120, 40, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), value).save(path)
    return path


def _table(tmp_path, text, name="labels.csv", images=("a.png", "b.png", "c.png")):
    for image in images:
        _image(tmp_path / image)
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


PLAIN = "image,patient_id,x\na.png,p1,1\nb.png,p2,0\nc.png,p3,1\n"


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_table_with_another_delimiter_is_read(tmp_path, delimiter):
    path = _table(tmp_path, PLAIN.replace(",", delimiter))
    m = sources.read_csv(path)
    assert (
        m.labels == ["x"]
        and m.frame["x"].tolist() == [1, 0, 1]
        and m.frame["patient_id"].tolist() == ["p1", "p2", "p3"]
    )


def test_a_table_with_an_unread_delimiter_says_which_it_found(tmp_path):
    path = _table(tmp_path, PLAIN.replace(",", "|"))
    with pytest.raises(DataError, match=r"separated by a vertical bar '\|'; kfundus reads tables separated by a comma"):
        sources.read_csv(path)


def test_header_only_empty_and_blank_tables_say_they_have_no_rows(tmp_path):
    with pytest.raises(DataError, match=r"labels.csv has a header \(image, patient_id, x\) but no data rows"):
        sources.read_csv(_table(tmp_path, "image,patient_id,x\n"))
    with pytest.raises(DataError, match=r"empty.csv is empty"):
        sources.read_csv(_table(tmp_path, "", name="empty.csv"))
    with pytest.raises(DataError, match=r"blank.csv is empty"):
        sources.read_csv(_table(tmp_path, "\n\n,,\n", name="blank.csv"))
    with pytest.raises(DataError, match=r"has a header .* but no data rows"):  # the official ODIR header, no rows
        sources.read_odir(_table(tmp_path, ",".join(sources.ODIR_COLUMNS) + "\n", name="annotation.csv"))


def test_a_folder_where_a_label_file_belongs_and_a_file_where_a_folder_belongs(tmp_path):
    _table(tmp_path / "data", PLAIN)
    with pytest.raises(DataError, match=r"data is a folder, but a label table .*\(--data .*labels.csv\)"):
        sources.load_source("csv", tmp_path / "data")
    with pytest.raises(DataError, match=r"labels.csv is a file, but data.source folders reads a folder"):
        sources.load_source("folders", tmp_path / "data" / "labels.csv")
    with pytest.raises(DataError, match=r"image folder .*labels.csv is a file: --set data.options.image_dir=DIR"):
        sources.read_hrdc(tmp_path / "data" / "labels.csv", image_dir=tmp_path / "data" / "labels.csv")


def test_unreadable_workbooks_and_text_say_so(tmp_path):
    with pytest.raises(DataError, match=r"broken.xlsx is not a readable Excel workbook .*save it again as .xlsx"):
        sources.read_csv(_table(tmp_path, b"PK\x03\x04 not really a zip", name="broken.xlsx"))
    with pytest.raises(DataError, match=r"old.xls is an old Excel .xls workbook"):
        sources.read_csv(_table(tmp_path, b"\xd0\xcf\x11\xe0", name="old.xls"))
    with pytest.raises(DataError, match=r"latin.csv is not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        sources.read_csv(_table(tmp_path, "image,patient_id,x\na.png,Jos\xe9,1\n".encode("latin-1"), name="latin.csv"))
    # an .xlsx that is really an .xlsx is read, and a workbook named .csv too
    frame = pd.DataFrame({"image": ["a.png", "b.png"], "patient_id": ["p1", "p2"], "x": [1, 0]})
    frame.to_excel(tmp_path / "t.xlsx", index=False)
    (tmp_path / "t.csv").write_bytes((tmp_path / "t.xlsx").read_bytes())
    for name in ("t.xlsx", "t.csv"):
        assert sources.read_csv(tmp_path / name).frame["x"].tolist() == [1, 0]


def test_bom_ragged_rows_duplicate_columns_and_row_numbers(tmp_path):
    assert sources.read_csv(_table(tmp_path, "\ufeff" + PLAIN, name="bom.csv")).labels == ["x"]  # not '\ufeffimage'
    with pytest.raises(DataError, match=r"row 3 of .*ragged.csv has 4 fields but the header has 3 .*quote values"):
        sources.read_csv(_table(tmp_path, "image,patient_id,x\na.png,p1,1\nb.png,p2,0,1\n", name="ragged.csv"))
    with pytest.raises(DataError, match=r"names the column 'x' twice \(columns 3 and 4\)"):
        sources.read_csv(_table(tmp_path, "image,patient_id,x,x\na.png,p1,1,0\n", name="dup.csv"))
    # blank lines count: the bad value is on the 5th line of the file
    text = "image,patient_id,x\n\na.png,p1,1\n\nb.png,p2,yes\n"
    with pytest.raises(DataError, match=r"row 5 of .*blank_lines.csv, column 'x': label value 'yes'"):
        sources.read_csv(_table(tmp_path, text, name="blank_lines.csv"))


def test_duplicate_paths_labels_outside_01_spaces_and_eye_values(tmp_path):
    with pytest.raises(DataError, match=r"duplicate image path.*rows \[2, 4\]"):
        sources.read_csv(_table(tmp_path, "image,patient_id,x\na.png,p1,1\nb.png,p2,0\n./a.png,p3,1\n", name="d.csv"))
    with pytest.raises(DataError, match=r"row 3 of .*, column 'x': label value '2' is not 0 or 1 .*rows \[3\]"):
        sources.read_csv(_table(tmp_path, "image,patient_id,x\na.png,p1,1\nb.png,p2,2\n", name="l.csv"))
    _image(tmp_path / "with space" / "my eye.png")
    m = sources.read_csv(_table(tmp_path, "image,patient_id,x\nwith space/my eye.png,p1,1\n", name="s.csv"))
    assert Path(m.frame["image"].iloc[0]).is_file()
    m = sources.read_csv(_table(tmp_path, "image,patient_id,eye,x\na.png,p1,OD,1\nb.png,p1,l,0\n", name="e.csv"))
    assert m.frame["eye"].tolist() == ["right", "left"]
    with pytest.raises(DataError, match=r"row 2 of .*, column 'eye': 'middle' is not an eye"):
        sources.read_csv(_table(tmp_path, "image,patient_id,eye,x\na.png,p1,middle,1\n", name="e2.csv"))


def test_a_folder_named_like_an_image_is_not_an_image_file(tmp_path):
    (tmp_path / "b.png").mkdir()
    _image(tmp_path / "a.png")
    path = tmp_path / "labels.csv"
    path.write_text(PLAIN.replace("c.png,p3,1\n", ""))
    with pytest.raises(DataError, match=r"row 3: .*b.png \(a folder\)"):
        sources.read_csv(path)
    with pytest.warns(UserWarning, match="skipped 1 row"):
        m = sources.read_csv(path, skip_missing=True)
    assert m.skipped["detail"].iloc[0].endswith("a folder, not an image file")


# --------------------------------------------------------------------------- typeable fixes


def _messages(tmp_path):
    """The message of every error a reader or split can give that suggests a fix."""
    from kfundus.data.manifest import Manifest
    from kfundus.data.splits import check_patient_disjoint, split_patients

    out = {}

    def catch(name, fn):
        with pytest.raises((DataError, ConfigError)) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        out[name] = str(err.value)

    missing = _table(tmp_path, PLAIN.replace("c.png", "gone.png"), name="missing.csv")
    catch("missing image", lambda: sources.read_csv(missing))
    catch("no label column", lambda: sources.read_csv(missing, label_columns=["z"], check_files=False))
    catch(
        "binary with two columns", lambda: sources.read_csv(missing, task="binary", label_columns=["x", "patient_id"])
    )
    catch("unknown option", lambda: sources.load_source("csv", missing, skip_mising=True))
    catch("bad option value", lambda: sources.read_csv(missing, task="regression"))
    frame = pd.DataFrame({"image": ["a", "b", "c", "d"], "patient_id": ["1", "1", "2", "3"], "y": [1, 0, 1, 0]})
    official = Manifest(frame.assign(split=["train", "test", "train", "holdout"]), ["y"])
    catch("unknown split value", lambda: split_patients(official))
    no_train = Manifest(frame.assign(split=["test"] * 4), ["y"])
    catch("no official train", lambda: split_patients(no_train))
    leak = Manifest(frame.assign(split=["train", "test", "train", "test"]), ["y"])
    catch(
        "patient in two splits",
        lambda: check_patient_disjoint({s: leak.subset(leak.frame["split"] == s) for s in ("train", "test")}),
    )
    multiclass = Manifest(frame.assign(z=[0, 1, 0, 0]), ["y", "z"], "multiclass")
    catch("multiclass without a class", lambda: sources.select_labels(multiclass, ["z"]))
    catch("unknown labels", lambda: sources.select_labels(multiclass, ["q"]))
    catch("bad fraction", lambda: split_patients(Manifest(frame, ["y"]), val=1.5))
    catch("no patient id", lambda: split_patients(Manifest(frame.drop(columns="patient_id"), ["y"])))
    return out


def test_every_fix_an_error_suggests_is_typeable(tmp_path):
    messages = _messages(tmp_path)
    assert len(messages) == 12
    python_argument = re.compile(
        r"(?<![\w.])(?:skip_missing|drop_empty|use_official|image_dir|label_columns|patient_column|task|k)="
        r"(?:True|False|\.\.\.|\[|'|\"|$|\s)"
    )
    for name, message in messages.items():
        fix = re.sub(r"--set '?[\w.]+=[^\s']*'?", "", message)  # what remains once the --set fixes are cut out
        assert "--set " in message, (name, message)
        assert not python_argument.search(fix), (name, message)
        assert "pass " not in message and "call " not in message, (name, message)


# --------------------------------------------------------------------------- a run's skipped rows


class _StopBeforeFit(Exception):
    pass


def test_every_skip_lands_in_skipped_csv_and_run_json(tmp_path, capsys, monkeypatch):
    """`kfundus train` on data with a missing image, an unreadable one, a tiny one and eyes
    with none of the labels: all four kinds in skipped.csv with the user's file row, and
    their counts in run.json. Both are written before training starts, so the test stops
    the run at the engine's fit (what is tested is the data side, not the training)."""
    import kfundus.engine
    from kfundus.cli import main
    from kfundus.data.synthetic import make_odir

    def stop(*args, **kwargs):
        raise _StopBeforeFit

    monkeypatch.setattr(kfundus.engine, "fit", stop)

    data = make_odir(tmp_path / "data", n_patients=24, size=64, seed=3, write_masks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eyes = sources.read_odir(data / "annotation.csv")
    labelled = eyes.frame[(eyes.frame["N"] == 1) | (eyes.frame["C"] == 1)]
    missing, corrupt, tiny = (Path(p) for p in labelled["image"].iloc[[0, 3, 6]])
    rows = {p: int(labelled.loc[labelled["image"] == str(p), "source_row"].iloc[0]) for p in (missing, corrupt, tiny)}
    missing.unlink()
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this JPEG is cut off")
    _image(tiny, size=16, value=(200, 120, 80))
    no_label = eyes.frame[(eyes.frame["N"] == 0) & (eyes.frame["C"] == 0)]
    assert len(no_label) > 0

    args = train_args(
        data,
        tmp_path,
        "--no-export",
        "--set",
        "data.labels=[N, C]",
        "--set",
        "data.drop_empty=true",
        "--set",
        "data.options.skip_missing=true",
        "--set",
        "data.skip_unreadable=true",
        "--set",
        "data.small_images=skip",
        "--set",
        "data.image_size=48",
        "--set",
        "data.augment={}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.split.test=0.2",
    )
    with warnings.catch_warnings(), pytest.raises(_StopBeforeFit):
        warnings.simplefilter("ignore")
        main(args)
    run = tmp_path / "runs" / "demo_synthetic"
    from kfundus.run import RunFolder

    skipped = RunFolder(run).read_skipped()
    assert list(skipped.columns) == ["source_row", "path", "reason", "detail", "split"]
    by_path = skipped.set_index("path")
    assert by_path.loc[str(missing), "reason"] == "missing" and by_path.loc[str(missing), "split"] == ""
    assert by_path.loc[str(corrupt), "reason"] == "unreadable" and by_path.loc[str(corrupt), "split"] != ""
    assert by_path.loc[str(tiny), "reason"] == "too_small" and "16x16 px" in by_path.loc[str(tiny), "detail"]
    for path, row in rows.items():
        assert int(by_path.loc[str(path), "source_row"]) == row
    dropped = skipped[skipped["reason"] == "no_label"]
    assert set(dropped["path"]) == set(no_label["image"]) - {str(missing)}
    assert (
        dropped["source_row"].to_numpy() == no_label.set_index("image").loc[dropped["path"], "source_row"].to_numpy()
    ).all()
    info = json.loads((run / "run.json").read_text())
    assert info["skipped"] == len(skipped)
    assert info["skipped_by_reason"] == {"missing": 1, "unreadable": 1, "too_small": 1, "no_label": len(dropped)}
    assert "listed with the reason" in capsys.readouterr().out
    used = pd.read_csv(run / "splits.csv")
    assert not set(used["image"]) & set(skipped["path"])


def test_a_dataset_whose_images_are_all_unreadable_says_so(tmp_path, capsys):
    from kfundus.cli import main

    rows = []
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(50))
        rows.append(f"{i}.jpg,p{i},{i % 2},{1 - i % 2}")
    (tmp_path / "labels.csv").write_text("image,patient_id,a,b\n" + "\n".join(rows) + "\n")
    args = train_args(
        tmp_path / "labels.csv",
        tmp_path / "out",
        "--no-export",
        "--set",
        "data.source=csv",
        "--set",
        "data.options={}",
        "--set",
        "data.labels=[a, b]",
        "--set",
        "data.skip_unreadable=true",
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(
        r"none of the \d image\(s\) of dataset 'labels' \(train split\) can be used \(\d unreadable\)", err
    )
    assert "Traceback" not in err and "concatenate" not in err


# --------------------------------------------------------------------------- serving and predict


def _jpeg(array, orientation=None):
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(array).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _corner_picture(height=48, width=48):
    image = np.full((height, width, 3), 30, np.uint8)
    image[: height // 2, : width // 2] = 220  # the top-left quadrant is bright when upright
    return image


@pytest.fixture(scope="module")
def corner_bundle(tmp_path_factory):
    """A bundle whose model outputs the brightness of the top-left quadrant of its input (0-1):
    it tells an upright picture from a sideways one. Keras and SavedModel formats."""
    import keras

    from kfundus.data.images import Preprocess
    from kfundus.deploy.saved_model import export_bundle

    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Cropping2D(((0, 16), (0, 16)))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(1, use_bias=False, name="bright_corner")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.full((3, 1), 1 / (3 * 255), np.float32)])
    out = tmp_path_factory.mktemp("bundle")
    pre = Preprocess(image_size=32, crop_fundus=False)
    card = {
        "task": "multilabel",
        "primary_output": None,
        "thresholds": {"method": "fixed", "labels": ["bright_corner"], "values": [0.5]},
        "preprocessing": {"image_size": 32, "crop_fundus": False, "fov_threshold": 15.0},
    }
    export_bundle(
        model,
        out,
        labels=["bright_corner"],
        formats=("keras", "saved_model"),
        check=False,
        preprocess=pre,
        metadata=card,
    )
    return out


def test_bytes_signature_names_the_bad_element_of_a_batch(corner_bundle):
    import tensorflow as tf

    from kfundus.data.pipeline import decode_error_message

    serve = tf.saved_model.load(str(corner_bundle / "saved_model")).signatures["serving_default"]
    good = _jpeg(_corner_picture())
    png = io.BytesIO()
    Image.fromarray(_corner_picture()).save(png, "PNG")
    png = png.getvalue()
    out = serve(image_bytes=tf.constant([good, png]))
    assert out["bright_corner"].shape == (2, 1) and float(out["bright_corner"][0, 0]) > 0.8
    cases = {
        b"": "empty (0 bytes)",
        b"<html>404 not found</html>": "not a JPEG, PNG, GIF or BMP image",
        good[: len(good) // 2]: "truncated JPEG (no end-of-image marker)",
        png[:-30]: "truncated PNG (no IEND chunk)",
        b"II*\x00" + bytes(60): "TIFF, which the decoder does not read",
    }
    for bad, reason in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as err:
            serve(image_bytes=tf.constant([good, good, bad, good]))
        assert f"image_bytes[2]: {reason}" in err.value.message
        assert decode_error_message(err.value).startswith(reason)  # what `kfundus predict` shows


@pytest.mark.parametrize("backend", ["keras", "saved_model"])
def test_predict_and_serving_see_a_sideways_photo_upright(corner_bundle, tmp_path, backend):
    from kfundus.deploy.predict import predict_images

    upright = _corner_picture()
    (tmp_path / "upright.jpg").write_bytes(_jpeg(upright))
    # stored turned 90 degrees counter-clockwise, with the tag (6) that turns it back
    (tmp_path / "tagged.jpg").write_bytes(_jpeg(np.rot90(upright, 1).copy(), orientation=6))
    (tmp_path / "untagged.jpg").write_bytes(_jpeg(np.rot90(upright, 1).copy()))
    result = predict_images(corner_bundle, tmp_path, backend=backend, progress=False).set_index("id")
    prob = {Path(i).stem: p for i, p in result["prob_bright_corner"].items()}
    assert (result["status"] == "ok").all()
    assert prob["upright"] > 0.8 and abs(prob["tagged"] - prob["upright"]) < 0.02
    assert prob["untagged"] < 0.5  # the same pixels without the tag are sideways
