"""Reading released checkpoints without torch (kfundus.convert): every layout torch and
safetensors write, compared with what torch itself says the files hold (the fixtures of
tests/fixtures/foundation/make_fixtures.py, written in the torch venv); hostile pickles
refused without running them; damaged, wrong and empty files named in the error."""

import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kfundus.convert import convert, identify, looks_like, read_checkpoint, read_state_dict, resolve_converted
from kfundus.convert.keys import check_keys
from kfundus.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "foundation" / "checkpoints"
RETFOUND = Path(__file__).parent / "fixtures" / "foundation" / "retfound"


@pytest.fixture(scope="module")
def expected():
    """What torch holds in the fixtures (bfloat16 widened to float32 by torch itself)."""
    with np.load(FIXTURES / "expected.npz") as data:
        return dict(data)


def assert_same(state, expected, dtype=None):
    assert set(state) == set(expected)
    for key, want in expected.items():
        got = state[key]
        assert got.shape == want.shape, key
        if dtype is None:
            assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            np.testing.assert_array_equal(got, want.astype(dtype), err_msg=key)


@pytest.mark.parametrize("name", ["state.pth", "state.safetensors", "hf", "hf_bin"])
def test_reads_what_torch_wrote(name, expected):
    """float32, float16, bfloat16 (-> float32), int64, bool, 0-d and empty tensors, and
    non-contiguous views sharing one storage (transposed, a strided column, an offset slice)."""
    checkpoint = read_checkpoint(FIXTURES / name, model="test")
    assert_same(checkpoint.state, expected)
    assert checkpoint.state["bf16.weight"].dtype == np.float32
    assert checkpoint.format == (
        "huggingface" if name.startswith("hf") else name.split(".")[-1].replace("pth", "torch-zip")
    )


def test_hugging_face_folder_brings_its_config():
    checkpoint = read_checkpoint(FIXTURES / "hf")
    assert checkpoint.config == {"architecture": "test", "num_classes": 0}
    assert checkpoint.files == [FIXTURES / "hf" / "model.safetensors"]


def test_wrapped_in_model_with_metadata(expected):
    """{"model": sd, "epoch", "args": argparse.Namespace, numpy scalar and array}: the state
    dict is found, the metadata is reported as inert records, nothing is imported for it."""
    checkpoint = read_checkpoint(FIXTURES / "wrapped_model.pth")
    assert_same(checkpoint.state, expected)
    assert checkpoint.wrapper == "model"
    assert checkpoint.extra["epoch"] == "int 3"
    assert "argparse.Namespace" in checkpoint.extra["args"] and "not read" in checkpoint.extra["args"]
    assert "not read" in checkpoint.extra["best"]


def test_module_prefix_and_optimizer_state(expected):
    """DataParallel's ``module.`` prefix under "state_dict", beside an AdamW state."""
    checkpoint = read_checkpoint(FIXTURES / "wrapped_module.pth")
    assert_same(checkpoint.state, expected)
    assert (checkpoint.wrapper, checkpoint.stripped_prefix) == ("state_dict", "module.")
    assert set(checkpoint.extra) >= {"optimizer", "step"}


def test_float16_checkpoint_stays_float16(expected):
    state = read_state_dict(FIXTURES / "fp16.pth")
    floats = {k: v for k, v in expected.items() if v.dtype.kind == "f"}
    assert set(state) == set(floats)
    for key, want in floats.items():
        assert state[key].dtype == np.float16
        np.testing.assert_array_equal(state[key], want.astype(np.float16), err_msg=key)


# ---------------------------------------------------------------------------
# hostile files: refused, and the payload never runs


def torch_zip(path: Path, payload: bytes) -> Path:
    """A file in torch's zip layout whose data.pkl is ``payload``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return path


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsExec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


class Arbitrary:
    """Any importable class: a weights file has no reason to name it."""

    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = {"model": {"w": RunsShell(f"touch {marker}")}}
    else:
        payload = {"state_dict": RunsExec(f"open({str(marker)!r}, 'w').write('x')")}
    evil = torch_zip(tmp_path / "evil.pth", pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError) as error:
        read_state_dict(evil, model="RETFound")
    message = str(error.value)
    assert str(evil) in message and "RETFound" in message
    refused = r"the global (posix|os)\.system" if kind == "os.system" else r"the global (__builtin__|builtins)\.exec"
    assert re.search(refused, message), message
    assert "nothing in the file was run" in message
    assert not marker.exists()
    # what a plain unpickle would have done with the same file: the payload runs (the test is real)
    with zipfile.ZipFile(evil) as archive:
        pickle.loads(archive.read("archive/data.pkl"))
    assert marker.exists()


def test_pickled_objects_are_refused(tmp_path):
    """An arbitrary class, and a whole torch module pickled instead of its state dict."""
    evil = torch_zip(tmp_path / "object.pth", pickle.dumps({"model": Arbitrary()}, protocol=2))
    with pytest.raises(DataError, match=r"object\.pth.*the global tests\.test_convert\.Arbitrary"):
        read_state_dict(evil)
    with pytest.raises(DataError, match=r"module_object\.pth.*torch\.nn\.modules\.linear\.Linear.*state_dict"):
        read_state_dict(FIXTURES / "module_object.pth", model="FLAIR")


def test_bare_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(RunsShell(f"touch {marker}"), protocol=2))
    with pytest.raises(DataError, match="bare pickle.*never unpickles"):
        read_state_dict(evil)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# wrong, damaged and empty files


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.pth: no such file.*asked to read it as RETFound"):
        read_state_dict(tmp_path / "nope.pth", model="RETFound")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_torch_file(tmp_path, cut):
    data = (FIXTURES / "state.pth").read_bytes()
    short = tmp_path / "short.pth"
    short.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DataError, match=r"short\.pth: is (truncated|damaged)"):
        read_state_dict(short, model="RETFound")


def test_truncated_safetensors(tmp_path):
    data = (FIXTURES / "state.safetensors").read_bytes()
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError, match=r"short\.safetensors: is truncated or damaged: tensor"):
        read_state_dict(short)
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(DataError, match="tiny.safetensors"):
        read_state_dict(tmp_path / "tiny.safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(DataError, match=r"notes\.pth: is not a PyTorch checkpoint or safetensors file"):
        read_state_dict(tmp_path / "notes.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.pth: is empty"):
        read_state_dict(tmp_path / "empty.pth")
    other_zip = tmp_path / "photos.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("a.txt", "x")
    with pytest.raises(DataError, match="zip archive but not a PyTorch checkpoint"):
        read_state_dict(other_zip)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="folder without model weights"):
        read_state_dict(tmp_path / "folder")


@pytest.mark.parametrize("name", ["empty.pth", "empty_wrapped.pth"])
def test_empty_state_dict(name):
    with pytest.raises(DataError, match=rf"{name}: holds an empty state dict"):
        read_state_dict(FIXTURES / name, model="FLAIR")


def test_legacy_format_is_named():
    with pytest.raises(DataError, match="older than 1.6"):
        read_state_dict(FIXTURES / "legacy.pth")


def test_dict_without_state_dict(tmp_path):
    buffer = io.BytesIO()
    pickle.dump({"epoch": 3, "notes": "x"}, buffer, protocol=2)
    path = torch_zip(tmp_path / "meta.pth", buffer.getvalue())
    with pytest.raises(DataError, match=r"meta\.pth: holds no state dict: its top-level entries are \{epoch: int 3"):
        read_state_dict(path)


# ---------------------------------------------------------------------------
# key diagnostics


def test_identify_layouts():
    retfound = read_state_dict(RETFOUND / "mae_pretrain.pth")
    assert identify(retfound)[0][0] == "mae"
    assert "MAE pre-training" in looks_like(retfound) and "--from retfound" in looks_like(retfound)
    tuned = read_state_dict(RETFOUND / "finetuned.pth")
    assert identify(tuned)[0][0] == "retfound"
    assert "global-pool + fc_norm, a 3-class head" in looks_like(tuned)
    flair = {
        "vision_model.model.conv1.weight": np.zeros((64, 3, 7, 7)),
        "text_model.model.embeddings.word_embeddings.weight": np.zeros((10, 8)),
    }
    assert identify(flair)[0][0] == "flair"
    resnet = {"conv1.weight": np.zeros((64, 3, 7, 7)), "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1))}
    assert identify(resnet)[0][0] == "torchvision_resnet"
    assert "matches no layout" in looks_like({"a.b": np.zeros(1)})


def test_check_keys_message_names_file_model_keys_and_what_it_is():
    state = read_state_dict(RETFOUND / "finetuned.pth")
    expected = {"vision_model.model.conv1.weight": (64, 3, 7, 7), "cls_token": (1, 1, 64)}
    with pytest.raises(DataError) as error:
        check_keys(state, expected, path="x/finetuned.pth", model="FLAIR", kind="flair")
    message = str(error.value)
    assert message.startswith("x/finetuned.pth is not a FLAIR checkpoint (kfundus convert --from flair)")
    assert "1 missing key(s): vision_model.model.conv1.weight" in message
    assert "unexpected key(s): blocks.0.attn.proj.bias" in message
    assert "shape mismatch(es): cls_token is [1, 1, 32], needs [1, 1, 64]" in message
    assert "It looks like a RETFound / timm VisionTransformer checkpoint" in message
    assert "kfundus convert --from retfound" in message
    report = check_keys(
        state,
        {k: v.shape for k, v in state.items() if k != "head.bias"} | {"extra": (1,)},
        path="p",
        model="m",
        kind="retfound",
        ignore=[r"^head\.bias$"],
        optional=["extra"],
    )
    assert report.ignored == ["head.bias"] and report.missing_optional == ["extra"]


# ---------------------------------------------------------------------------
# convert() and its record


def test_convert_writes_record(tmp_path):
    out = convert("retfound", RETFOUND / "finetuned.pth", tmp_path / "tuned", num_heads=4)
    record = json.loads((out / "conversion.json").read_text())
    import hashlib

    assert record["sha256"] == hashlib.sha256((RETFOUND / "finetuned.pth").read_bytes()).hexdigest()
    assert record["kind"] == "retfound" and record["options"] == {"num_heads": 4}
    assert record["wrapper"] == "model" and "args" in record["other_entries"]
    assert record["seconds"] > 0 and record["peak_memory_mb"] > 0 and record["kfundus_version"]
    assert set(record["files"]) == {"encoder.keras", "config.json", "head.npz"}
    assert "1e-4" in record["parity"]


def test_convert_refuses_unknown_kind_option_and_full_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"--from nope: no converter for that; use one of \[.*'retfound'"):
        convert("nope", RETFOUND / "finetuned.pth", tmp_path / "a")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['heads'\]; valid: \[.*'num_heads'"):
        convert("retfound", RETFOUND / "finetuned.pth", tmp_path / "a", heads=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="already holds files.*--overwrite"):
        convert("retfound", RETFOUND / "finetuned.pth", tmp_path / "full", num_heads=4)
    with pytest.raises(ConfigError, match="files kfundus convert did not write"):
        convert("retfound", RETFOUND / "finetuned.pth", tmp_path / "full", overwrite=True, num_heads=4)
    assert (tmp_path / "full" / "x.txt").exists()


def test_overwrite_leaves_nothing_of_the_earlier_conversion(tmp_path):
    out = convert("retfound", RETFOUND / "finetuned.pth", tmp_path / "out", num_heads=4)
    assert (out / "head.npz").is_file()
    convert("retfound", RETFOUND / "mae_pretrain.pth", out, overwrite=True, num_heads=4)
    assert not (out / "head.npz").exists()  # the pre-training checkpoint has no head
    assert json.loads((out / "conversion.json").read_text())["source"].endswith("mae_pretrain.pth")


def test_resolve_converted(tmp_path, monkeypatch):
    """``retfound:PATH`` converts once into the cache; a bare file or a folder of another kind is refused."""
    monkeypatch.setenv("KFUNDUS_CACHE_DIR", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    import shutil

    shutil.copytree(RETFOUND / "hf", hf)  # heads come from its config.json: no option needed
    folder = resolve_converted(f"retfound:{hf}", "retfound")
    assert folder.parent == tmp_path / "cache" / "converted" and (folder / "encoder.keras").is_file()
    stamp = (folder / "conversion.json").stat().st_mtime_ns
    assert resolve_converted(f"retfound:{hf}", "retfound") == folder
    assert (folder / "conversion.json").stat().st_mtime_ns == stamp  # not converted twice
    assert resolve_converted(str(folder), "retfound") == folder
    with pytest.raises(ConfigError, match="is a checkpoint file, not a converted folder.*retfound:"):
        resolve_converted(str(RETFOUND / "finetuned.pth"), "retfound")
    with pytest.raises(ConfigError, match="holds a converted retfound model; this model needs flair"):
        resolve_converted(str(folder), "flair")
    with pytest.raises(ConfigError, match="no such file"):
        resolve_converted(f"retfound:{tmp_path / 'missing.pth'}", "retfound")
