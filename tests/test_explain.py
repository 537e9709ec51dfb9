"""lib.explain: metrics with known answers, MONAI behaviour we rely on, and a tiny trained model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lib import explain
from lib.io import DataError

# ----------------------------------------------------------------------------- toy models and data


class RegionModel(nn.Module):
    """logit = scale * mean(x over a fixed region, all channels) - bias: only the region matters."""

    def __init__(self, region: np.ndarray, scale: float = 8.0, bias: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("w", torch.as_tensor(region, dtype=torch.float32))
        self.scale, self.bias = scale, bias
        self.conv = nn.Conv2d(1, 1, 1)  # unused; makes it look like a CNN to layer pickers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * self.w).sum((1, 2, 3)) / (self.w.sum() * x.shape[1]) * self.scale - self.bias)[:, None]


def region(h: int = 32, box: tuple[int, int, int, int] = (6, 14, 18, 26)) -> np.ndarray:
    r = np.zeros((h, h), dtype=np.uint8)
    r[box[0]:box[1], box[2]:box[3]] = 1
    return r


def blob_images(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Noisy 'organ' images; positives carry a bright disc at a random place. Returns x, y, lesion masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    xs, masks = [], []
    y = (np.arange(n) % 2).astype(np.float32)
    for i in range(n):
        img = 0.3 + 0.08 * rng.standard_normal((size, size))
        m = np.zeros((size, size), dtype=np.uint8)
        if y[i]:
            cy, cx = rng.integers(6, size - 6, 2)
            m = (((yy - cy) ** 2 + (xx - cx) ** 2) <= 9).astype(np.uint8)
            img = img + 0.6 * m
        xs.append(img)
        masks.append(m)
    return torch.tensor(np.stack(xs)[:, None], dtype=torch.float32), torch.tensor(y), np.stack(masks)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 1))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, np.ndarray]:
    """A tiny CNN trained for a few seconds to find bright discs (the notebook's flow in miniature)."""
    torch.manual_seed(0)
    x, y, masks = blob_images(256, seed=1)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(160):
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx])[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, mt = blob_images(24, seed=2)
    model.eval()
    with torch.no_grad():
        acc = ((model(xt)[:, 0] > 0).float() == yt).float().mean().item()
    assert acc > 0.9, f"toy model did not learn (accuracy {acc:.2f}); the tests below would mean nothing"
    return model, xt, yt, mt


# ----------------------------------------------------------------------------- localisation metrics


def test_map_equal_to_mask_scores_one():
    mask = region()
    assert explain.pointing_game(mask.astype(float), mask, tolerance=0) == 1.0
    assert explain.energy_inside(mask.astype(float), mask) == pytest.approx(1.0)


def test_pointing_tolerance_and_energy_share():
    mask = region(32, (10, 12, 10, 12))
    sal = np.zeros((32, 32))
    sal[10, 15] = 1.0  # 4 pixels right of the lesion's last column (11)
    assert explain.pointing_game(sal, mask, tolerance=3) == 0.0
    assert explain.pointing_game(sal, mask, tolerance=4) == 1.0
    sal[10, 10] = 1.0  # now half the energy is inside
    assert explain.energy_inside(sal, mask) == pytest.approx(0.5)
    assert explain.energy_inside(-sal, mask) != explain.energy_inside(-sal, mask)  # negative only -> NaN


def test_pointing_ties_count_as_expected_hit():
    """A flat-topped map (upsampled coarse Grad-CAM) scores the share of its tied maxima on the lesion, not
    whichever tied pixel comes first in memory."""
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[6:, 6:] = 1
    flat = np.zeros((8, 8))
    flat[0, 0] = flat[7, 7] = 1.0  # two equal peaks, one on the lesion
    assert explain.pointing_game(flat, mask, tolerance=0) == 0.5
    with pytest.raises(ValueError, match="differs"):
        explain.pointing_game(np.ones((4, 4)), mask)
    with pytest.raises(ValueError, match="differs"):
        explain.energy_inside(np.ones((4, 4)), mask)


def test_zero_map_and_missing_lesion_are_nan_not_errors():
    mask = region()
    zero = np.zeros((32, 32))
    assert explain.is_zero_map(zero) and explain.is_zero_map(np.full((4, 4), np.nan))
    assert np.isnan(explain.pointing_game(zero, mask)) and np.isnan(explain.energy_inside(zero, mask))
    assert np.isnan(explain.pointing_game(mask, None)) and np.isnan(explain.energy_inside(mask, np.zeros_like(mask)))
    assert explain.normalise(zero).max() == 0.0


# ----------------------------------------------------------------------------- deletion


def test_deletion_curve_exact_on_region_model():
    """Deleting the region (the map equal to it) first lowers the logit linearly: the curve is known."""
    mask = region()
    n = int(mask.sum())
    model = RegionModel(mask, scale=8.0, bias=4.0)
    e = explain.Explainer(model)
    x = torch.as_tensor(mask, dtype=torch.float32)[None, None].repeat(1, 3, 1, 1)
    fr, pr = explain.deletion_curve(e.prob, x, mask.astype(float), n_steps=32 * 32 // 16, baseline="zero")
    k = np.minimum(np.round(fr * 32 * 32), n)  # region pixels deleted after each step
    expected = 1 / (1 + np.exp(-(8.0 * (n - k) / n - 4.0)))
    np.testing.assert_allclose(pr, expected, atol=1e-5)
    auc_map = explain.curve_auc(fr, pr)
    rand = np.mean([explain.curve_auc(*explain.deletion_curve(e.prob, x, explain.random_map((32, 32), s),
                                                              20, "zero", s)) for s in range(3)])
    inverted = explain.curve_auc(*explain.deletion_curve(e.prob, x, 1.0 - mask, 20, "zero"))
    assert auc_map < rand < inverted


def test_deletion_input_checks_and_baselines():
    x = torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match="map shape"):
        explain.deletion_curve(lambda t: np.zeros(len(t)), x, np.zeros((4, 4)))
    assert torch.allclose(explain.baseline_image(x, 0.25), torch.full_like(x, 0.25))
    blur = explain.baseline_image(x, "blur")
    assert blur.shape == x.shape and blur.std() < x.std()
    with pytest.raises(ValueError, match="baseline"):
        explain.baseline_image(x, "noise")


def test_tissue_baseline_replaces_with_organ_median_inside_the_mask():
    """Masked crop: organ 0.6 with a dark lesion 0.2, zeros outside. 'tissue' deletes the lesion into organ,
    keeps the outside zero; the image mean (0.28 here) would paint a new dark patch instead."""
    x = torch.zeros(1, 2, 16, 16)
    x[..., 2:14, 2:14] = 0.6
    x[..., 5:8, 5:8] = 0.2
    base = explain.baseline_image(x, "tissue")
    assert torch.allclose(base[..., 2:14, 2:14], torch.tensor(0.6))  # the lesion too
    assert (base[..., :2, :] == 0).all() and (base[..., :, 14:] == 0).all()
    assert explain.tissue_level(torch.zeros(1, 1, 4, 4)).item() == 0.0  # empty crop: no division by zero
    assert explain.baseline_image(x, "mean")[0, 0, 0, 0] < 0.6


# ----------------------------------------------------------------------------- occlusion (MONAI pinned)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["gaussian", "mean_img", "tissue"])
def test_occlusion_finds_known_hot_region(channels, mode):
    """Pins MONAI's OcclusionSensitivity as wrapped: positive drop in the region, ~0 elsewhere, for 2D and
    2.5D inputs (MONAI picks its activation from *input* channels; with 3 channels and one logit that gave
    an all-zero map)."""
    mask = region()
    model = RegionModel(mask)
    x = torch.full((1, channels, 32, 32), 0.1)
    x[..., 6:14, 18:26] = 1.0
    e = explain.Explainer(model, mask_size=8, stride=2, occlusion_mode=mode)
    occ = e.occlusion(x)
    assert occ.shape == (32, 32)
    assert occ.max() > 0.05, "occluding the only region that matters must lower the probability"
    assert explain.pointing_game(occ, mask, tolerance=0) == 1.0
    assert explain.energy_inside(occ, mask) > 0.45  # patches that half-cover the region also score
    far = np.ones_like(mask, bool)
    far[:22, 10:] = False  # more than half a mask away from the region
    assert np.abs(occ[far]).max() < 1e-4


def test_monai_occlusion_returns_occluded_probability():
    """Upstream semantics our sign flip relies on: the map is p(occluded), lower where it matters."""
    from monai.visualize import OcclusionSensitivity

    mask = region()
    x = torch.full((1, 1, 32, 32), 0.1)
    x[..., 6:14, 18:26] = 1.0
    occ, _ = OcclusionSensitivity(RegionModel(mask), mask_size=8, overlap=0.75, mode="mean_img", verbose=False,
                                  activate=torch.sigmoid)(x)
    p0 = torch.sigmoid(RegionModel(mask)(x))[0, 0]
    assert occ.shape == (1, 1, 32, 32)
    assert occ[0, 0][mask > 0].mean() < p0 - 0.05
    assert torch.isclose(occ[0, 0, 31, 0], p0, atol=1e-5)


def test_occlusion_rejects_broken_modes():
    with pytest.raises(ValueError, match="mean_patch"):
        explain.Explainer(tiny_cnn(), occlusion_mode="mean_patch")
    with pytest.raises(ValueError, match="stride"):
        explain.Explainer(tiny_cnn(), mask_size=8, stride=9)


# ----------------------------------------------------------------------------- target layers


def test_family_layers_and_override():
    import timm

    x = torch.rand(1, 3, 128, 128)  # 4 x 4 at the last stage: the family default is fine enough
    expected = {"resnet10t": "layer4", "efficientnet_b0": "bn2", "convnext_atto": "stages.3"}
    for name, layer in expected.items():
        model = timm.create_model(name, pretrained=False, in_chans=3, num_classes=1).eval()
        assert explain.find_target_layer(model, x) == layer, name
    assert explain.find_target_layer(model, x, "stages.2") == "stages.2"
    with pytest.raises(ValueError, match="candidate layers"):
        explain.find_target_layer(model, x, "head.fc")


def test_small_input_steps_back_to_a_finer_stage():
    """At 64 px the last stage is 2 x 2 (a map that can only point at a quadrant): the pick steps back along
    timm's feature stages, for 2.5D inputs (8 slices as channels) too; min_map_size=1 keeps the family layer."""
    import timm

    x = torch.rand(1, 8, 64, 64)
    expected = {"resnet10t": "layer3", "efficientnet_b0": "blocks.4", "convnext_atto": "stages.2"}
    for name, layer in expected.items():
        model = timm.create_model(name, pretrained=False, in_chans=8, num_classes=1).eval()
        assert explain.find_target_layer(model, x) == layer, name
        e = explain.Explainer(model)
        assert e.map(x, "gradcam").shape == (1, 64, 64)
    assert explain.find_target_layer(model, x, min_map_size=1) == "stages.3"


def test_generic_model_picks_last_conv_stage(trained):
    model, xt, *_ = trained
    assert explain.find_target_layer(model, xt[:1]) == "4"  # the last Conv2d of the Sequential


def test_model_without_conv_layer_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"no convolutional layer usable for Grad-CAM.*candidate layers"):
        explain.Explainer(mlp).map(torch.rand(1, 3, 16, 16), "gradcam")


# ----------------------------------------------------------------------------- on a trained model


def test_gradcam_beats_random_on_trained_model(trained):
    model, xt, yt, masks = trained
    e = explain.Explainer(model)
    pos = [i for i in range(len(xt)) if yt[i] == 1]
    table, results = explain.explain_batch([e, e], xt[pos], [masks[i] for i in pos], [str(i) for i in pos],
                                           methods=("gradcam", "gradcampp"), progress=False, tolerance=1,
                                           n_steps=16)
    s = explain.summarise(table[table["fold"] == "ensemble"], by=["method"]).set_index("method")
    assert s.loc["gradcam", "pointing"] >= 0.8 > s.loc["random", "pointing"]
    assert s.loc["gradcam", "energy_inside"] > 2 * s.loc["random", "energy_inside"]
    assert s.loc["gradcam", "deletion_auc"] < s.loc["random", "deletion_auc"]
    lo, hi = explain.gain_intervals(table, "gradcam", n_boot=500)["pointing_gain_ci"]
    assert 0 < lo <= s.loc["gradcam", "pointing"] - s.loc["random", "pointing"] <= hi
    assert set(table["fold"].astype(str)) == {"ensemble", "0", "1"}
    assert results[0].maps["gradcam"].shape == (32, 32)


def test_randomisation_check_detects_change(trained):
    model, xt, yt, _ = trained
    i = int(np.flatnonzero(yt.numpy() == 1)[0])
    res = explain.randomisation_check(explain.Explainer(model), xt[i:i + 1], "gradcam", seed=0)
    assert res["spearman"].iloc[0] == pytest.approx(1.0)
    assert list(res["layer"][1:]) == explain.parameter_layers(model)  # output side first
    last = res.iloc[-1]
    assert last["zero_map"] or last["spearman"] < 0.5, res
    assert (res["spearman"].fillna(0)[1:] < 0.95).any()
    assert np.allclose(res["spearman"], res["spearman_support"], equal_nan=True)  # no blank part: same pixels
    # the explainer's own model is untouched
    assert explain.Explainer(model).map(xt[i:i + 1])[0].max() > 0


def test_support_spearman_ignores_the_blank_part_of_a_masked_input():
    """Two unrelated maps that are both zero where a masked crop is blank correlate on the whole image (the
    shared blank comes from the input); on the input's support they do not."""
    x = torch.zeros(1, 2, 32, 32)
    x[0, 1, 8:24, 8:24] = 0.5
    support = explain.input_support(x)
    assert support.sum() == 16 * 16 and explain.input_support(torch.zeros(1, 1, 4, 4)).all()
    rng = np.random.default_rng(0)
    a, b = (np.where(support, 1 + rng.random(support.shape), 0.0) for _ in range(2))
    assert explain.spearman(a, b) > 0.6
    assert abs(explain.spearman(a[support], b[support])) < 0.2


def test_deletion_is_scored_on_inputs_the_model_calls_positive():
    """Deletion gains come from inputs the explained model calls positive; the all-input figure is kept beside."""
    t = pd.DataFrame({"sample_id": list("aabb"), "method": ["gradcam", "random"] * 2, "fold": "ensemble",
                      "pointing": np.nan, "energy_inside": np.nan, "deletion_auc": [0.2, 0.5, 0.6, 0.1],
                      "prob_start": [0.9, 0.9, 0.1, 0.1], "zero_map": False})
    s = explain.summarise(t, threshold=0.5).set_index("method")
    assert s.loc["gradcam", ["n_predicted", "deletion_auc_predicted", "deletion_auc"]].tolist() == \
        pytest.approx([1, 0.2, 0.4])
    g = explain.gains(s.reset_index(), "gradcam")
    assert g["deletion_gain"] == pytest.approx(0.3) and g["deletion_gain_all"] == pytest.approx(-0.1)
    ci = explain.gain_intervals(t, "gradcam", n_boot=200)  # one case called positive: no spread
    assert ci["deletion_gain_ci"] == pytest.approx([0.3, 0.3]) and np.isnan(ci["pointing_gain_ci"]).all()
    none = explain.summarise(t, threshold=0.95)
    assert (none["n_predicted"] == 0).all() and np.isnan(explain.gains(none, "gradcam")["deletion_gain"])


def test_randomised_correlation_is_absolute_and_counts_vanished_maps_as_zero():
    """An inverted map keeps the trained map's structure (|rho| counts); a vanished map has changed (0)."""
    r = pd.DataFrame({"sample_id": list("aabbcc"), "method": "gradcam", "step": [0, 1] * 3,
                      "spearman_support": [1.0, -0.6, 1.0, 0.3, 1.0, np.nan]})
    assert explain.randomised_correlation(r)["gradcam"] == pytest.approx(0.3)


def test_randomisation_study_skips_zero_maps(trained):
    """A zero trained map has no ranks to lose; the study takes the next input so the check is not vacuous."""
    model, xt, yt, _ = trained
    e = explain.Explainer(model)
    xs = torch.cat([torch.zeros(1, 1, 32, 32), xt[yt == 1][:2]])  # a blank image first: Grad-CAM of it is zero
    assert explain.is_zero_map(e.map(xs[:1])[0])
    res = explain.randomisation_study(e, xs, ["blank", "a", "b"], ["gradcam"], n_cases=1, n_steps=3, seed=0)
    assert set(res["sample_id"]) == {"a"} and list(res["step"]) == [0, 1, 2, 3]
    assert not res["zero_map"].iloc[0] and res["spearman"].iloc[-1] < 0.95


def test_explain_case_without_lesion_skips_localisation(trained):
    model, xt, yt, _ = trained
    e = explain.Explainer(model)
    res = explain.explain_case([e, e], xt[:1], None, "neg", methods=("gradcam", "occlusion"), n_steps=4)
    t = pd.DataFrame(res.rows)
    assert t["pointing"].isna().all() and t["energy_inside"].isna().all() and not t["has_lesion"].any()
    assert np.isfinite(t["deletion_auc"]).all() and set(t["method"]) == {"gradcam", "occlusion", "random"}
    s = explain.summarise(t)
    assert (s["n_localised"] == 0).all() and s["pointing"].isna().all()


def test_case_subset_keeps_held_out_studies(tmp_path):
    """``test`` keeps the studies notebook 04 held out from every fold; missing files and bad names are clear."""
    table = pd.DataFrame({"case_id": ["P1_S0", "P2_S0", "P3_S0"], "organ": "liver"})
    cases = explain.Cases(torch.arange(3.0).reshape(3, 1, 1, 1), table, [None, np.ones((1, 1)), None])
    assert explain.case_subset(cases, "all", tmp_path) is cases
    with pytest.raises(DataError, match="no held-out test predictions"):
        explain.case_subset(cases, "test", tmp_path)
    pd.DataFrame({"case_id": ["P2_S0", "P9_S0"]}).to_csv(tmp_path / "test_predictions.csv", index=False)
    held = explain.case_subset(cases, "test", tmp_path)
    assert held.table["case_id"].tolist() == ["P2_S0"] and held.x.flatten().tolist() == [1.0]
    assert held.lesions[0] is not None
    with pytest.raises(ValueError, match="subset must be one of"):
        explain.case_subset(cases, "train", tmp_path)


def test_overlay_png_and_gallery(trained, tmp_path):
    model, xt, yt, masks = trained
    e = explain.Explainer(model)
    res = explain.explain_case([e], xt[1:2], masks[1], "c1", methods=("gradcam",), n_steps=4, per_fold=False)
    path = explain.save_overlay(tmp_path / "c1.png", res)
    assert path.stat().st_size > 1000
    fig = explain.gallery({"TP": [res], "FN": []}, "gradcam", ncols=2)
    assert len(fig.axes) >= 4


def test_slice_mil_gradcam_is_one_map_per_study() -> None:
    import torch

    from lib import models

    model = models.create_model("mil:resnet10t", in_chans=6, num_classes=1)
    ex = explain.Explainer(model)
    x = torch.rand(2, 6, 48, 48)
    assert ex.map(x).shape == (2, 48, 48)
    with pytest.raises(ValueError, match="SliceMIL"):
        ex.map(x, "gradcampp")


def test_multiclass_activation_pickles_into_the_worker_pool():
    """Explanations of a multi-class model (cxr) run in a process pool: the explainer, activation included, must
    pickle."""
    import pickle

    import torch

    act = pickle.loads(pickle.dumps(explain.activation("multiclass")))
    t = torch.tensor([[1.0, 2.0, 0.5]])
    assert torch.allclose(act(t), t.softmax(1))


def test_fast_forward_model_matches_eager_and_stays_behind_when_pickled():
    """Occlusion and probabilities through the traced copy equal the eager model's up to float rounding; the copy is
    not pickled into worker processes (each builds its own) and randomised copies do not trace."""
    import pickle

    from lib import models

    torch.manual_seed(0)
    model = models.create_model("mil:resnet10t", in_chans=4, num_classes=1, channels=[16, 32, 64, 128],
                                stem_width=16)
    model.eval()
    x = torch.rand(3, 4, 32, 32)
    fast = explain.Explainer(model, mask_size=8, stride=4)
    eager = explain.Explainer(model, mask_size=8, stride=4, fast=False)
    np.testing.assert_allclose(fast.prob(x), eager.prob(x), atol=1e-5)
    np.testing.assert_allclose(fast.map(x[:1], "occlusion"), eager.map(x[:1], "occlusion"), atol=1e-5)
    assert fast._forward is not None and fast._forward is not fast.model
    assert eager._forward is None and eager.forward_model(x) is model
    assert pickle.loads(pickle.dumps(fast))._forward is None
    assert fast.map(x[:1]).shape == (1, 32, 32)  # Grad-CAM runs on the eager model, with its hooks
