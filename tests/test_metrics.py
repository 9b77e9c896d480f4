"""kfundus.metrics against independent computations written here from the definitions."""

import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from kfundus import metrics
from kfundus.errors import ConfigError, DataError
from kfundus.labels import ODIR_LABELS

# --- independent reference implementations -----------------------------------------


def ref_binary_kappa(a, b):
    """Cohen's kappa from the 2x2 table: (p_o - p_e) / (1 - p_e)."""
    a, b = np.asarray(a, int), np.asarray(b, int)
    table = np.array([[np.sum((a == i) & (b == j)) for j in (0, 1)] for i in (0, 1)]) / a.size
    p_o = np.trace(table)
    p_e = table.sum(axis=1) @ table.sum(axis=0)
    return (p_o - p_e) / (1 - p_e)


def ref_auc(y, s):
    """Mann-Whitney: P(score of a positive > score of a negative), ties count one half."""
    y, s = np.asarray(y), np.asarray(s, float)
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def ref_ap(y, s):
    """Average precision without ties: mean over positives of the precision at their rank."""
    order = np.argsort(-np.asarray(s))
    hits = np.asarray(y)[order]
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at[hits == 1].mean())


def ref_quadratic_kappa(a, b, k):
    """1 - sum(W * O) / sum(W * E) with W_ij = (i - j)^2 over grade values 0..k-1."""
    observed = np.zeros((k, k))
    for i, j in zip(a, b):
        observed[i, j] += 1
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    return 1 - (w * observed).sum() / (w * expected).sum()


def youden(y, pred):
    return np.mean(pred[y == 1]) - np.mean(pred[y == 0])


def f1_of(y, pred):
    tp = np.sum(pred[y == 1])
    return 2 * tp / (y.sum() + pred.sum())


@pytest.fixture
def odir_like():
    """Random patient x 8 labels and scores that carry signal, with ties (rounded)."""
    rng = np.random.default_rng(7)
    y = (rng.random((120, 8)) < 0.25).astype(int)
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random(y.shape), 0, 1), 2)
    return y, p


# --- ODIR ---------------------------------------------------------------------------


def test_odir_score_matches_reference(odir_like):
    y, p = odir_like
    score = metrics.odir_score(y, p)
    gt, pred = y.ravel(), (p.ravel() > 0.5).astype(int)
    kappa, acc, auc = ref_binary_kappa(gt, pred), np.mean(gt == pred), ref_auc(gt, p.ravel())
    assert score["kappa"] == pytest.approx(kappa, abs=1e-12)
    assert score["f1"] == pytest.approx(acc, abs=1e-12)  # micro-F1 on a flat vector = accuracy
    assert score["auc"] == pytest.approx(auc, abs=1e-12)
    assert score["final"] == pytest.approx((kappa + acc + auc) / 3, abs=1e-12)
    assert all(type(v) is float for v in score.values())


def test_odir_score_threshold_is_strict():
    y = np.zeros((2, 8), int)
    y[0, 0] = 1
    p = np.full((2, 8), 0.2)
    p[0, 0] = 0.5  # exactly at the threshold: not positive under `pr > 0.5`
    assert metrics.odir_score(y, p)["f1"] == pytest.approx(15 / 16)
    p[0, 0] = 0.51
    assert metrics.odir_score(y, p)["f1"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(10, 7), (10,), (10, 8, 1)])
def test_odir_score_rejects_wrong_shapes(shape):
    with pytest.raises(DataError, match=r"\(patients, 8\)"):
        metrics.odir_score(np.zeros(shape), np.zeros(shape))


def test_write_odir_submission(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.random((5, 8))
    out = metrics.write_odir_submission([937, 938, 939, 940, 941], prob, tmp_path / "sub" / "s.csv")
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "N", "D", "G", "C", "A", "H", "M", "O"]
    assert len(rows) == 1 + 5
    assert rows[3][0] == "939"
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], float), prob, atol=1e-6)
    with pytest.raises(DataError, match="twice"):
        metrics.write_odir_submission([1, 1, 2, 3, 4], prob, tmp_path / "dup.csv")
    with pytest.raises(DataError):
        metrics.write_odir_submission([1, 2, 3], prob, tmp_path / "short.csv")


# --- kappa and thresholds -----------------------------------------------------------


def test_quadratic_kappa_matches_formula():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, 200)
    b = np.clip(a + rng.integers(-2, 3, 200), 0, 4)
    expected = ref_quadratic_kappa(a, b, 5)
    assert metrics.quadratic_kappa(a, b) == pytest.approx(expected, abs=1e-12)
    # one-hot truth and probability predictions are read through argmax
    prob = np.eye(5)[b] * 0.6 + rng.random((200, 5)) * 0.3
    assert metrics.quadratic_kappa(np.eye(5)[a], prob) == pytest.approx(expected, abs=1e-12)


def test_quadratic_kappa_weights_grades_by_value_not_position():
    # grade 2 never occurs: a 1-vs-3 disagreement must still weigh (3 - 1)^2 = 4
    a = np.array([0, 1, 3, 4, 1, 3, 0, 4])
    b = np.array([0, 3, 1, 4, 1, 3, 1, 4])
    expected = ref_quadratic_kappa(a, b, 5)
    assert metrics.quadratic_kappa(a, b, n_classes=5) == pytest.approx(expected, abs=1e-12)
    assert metrics.quadratic_kappa(a, b) == pytest.approx(expected, abs=1e-12)
    assert not math.isclose(cohen_kappa_score(a, b, weights="quadratic"), expected)


@pytest.mark.parametrize("method,objective", [("youden", youden), ("f1", f1_of)])
def test_choose_thresholds_is_optimal_by_brute_force(odir_like, method, objective):
    y, p = odir_like
    chosen = metrics.choose_thresholds(y, p, method=method)
    assert chosen.shape == (8,)
    for k in range(8):
        # every distinct cut: "score >= v" for each observed value v
        best = max(objective(y[:, k], (p[:, k] >= v).astype(int)) for v in np.unique(p[:, k]))
        achieved = objective(y[:, k], (p[:, k] > chosen[k]).astype(int))
        assert achieved == pytest.approx(best, abs=1e-12)
        # the midpoint threshold makes `>` and `>=` agree
        assert np.array_equal(p[:, k] > chosen[k], p[:, k] >= chosen[k])


def test_choose_thresholds_falls_back_without_both_classes(odir_like):
    y, p = odir_like
    y = y.copy()
    y[:, 2] = 0
    y[:, 5] = 1
    chosen = metrics.choose_thresholds(y, p, method="youden")
    assert chosen[2] == 0.5 and chosen[5] == 0.5
    assert np.all(metrics.choose_thresholds(y, p, method="fixed", fixed=0.3) == 0.3)
    with pytest.raises(ConfigError, match="youden"):
        metrics.choose_thresholds(y, p, method="best")


# --- reports ------------------------------------------------------------------------


def test_per_class_metrics_against_counts(odir_like):
    y, p = odir_like
    thresholds = np.linspace(0.3, 0.7, 8)
    table = metrics.per_class_metrics(y, p, ODIR_LABELS, thresholds)
    assert list(table.columns[:2]) == ["label", "support"]
    for col in ("auroc", "ap", "threshold", "sensitivity", "specificity", "precision", "f1"):
        assert col in table.columns
    for k, row in table.iterrows():
        yk, pred = y[:, k], (p[:, k] > thresholds[k]).astype(int)
        assert row["support"] == yk.sum()
        assert row["auroc"] == pytest.approx(ref_auc(yk, p[:, k]), abs=1e-12)
        assert row["sensitivity"] == pytest.approx(pred[yk == 1].mean())
        assert row["specificity"] == pytest.approx(1 - pred[yk == 0].mean())
        assert row["precision"] == pytest.approx(yk[pred == 1].mean())
        assert row["f1"] == pytest.approx(f1_of(yk, pred))
        assert row["kappa"] == pytest.approx(cohen_kappa_score(yk, pred))


def test_average_precision_without_ties():
    rng = np.random.default_rng(3)
    y = (rng.random((80, 3)) < 0.3).astype(int)
    p = rng.random((80, 3)) + 0.4 * y  # continuous: no ties
    table = metrics.per_class_metrics(y, p, ["a", "b", "c"])
    for k in range(3):
        assert table["ap"][k] == pytest.approx(ref_ap(y[:, k], p[:, k]), abs=1e-12)


def test_class_without_positives_is_nan_and_excluded(odir_like):
    y, p = odir_like
    y = y.copy()
    y[:, 5] = 0  # no hypertension in this sample
    y[:, 6] = 1  # every patient has myopia: no negatives
    report = metrics.multilabel_report(y, p, ODIR_LABELS)
    json.dumps(report, allow_nan=False)  # NaN became None
    h = report["per_class"][5]
    assert h["label"] == "H" and h["support"] == 0
    assert h["auroc"] is None and h["ap"] is None and h["sensitivity"] is None
    m = report["per_class"][6]
    assert m["auroc"] is None and m["specificity"] is None and m["sensitivity"] is not None
    assert report["n_classes_excluded"] == 2 and report["excluded_classes"] == ["H", "M"]
    others = [k for k in range(8) if k not in (5, 6)]
    assert report["macro_auroc"] == pytest.approx(np.mean([ref_auc(y[:, k], p[:, k]) for k in others]))
    sens = [np.mean(p[y[:, k] == 1, k] > 0.5) for k in others]
    assert report["macro_sensitivity"] == pytest.approx(np.mean(sens))
    assert report["micro_auroc"] == pytest.approx(ref_auc(y.ravel(), p.ravel()))
    assert report["odir"]["auc"] == pytest.approx(report["micro_auroc"])


def test_odir_block_only_for_odir_labels(odir_like):
    y, p = odir_like
    assert "odir" not in metrics.multilabel_report(y, p, list("abcdefgh"))


def test_binary_report_is_one_column_of_multilabel():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 90)
    p = np.clip(0.3 * y + 0.7 * rng.random(90), 0, 1)
    report = metrics.evaluate_predictions(y, p, ["hr"], "binary", thresholds=0.4)
    pred = (p > 0.4).astype(int)
    assert report["task"] == "binary"
    assert report["kappa"] == pytest.approx(ref_binary_kappa(y, pred))
    assert report["auroc"] == pytest.approx(ref_auc(y, p))
    assert report["sensitivity"] == pytest.approx(pred[y == 1].mean())
    assert report["specificity"] == pytest.approx(1 - pred[y == 0].mean())
    assert report["f1"] == pytest.approx(f1_of(y, pred))
    softmax = np.stack([1 - p, p], axis=1)
    same = metrics.binary_report(np.eye(2)[y], softmax, ["normal", "hr"], threshold=0.4)
    assert same["per_class"] == report["per_class"]


def test_multiclass_report_against_counts():
    rng = np.random.default_rng(5)
    k, n = 4, 150
    y = rng.integers(0, k - 1, n)  # class 3 never occurs in the truth
    p = rng.random((n, k))
    p[np.arange(n), y] += 0.4
    report = metrics.evaluate_predictions(y, p, ["CNV", "DME", "DRUSEN", "NORMAL"], "multiclass", ordinal=True)
    pred = p.argmax(axis=1)
    cm = np.array([[np.sum((y == i) & (pred == j)) for j in range(k)] for i in range(k)])
    assert report["confusion_matrix"] == cm.tolist()
    assert report["accuracy"] == pytest.approx(np.mean(y == pred))
    assert report["balanced_accuracy"] == pytest.approx(np.mean([np.mean(pred[y == c] == c) for c in range(3)]))
    assert report["macro_auroc"] == pytest.approx(np.mean([ref_auc(y == c, p[:, c]) for c in range(3)]))
    assert report["n_classes_excluded"] == 1 and report["excluded_classes"] == ["NORMAL"]
    assert report["quadratic_kappa"] == pytest.approx(ref_quadratic_kappa(y, pred, k))
    json.dumps(report, allow_nan=False)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError, match="shape"):
        metrics.multilabel_report(np.zeros((4, 2)), np.zeros((4, 3)), ["a", "b", "c"])
    with pytest.raises(DataError, match="0/1"):
        metrics.multilabel_report(np.full((4, 2), 2), np.zeros((4, 2)), ["a", "b"])
    with pytest.raises(DataError, match="NaN"):
        metrics.multilabel_report(np.zeros((4, 2)), np.full((4, 2), np.nan), ["a", "b"])
    with pytest.raises(DataError, match="outside"):
        metrics.multiclass_report(np.array([0, 1, 5]), np.zeros((3, 3)), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="multilabel"):
        metrics.evaluate_predictions(np.zeros(3), np.zeros(3), ["a"], "regression")


def test_to_jsonable():
    out = metrics.to_jsonable(
        {"a": np.float32(0.5), "b": np.int64(3), "c": [np.nan, np.inf], "d": np.array([1, 2]), "e": np.bool_(True)}
    )
    assert out == {"a": 0.5, "b": 3, "c": [None, None], "d": [1, 2], "e": True}
    assert type(out["a"]) is float and type(out["b"]) is int
