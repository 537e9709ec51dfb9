"""Metrics against sklearn, ECE on toy data with known answers, bootstrap CIs, edge cases, figures, ensembles."""

from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from lib import metrics as mt


@pytest.fixture
def binary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    return y, p


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet([1, 1, 1], 300)
    p[np.arange(300), y] += 0.4
    return y, p / p.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- against sklearn


def test_binary_metrics_match_sklearn(binary) -> None:
    y, p = binary
    s = mt.summarize(y, p, "binary", ["tumour"], threshold=0.6, n_boot=200)
    pred = (p >= 0.6).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert s["auc"] == pytest.approx(roc_auc_score(y, p))
    assert s["ap"] == pytest.approx(average_precision_score(y, p))
    assert s["brier"] == pytest.approx(brier_score_loss(y, p))
    assert s["confusion"] == [[tn, fp], [fn, tp]]
    assert s["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert s["specificity"] == pytest.approx(tn / (tn + fp))
    assert s["f1"] == pytest.approx(f1_score(y, pred))
    assert s["label"] == "tumour" and s["threshold"] == 0.6
    json.dumps(s, allow_nan=False)


def test_multiclass_metrics_match_sklearn(multiclass) -> None:
    y, p = multiclass
    names = ["Covid", "Normal", "Viral Pneumonia"]
    s = mt.summarize(y, p, "multiclass", names, n_boot=200)
    assert s["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert s["confusion"] == confusion_matrix(y, p.argmax(1)).tolist()
    for k, name in enumerate(names):
        assert s["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
    assert s["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    lo, hi = s["macro_f1_ci"]
    assert lo <= s["macro_f1"] <= hi
    # class names as y_true give the same result
    by_name = mt.summarize(np.array(names, dtype=object)[y], p, "multiclass", names, n_boot=0)
    assert by_name["macro_f1"] == s["macro_f1"]


def test_multilabel_per_label_and_unknowns() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    p = np.clip(0.4 * y + 0.6 * rng.random((200, 3)), 0, 1)
    y[:10, 0] = -1  # uncertain
    y[10:15, 1] = np.nan  # missing
    s = mt.summarize(y, p, "multilabel", ["liver", "spleen", "kidney"], n_boot=100)
    known = ~np.isin(y[:, 0], (-1,))
    assert s["per_label"]["liver"]["n"] == 190
    assert s["per_label"]["liver"]["auc"] == pytest.approx(roc_auc_score(y[known, 0], p[known, 0]))
    assert s["per_label"]["spleen"]["n"] == 195
    table = mt.per_label_table(s)
    assert list(table.index) == ["liver", "spleen", "kidney"] and table["auc"].between(0.5, 1).all()
    assert s["macro_auc"] == pytest.approx(table["auc"].mean())


def test_fast_bootstrap_metrics_equal_sklearn() -> None:
    """The vectorised AUC/AP used by the bootstrap equal sklearn on resampled data (ties included)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(4, 30))
        y = rng.integers(0, 2, n)
        p = np.round(rng.random(n), 1)  # many ties
        W = rng.integers(0, 3, (3, n))
        auc, ap = mt._auc_weighted(y, p, W), mt._ap_weighted(y, p, W)
        for k, w in enumerate(W):
            i = np.repeat(np.arange(n), w)
            if len(np.unique(y[i])) == 2:
                assert auc[k] == pytest.approx(roc_auc_score(y[i], p[i]))
                assert ap[k] == pytest.approx(average_precision_score(y[i], p[i]))


# ----------------------------------------------------------------------------- calibration


def test_ece_perfectly_calibrated_is_zero() -> None:
    # 40 predictions of 0.25 with 10 positives, 60 of 0.85 with 51 positives: every bin calibrated
    p = np.r_[np.full(40, 0.25), np.full(60, 0.85)]
    y = np.r_[np.ones(10), np.zeros(30), np.ones(51), np.zeros(9)]
    assert mt.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_ece_known_miscalibration() -> None:
    # bin of 0.2 calibrated (10/50), bin of 0.8 observed 0.4 (20/50): ECE = 0.5 * 0 + 0.5 * 0.4 = 0.2
    p = np.r_[np.full(50, 0.2), np.full(50, 0.8)]
    y = np.r_[np.ones(10), np.zeros(40), np.ones(20), np.zeros(30)]
    assert mt.expected_calibration_error(y, p) == pytest.approx(0.2)
    # always 0.9, never positive: ECE 0.9
    assert mt.expected_calibration_error(np.zeros(30), np.full(30, 0.9)) == pytest.approx(0.9)


def test_calibration_bins_match_sklearn(binary) -> None:
    y, p = binary
    table = mt.calibration_bins(y, p, 10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(table["frac_pos"], frac)
    np.testing.assert_allclose(table["mean_prob"], mean)
    assert table["count"].sum() == len(y)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_is_seeded(binary) -> None:
    y, p = binary
    auc = roc_auc_score(y, p)
    a = mt.bootstrap_ci(y, p, "auc", n_boot=500, seed=11)
    b = mt.bootstrap_ci(y, p, "auc", n_boot=500, seed=11)
    c = mt.bootstrap_ci(y, p, "auc", n_boot=500, seed=12)
    assert a == b and a != c
    assert a[0] < auc < a[1] and a[1] - a[0] < 0.2
    ap_ci = mt.bootstrap_ci(y, p, "ap", n_boot=300, seed=11)
    assert ap_ci[0] < average_precision_score(y, p) < ap_ci[1]
    groups = np.arange(len(y)) // 4  # clusters of 4 rows
    g = mt.bootstrap_ci(y, p, "auc", n_boot=300, seed=11, groups=groups)
    assert g[0] < auc < g[1]
    custom = mt.bootstrap_ci(y, p, roc_auc_score, n_boot=100, seed=11)
    assert custom[0] < auc < custom[1]


def test_bootstrap_ci_narrows_with_more_data() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (60, 2000):
        y = rng.integers(0, 2, n)
        p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
        lo, hi = mt.bootstrap_ci(y, p, "auc", n_boot=300, seed=0)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


# ----------------------------------------------------------------------------- edge cases


def test_single_class_auc_is_nan_with_warning() -> None:
    y, p = np.ones(20), np.linspace(0, 1, 20)
    with pytest.warns(mt.MetricWarning, match="only class"):
        assert np.isnan(mt.safe_auc(y, p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mt.MetricWarning)
        s = mt.summarize(y, p, "binary", ["x"], n_boot=50)
    assert s["auc"] is None and s["auc_ci"] == [None, None]
    assert s["sensitivity"] == pytest.approx(0.5) and s["specificity"] is None
    json.dumps(s, allow_nan=False)


def test_empty_and_malformed_inputs() -> None:
    with pytest.raises(ValueError, match="empty input"):
        mt.summarize([], [], "binary", ["x"])
    with pytest.raises(ValueError, match="empty input"):
        mt.summarize(np.zeros((0,)), np.zeros((0, 3)), "multiclass", ["a", "b", "c"])
    with pytest.raises(ValueError, match="every label is unknown"):
        mt.safe_auc([-1, -1], [0.2, 0.3])
    with pytest.raises(ValueError, match="3 values but y_prob has 2"):
        mt.safe_auc([0, 1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="task must be"):
        mt.summarize([0, 1], [0.1, 0.9], "regression")
    with pytest.raises(ValueError, match="empty out-of-fold"):
        mt.per_fold(pd.DataFrame(), "binary", ["x"])


# ----------------------------------------------------------------------------- per fold, figures, ensembles


def _oof_binary(binary) -> pd.DataFrame:
    y, p = binary
    fold = np.arange(len(y)) % 4
    return mt.oof_frame(y, p, "binary", ["no", "yes"], fold=fold, group=np.arange(len(y)) // 2)


def test_per_fold_and_pooled(binary) -> None:
    y, p = binary
    oof = _oof_binary(binary)
    assert list(oof.columns) == ["fold", "group", "true_yes", "prob_yes"]
    res = mt.per_fold(oof, "binary", ["no", "yes"], group_col="group", n_boot=100)
    assert set(res["folds"]) == {"0", "1", "2", "3"}
    assert res["pooled"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert res["pooled"]["n_groups"] == len(y) // 2
    fold0 = oof[oof["fold"] == 0]
    assert res["folds"]["0"]["auc"] == pytest.approx(roc_auc_score(fold0["true_yes"], fold0["prob_yes"]))
    aucs = [res["folds"][k]["auc"] for k in "0123"]
    assert res["fold_mean"]["auc"] == pytest.approx(np.mean(aucs))
    assert res["fold_sd"]["auc"] == pytest.approx(np.std(aucs, ddof=1))
    json.dumps(res, allow_nan=False)


def test_figures_overlay_folds_and_pooled(binary, multiclass, tmp_path) -> None:
    curves = mt.fold_curves(_oof_binary(binary), "binary", ["no", "yes"])
    assert list(curves) == ["fold 0", "fold 1", "fold 2", "fold 3", "pooled"]
    for fig in (mt.plot_roc(curves, n_boot=50), mt.plot_pr(curves), mt.plot_calibration(curves)):
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert any(lbl.startswith("pooled") for lbl in labels) and sum(lbl.startswith("fold") for lbl in labels) == 4
        mt.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    y, p = multiclass
    fig = mt.plot_confusion({"fold 0": (y[:100], p[:100].argmax(1)), "pooled": (y, p.argmax(1))},
                           label_names=["a", "b", "c"])
    assert len(fig.axes) == 2
    oof = mt.oof_frame(y, p, "multiclass", ["a", "b", "c"], fold=np.arange(len(y)) % 3)
    mc = mt.fold_curves(oof, "multiclass", ["a", "b", "c"], label="b")
    np.testing.assert_array_equal(mc["pooled"][0], (y == 1).astype(float))
    import matplotlib.pyplot as plt

    plt.close("all")


def test_ensembles() -> None:
    probs = [np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([[0.4, 0.6], [0.2, 0.8]])]
    np.testing.assert_allclose(mt.ensemble_mean(probs), [[0.3, 0.7], [0.4, 0.6]])
    votes = [np.array([0, 1, 2, 1]), np.array([0, 2, 2, 0]), np.array([1, 2, 0, 2])]
    np.testing.assert_array_equal(mt.ensemble_vote(votes), [0, 2, 2, 0])  # last column: 3-way tie -> smallest
    binary_tie = [np.array([[1, 0]]), np.array([[0, 0]])]
    np.testing.assert_array_equal(mt.ensemble_vote(binary_tie), [[0, 0]])  # 1 vs 1 -> 0 (documented)
    with pytest.raises(ValueError, match="shapes differ"):
        mt.ensemble_mean([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError, match="no predictions"):
        mt.ensemble_vote([])
    np.testing.assert_array_equal(mt.predictions_from_probs(probs[0], "multiclass"), [1, 0])
