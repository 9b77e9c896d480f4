"""``kfundus demo --out X`` from an empty folder: everything it writes lands under X."""

from kfundus.cli import main


def test_demo_writes_everything_under_out(tmp_path, monkeypatch, capsys):
    """Regression (issue 18): the demo wrote its exports to ./saved_models, outside --out.
    Run from an empty working folder with the default cache folder pointed at a watched
    one: afterwards the working folder holds only X and the default cache is untouched."""
    work, default_cache = tmp_path / "work", tmp_path / "default-cache"
    work.mkdir()
    default_cache.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("KFUNDUS_CACHE_DIR", str(default_cache))
    assert main(["demo", "--out", "X", "--patients", "16", "--epochs", "1"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["X"]
    assert list(default_cache.iterdir()) == []
    out = work / "X"
    assert {"data", "cache", "runs", "saved_models"} <= {p.name for p in out.iterdir()}
    assert (out / "runs" / "demo_synthetic" / "eval-test" / "report.html").is_file()
    bundle = out / "saved_models" / "demo_synthetic"
    assert (bundle / "model_card.json").is_file() and (bundle / "model.tflite").is_file()
    assert str(out / "runs" / "demo_synthetic" / "eval-test" / "report.html") in capsys.readouterr().out
