"""Image-report pairs (RET-CLIP data side): readers, tokenizer, packer, tf.data pipeline."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kfundus.data import pairs
from kfundus.data.images import Preprocess, preprocess_image
from kfundus.data.manifest import Manifest
from kfundus.data.pipeline import prepare
from kfundus.data.readers import pairs as readers
from kfundus.errors import ConfigError, DataError
from kfundus.text import TextPacker, make_tokenizer, save_tokenizer


def _png(seed, size=24) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_retclip(folder, images, texts, split="train", urlsafe=False):
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    lines = [f"{pid}\t{encode(a).decode()}\t{encode(b).decode()}" for pid, (a, b) in images.items()]
    (folder / f"{split}_imgs.tsv").write_text("\n".join(lines) + "\n")
    (folder / f"{split}_texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic ODIR set, its pairs, a tokenizer and the decoded pairs."""
    from kfundus.data.synthetic import make_odir

    root = tmp_path_factory.mktemp("pairs")
    data = make_odir(root / "odir", n_patients=24, size=40, seed=3, write_masks=False)
    manifest = readers.odir_pairs(data / "annotation.csv")
    tokenizer = make_tokenizer(corpus=manifest.frame["text"].tolist(), vocabulary_size=300)
    prepared = prepare(manifest, Preprocess(image_size=32), cache_dir=root / "cache", progress=False)
    return data, manifest.frame, tokenizer, prepared, root


def test_read_retclip(tmp_path):
    images = {"p1": (_png(1), _png(2)), "p2": (_png(3), _png(4)), "p3": (_png(5), _png(6))}
    texts = [
        {"text_id": 10, "text": "left eye: cataract. right eye: normal fundus.", "image_ids": ["p1", "p2"]},
        {"text_id": 11, "text": "both eyes glaucoma", "image_ids": ["p2"]},
    ]
    _write_retclip(tmp_path, images, texts, urlsafe=True)
    with pytest.warns(UserWarning, match="p3"):  # p3 has no text
        manifest = readers.read_retclip(tmp_path, extract_dir=tmp_path / "x")
    table = manifest.frame
    assert manifest.level == "patient" and manifest.labels == []
    assert table[["patient_id", "text_id"]].values.tolist() == [["p1", "10"], ["p2", "10"], ["p2", "11"]]
    assert table["text"].iloc[2] == "both eyes glaucoma"
    for row in table.itertuples():
        assert Path(row.left_image).read_bytes() == images[row.patient_id][0]
        assert Path(row.right_image).read_bytes() == images[row.patient_id][1]
        assert row.left_image.endswith(".png")
    # a second read reuses the extracted files; the tsv path works as well as the folder
    before = (tmp_path / "x" / "p1_left.png").stat().st_mtime_ns
    with pytest.warns(UserWarning):
        again = readers.read_retclip(tmp_path / "train_imgs.tsv", extract_dir=tmp_path / "x")
    assert (tmp_path / "x" / "p1_left.png").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(again.frame, table)


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad_base64", r"line 2 of .*train_imgs\.tsv: the right image of patient 'p2' is not valid base64"),
        ("fields", r"line 1 of .*train_imgs\.tsv: expected 3 tab-separated fields"),
        ("json", r"line 2 of .*train_texts\.jsonl: malformed JSON"),
        ("unknown_patient", r"line 1 of .*train_texts\.jsonl: image id 'p9' .*has no line"),
        ("missing_key", r"line 1 of .*train_texts\.jsonl: missing key\(s\) \['image_ids'\]"),
    ],
)
def test_read_retclip_errors(tmp_path, case, message):
    images = {"p1": (_png(1), _png(2)), "p2": (_png(3), _png(4))}
    texts = [
        {"text_id": 1, "text": "cataract", "image_ids": ["p1"]},
        {"text_id": 2, "text": "normal", "image_ids": ["p2"]},
    ]
    _write_retclip(tmp_path, images, texts)
    tsv, jsonl = tmp_path / "train_imgs.tsv", tmp_path / "train_texts.jsonl"
    lines = tsv.read_text().splitlines()
    if case == "bad_base64":
        lines[1] = lines[1] + "!!"
        tsv.write_text("\n".join(lines))
    elif case == "fields":
        lines[0] = lines[0].rsplit("\t", 1)[0]
        tsv.write_text("\n".join(lines))
    elif case == "json":
        jsonl.write_text(jsonl.read_text().splitlines()[0] + '\n{"text_id": 2, "text": \n')
    elif case == "unknown_patient":
        jsonl.write_text(json.dumps({"text_id": 1, "text": "x", "image_ids": ["p9"]}) + "\n")
    else:
        jsonl.write_text(json.dumps({"text_id": 1, "text": "x"}) + "\n")
    with pytest.raises(DataError, match=message):
        readers.read_retclip(tmp_path, extract_dir=tmp_path / "x")


def test_read_pairs_csv(tmp_path):
    for name, seed in (("a_l.png", 1), ("a_r.png", 2), ("b_l.png", 3), ("b_r.png", 4)):
        (tmp_path / name).write_bytes(_png(seed))
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "patient_id,left,right,report,split\na,a_l.png,a_r.png,left eye: cataract.,train\n"
        "b,b_l.png,b_r.png,normal fundus,test\n"
    )
    table = readers.load_pairs("csv", csv).frame
    assert table.columns.tolist()[:5] == [*readers.PAIR_COLUMNS, "split"]
    assert table["left_image"].iloc[1] == str((tmp_path / "b_l.png").resolve())
    assert table["text"].tolist() == ["left eye: cataract.", "normal fundus"]
    csv.write_text("patient_id,left,right,report\na,a_l.png,a_r.png,x\nb,b_l.png,b_r.png,\n")
    with pytest.raises(DataError, match=r"row 3 of .*pairs\.csv: empty report"):
        readers.read_pairs_csv(csv)
    csv.write_text("patient_id,left,right,report\na,a_l.png,missing.png,x\n")
    with pytest.raises(DataError, match=r"row 2: .*missing\.png"):
        readers.read_pairs_csv(csv)
    csv.write_text("patient_id,left,right,text\na,a_l.png,a_r.png,x\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['report'\]"):
        readers.read_pairs_csv(csv)


def _expected_sentence(eye, cell):
    words = [w.strip().lower() for w in re.split("[,，]", cell) if w.strip()]
    return f"{eye} eye: {', '.join(words)}."


def test_odir_pairs_sample(odir_sample):
    manifest = readers.load_pairs("odir", odir_sample)
    assert manifest.labels == list("NDGCAHMO")  # the patient labels: splits stratify on them
    table = manifest.frame
    raw = pd.read_csv(odir_sample / "annotation.csv", dtype=str).set_index("ID")
    assert len(table) == len(raw)
    full_width = [pid for pid in raw.index if "，" in raw.loc[pid, "Left-Diagnostic Keywords"]]
    assert full_width, "the sample should have a keyword cell with a full-width comma"
    for pid in [full_width[0], *raw.index[:3]]:
        row = table.set_index("patient_id").loc[pid]
        expected = (
            f"{_expected_sentence('left', raw.loc[pid, 'Left-Diagnostic Keywords'])} "
            f"{_expected_sentence('right', raw.loc[pid, 'Right-Diagnostic Keywords'])}"
        )
        assert row["text"] == expected
        assert "，" not in row["text"]
    # per-eye labels are those of the eye-level reader with keyword labels
    from kfundus.data.readers import read_odir

    eyes = read_odir(odir_sample / "annotation.csv", level="eye").frame.set_index(["patient_id", "eye"])
    for side in ("left", "right"):
        for label in ("N", "G", "C", "A"):
            got = table.set_index("patient_id")[f"{side}_{label}"]
            want = eyes.xs(side, level="eye")[label].reindex(got.index)
            assert (got.to_numpy() == want.to_numpy()).all()
    with_dx = readers.odir_pairs(odir_sample / "annotation.csv", patient_labels=True, labels=("N", "C")).frame
    assert "right_G" not in with_dx.columns
    cataract = with_dx[with_dx["C"] == 1]["text"]
    assert len(cataract) and cataract.str.contains("diagnosis: .*cataract").all()


def test_synthetic_reports_follow_findings(synth):
    _, table, _, _, _ = synth
    assert table["text"].nunique() >= 8  # the reports vary with the drawn findings
    for side in ("left", "right"):
        sentence = table["text"].str.extract(rf"({side} eye: [^.]*\.)")[0]
        assert (sentence.str.contains("cataract") == (table[f"{side}_C"] == 1)).all()
        assert (sentence.str.contains("normal fundus") == (table[f"{side}_N"] == 1)).all()
    assert ((table["left_C"] != table["right_C"]) | (table["left_G"] != table["right_G"])).any()


def test_tokenizer_offline_and_saved(synth, tmp_path):
    _, table, tokenizer, _, _ = synth
    assert tokenizer.token_to_id("[PAD]") == 0
    texts = table["text"].tolist()[:6] + ["left eye: xylophone retinopathy."]  # one unseen word
    folder = save_tokenizer(tokenizer, tmp_path / "tok")
    again = make_tokenizer(str(folder))
    a, b = TextPacker(tokenizer, 40)(texts), TextPacker(again, 40)(texts)
    np.testing.assert_array_equal(a["token_ids"].numpy(), b["token_ids"].numpy())
    assert tokenizer.token_to_id("[UNK]") in a["token_ids"].numpy()[-1]
    with pytest.raises(ConfigError, match="corpus="):
        make_tokenizer("wordpiece")
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        make_tokenizer(str(tmp_path / "nowhere"))


def test_preset_name_offline_is_a_clear_error():
    try:
        tokenizer = make_tokenizer("clip_vit_base_patch16")
    except ConfigError as error:
        assert "clip_vit_base_patch16" in str(error) and "local preset folder" in str(error)
    else:  # a network (or a filled keras-hub cache) exists: CLIP's own start/end tokens are used
        packer = TextPacker(tokenizer, 8)
        assert (packer.start_id, packer.end_id) == (
            tokenizer.token_to_id("<|startoftext|>"),
            tokenizer.token_to_id("<|endoftext|>"),
        )
    with pytest.raises(ConfigError, match="no_such_preset_xyz"):
        make_tokenizer("no_such_preset_xyz")


def test_packer_keeps_end_token(synth):
    import keras_hub
    import tensorflow as tf

    _, table, tokenizer, _, _ = synth
    end, start = tokenizer.token_to_id("[END]"), tokenizer.token_to_id("[START]")
    long = " ".join(table["text"].tolist()[:5])
    out = TextPacker(tokenizer, 10)([long, "cataract", ""])
    ids, mask = out["token_ids"].numpy(), out["padding_mask"].numpy()
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (3, 10)
    assert (ids[:, 0] == start).all()
    ends = mask.sum(axis=1) - 1
    assert ids[np.arange(3), ends].tolist() == [end] * 3
    assert ends[0] == 9 and (ids[~mask] == 0).all()
    # CLIP's byte-pair tokenizer: its own start/end tokens, also inside tf.data
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5, "ab</w>": 6}
    clip = keras_hub.tokenizers.CLIPTokenizer(vocabulary=vocab, merges=["a b</w>"])
    packer = TextPacker(clip, 4)
    batch = next(iter(tf.data.Dataset.from_tensor_slices(["a b ab a", "b"]).batch(2).map(packer)))
    assert batch["token_ids"].numpy().tolist() == [[0, 2, 3, 1], [0, 3, 1, 0]]


def test_pair_dataset_shapes_and_flip(synth):
    _, table, tokenizer, prepared, _ = synth
    packer = TextPacker(tokenizer, 24)
    plain = list(pairs.make_pair_dataset(prepared, packer, 10, with_index=True).as_numpy_iterator())
    batch = plain[0]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "left_image": ((10, 32, 32, 3), np.float32),
        "right_image": ((10, 32, 32, 3), np.float32),
        "token_ids": ((10, 24), np.int32),
        "padding_mask": ((10, 24), bool),
        "index": ((10,), np.int64),
    }
    index = np.concatenate([b["index"] for b in plain])
    np.testing.assert_array_equal(index, np.arange(len(table)))
    left = np.concatenate([b["left_image"] for b in plain])
    right = np.concatenate([b["right_image"] for b in plain])
    tokens = np.concatenate([b["token_ids"] for b in plain])
    import tensorflow as tf

    for i in (0, 7):  # the cache holds each row's own images and report
        for side, images in (("left", left), ("right", right)):
            direct = preprocess_image(
                tf.io.read_file(table[f"{side}_image"].iloc[i]), Preprocess(image_size=32)
            ).numpy()
            assert np.abs(direct - images[i]).max() <= 1.0
        np.testing.assert_array_equal(tokens[i], packer(table["text"].iloc[i])["token_ids"].numpy())
    shuffled = pairs.make_pair_dataset(prepared, packer, 8, shuffle=True, seed=1, flip=True, with_index=True)
    flipped_count = 0
    for b in shuffled.as_numpy_iterator():
        for k, i in enumerate(b["index"]):
            if np.array_equal(b["left_image"][k], left[i]):
                assert np.array_equal(b["right_image"][k], right[i])
                np.testing.assert_array_equal(b["token_ids"][k], tokens[i])
            else:  # mirrored AND swapped, with the report's sides swapped
                np.testing.assert_array_equal(b["left_image"][k], right[i][:, ::-1])
                np.testing.assert_array_equal(b["right_image"][k], left[i][:, ::-1])
                swapped = pairs.swap_sides(table["text"].iloc[i])
                assert swapped.startswith("right eye:")
                np.testing.assert_array_equal(b["token_ids"][k], packer(swapped)["token_ids"].numpy())
                flipped_count += 1
    assert 0 < flipped_count < len(table)
    assert sorted(np.concatenate([b["index"] for b in shuffled.as_numpy_iterator()])) == list(range(len(table)))


def test_unreadable_image(synth, tmp_path):
    _, table, tokenizer, _, root = synth
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    table = table.head(6).copy()
    table.loc[2, "right_image"] = str(broken)
    manifest = Manifest(table, [], "multilabel", "pairs")
    row = int(table.loc[2, "source_row"])  # the row of the user's table, not of the frame
    assert row != 2
    with pytest.raises(DataError, match=rf"row {row} of pairs: .*broken\.jpg: corrupt"):
        prepare(manifest, Preprocess(image_size=32), cache_dir=root / "cache", progress=False)
    prepared = prepare(
        manifest, Preprocess(image_size=32), cache_dir=root / "cache", progress=False, skip_unreadable=True
    )
    assert len(prepared) == 5 and prepared.skipped["row"].tolist() == [2]
    packer = TextPacker(tokenizer, 24)
    batch = next(pairs.make_pair_dataset(prepared, packer, 8, with_index=True).as_numpy_iterator())
    assert batch["index"].tolist() == list(range(5))
    expected = packer(prepared.manifest.frame["text"].tolist())["token_ids"].numpy()
    np.testing.assert_array_equal(batch["token_ids"], expected)


def test_load_pairs_options(tmp_path):
    with pytest.raises(ConfigError, match="not an image-report source"):
        readers.load_pairs("tsv", tmp_path)
    with pytest.raises(ConfigError, match=r"\['level'\].*valid options"):
        readers.load_pairs("odir", tmp_path, level="eye")
    with pytest.raises(DataError, match="does not exist"):
        readers.load_pairs("retclip", tmp_path, split="val")


def test_pair_dataset_augments_each_eye_and_refuses_hflip(synth):
    """Augmentation (per eye, training) keeps shapes and range and changes the pixels;
    an in-place horizontal flip is refused (it would swap laterality)."""
    from kfundus.config import Augment

    _, _, tokenizer, prepared, _ = synth
    packer = TextPacker(tokenizer, 24)
    plain = next(iter(pairs.make_pair_dataset(prepared, packer, 4)))
    augmented = next(iter(pairs.make_pair_dataset(prepared, packer, 4, augment=Augment(rotation=20, brightness=0.2))))
    for side in ("left_image", "right_image"):
        a, b = plain[side].numpy(), augmented[side].numpy()
        assert a.shape == b.shape and b.min() >= 0 and b.max() <= 255
        assert np.abs(a - b).mean() > 1.0
    with pytest.raises(ConfigError, match="hflip"):
        pairs.make_pair_dataset(prepared, packer, 4, augment=Augment(hflip=True))
