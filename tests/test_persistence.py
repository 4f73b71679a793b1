"""One saved-model format (diffrep.persistence) for every fitted head and scorer: round trips with equal
outputs, and refusals that name the file (corrupt state, wrong version, another backbone...)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from diffrep.anomaly import (AnomalyScorer, CalibratedScorer, DAEScorer, FeatureDistanceScorer, LikelihoodScorer,
                             MultiLevelScorer, ReconstructionScorer, TypicalityScorer)
from diffrep.backbones.backbone import Backbone
from diffrep.heads import LinearProbe, PixelClassifier
from diffrep.persistence import CONFIG_NAME, STATE_NAME, load_fitted, save_fitted

from .conftest import make_backbone, make_images

DAE_ARCH = dict(channels=(8, 16), strides=(2,), num_res_units=1, progress=False)


def _data() -> tuple[Backbone, torch.Tensor, np.ndarray]:
    backbone = make_backbone("2d-2level")
    images = make_images(backbone, n=4, size=16)
    masks = np.ones((4, 16, 16), dtype=bool)
    masks[:, :2] = False
    return backbone, images, masks


def _probe(_bb, _x, _m):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 7)).astype(np.float32)
    labels = np.array(["cat", "dog", "eel"])[(features[:, 0] > 0).astype(int) + (features[:, 1] > 1)]
    probe = LinearProbe(C=0.5).fit(features, labels)
    return probe, lambda p: [p.predict_proba(features), p.decision_function(features), p.predict(features)]


def _pixel(_bb, _x, _m):
    g = torch.Generator().manual_seed(0)
    descriptors = torch.randn(3, 6, 10, 10, generator=g)
    labels = (descriptors[:, 0] > 0).long() + (descriptors[:, 1] > 0.5).long()
    clf = PixelClassifier(num_classes=3, n_members=3, hidden=(16, 8), epochs=2, max_pixels_in_memory=200).fit(
        descriptors, labels)
    return clf, lambda c: [c.predict_proba(descriptors), *c.predict_with_uncertainty(descriptors)]


def _scorer_outputs(x, m):
    def outputs(scorer):
        result = scorer.score(x, m)
        return [result.maps, result.scores, scorer.raw_maps(x)]
    return outputs


def _reconstruction(bb, x, m):
    scorer = ReconstructionScorer(bb, timestep=6, reverse="ddim", ddim_steps=3, median=3, erode=1).fit(x, m)
    return scorer, _scorer_outputs(x, m)


def _multilevel(bb, x, m):
    scorer = MultiLevelScorer(bb, timesteps=(3, 8), scorer_params={"reverse": "x0", "noise_type": "simplex",
                                                                  "noise": "ensemble(2)"}, combine="max").fit(x, m)
    return scorer, _scorer_outputs(x, m)


def _multilevel_of_scorers(bb, x, m):
    members = [ReconstructionScorer(bb, timestep=4, noise="per_image_ensemble(3)"), FeatureDistanceScorer(bb, ["up.1"], [5], max_pixels=80).fit(x)]
    return MultiLevelScorer(scorers=members).fit(x, m), _scorer_outputs(x, m)


def _knn(bb, x, m):
    scorer = FeatureDistanceScorer(bb, ["up.0", "up.1"], [5, 20], k=2, max_pixels=150, pca_components=4).fit(x, m)
    return scorer, _scorer_outputs(x, m)


def _gaussian(bb, x, m):
    scorer = FeatureDistanceScorer(bb, ["up.1"], [5], method="gaussian", gaussian_size=2).fit(x, m)
    return scorer, _scorer_outputs(x, m)


def _calibrated(bb, x, m):
    scorer = CalibratedScorer(ReconstructionScorer(bb, timestep=5, noise="shared"), bins=3, min_count=4).fit(x, m)
    return scorer, _scorer_outputs(x, m)


def _dae(_bb, x, m):
    scorer = DAEScorer(**DAE_ARCH, steps=3, train_batch_size=2, lr=1e-3, median=3).fit(x, m)
    return scorer, _scorer_outputs(x, m)


def _calibrated_dae(_bb, x, m):
    return CalibratedScorer(DAEScorer(**DAE_ARCH, steps=2, train_batch_size=2), bins=2).fit(x, m), _scorer_outputs(x, m)


def _likelihood(bb, x, m):
    small, masks = x[:2, :, :8, :8], m[:2, :8, :8]  # an ODE solve per call: keep it small and loose
    scorer = LikelihoodScorer(bb, method="ode", correction="png", rtol=0.5, atol=0.5).fit(small, masks)
    return scorer, _scorer_outputs(small, masks)


def _typicality(bb, x, m):
    small, masks = x[:, :, :8, :8], m[:, :8, :8]
    inner = LikelihoodScorer(bb, method="ode", rtol=0.5, atol=0.5, seed=1, batch_size=2)
    return TypicalityScorer(inner, group_size=2, bootstraps=50).fit(small, masks), _scorer_outputs(small[:2], masks[:2])


CASES = {"linear-probe": _probe, "pixel-classifier": _pixel, "reconstruction": _reconstruction,
         "multi-level": _multilevel, "multi-level-of-scorers": _multilevel_of_scorers, "feature-distance-knn": _knn,
         "feature-distance-gaussian": _gaussian, "calibrated": _calibrated, "dae": _dae,
         "calibrated-dae": _calibrated_dae, "likelihood": _likelihood, "typicality": _typicality}
NEEDS_BACKBONE = {"reconstruction", "multi-level", "multi-level-of-scorers", "feature-distance-knn",
                  "feature-distance-gaussian", "calibrated", "likelihood", "typicality"}


def _plain_params(obj) -> dict:
    """get_params without the objects that cannot be compared by value (backbones, nested scorers)."""
    return {k: v for k, v in obj.get_params(deep=False).items()
            if not isinstance(v, (Backbone, AnomalyScorer, list)) or (isinstance(v, list) and not
                                                                      any(isinstance(i, AnomalyScorer) for i in v))}


def test_the_cases_cover_every_saveable_class_and_every_class_with_fit():
    """The round trip below is parametrised over one case (at least) of every class save_fitted takes, and
    every head or scorer class of the library with a ``fit`` is among them."""
    import ast
    from pathlib import Path

    from diffrep.persistence import CLASSES

    backbone, x, m = _data()
    assert {type(make(backbone, x, m)[0]).__name__ for make in CASES.values()} == set(CLASSES)
    root = Path(__file__).resolve().parents[1] / "diffrep"
    with_fit = {node.name for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name == "fit"
                                                         for f in node.body)}
    assert with_fit - {"AnomalyScorer"} <= set(CLASSES)


# The parameter names version 1 wrote (before issue 12 item 3), spelled out here independently of the library's
# alias table (diffrep._legacy_formats.RENAMED_PARAMS): today's name -> the old one.
VERSION_1_NAMES = {"LinearProbe": {"seed": "random_state"},
                   "PixelClassifier": {"seed": "random_state", "standardise": "standardize"},
                   "ReconstructionScorer": {"timestep": "noise_level", "noise_type": "noise",
                                            "noise_type_options": "noise_options"},
                   "MultiLevelScorer": {"timesteps": "levels"}}
# ReconstructionScorer's noise policy was two parameters: per_image_noise and draws.
VERSION_1_POLICY = {"per_image": (True, 1), "shared": (False, 1), "per_image_ensemble(3)": (True, 3),
                    "ensemble(2)": (False, 2)}


def _old_params(cls: str, params: dict) -> dict:
    old = {VERSION_1_NAMES.get(cls, {}).get(k, k): v for k, v in params.items() if k != "noise" or cls != "ReconstructionScorer"}
    if cls == "ReconstructionScorer" and "noise" in params:
        old["per_image_noise"], old["draws"] = VERSION_1_POLICY[params["noise"]]
    if cls == "MultiLevelScorer" and old.get("scorer_params"):
        old["scorer_params"] = _old_params("ReconstructionScorer", old["scorer_params"])
    return old


def _as_version_1(folder) -> None:
    """Rewrite every config.json below ``folder`` as version 1 wrote it: the old parameter names."""
    for path in sorted(folder.rglob(CONFIG_NAME)):
        config = json.loads(path.read_text())
        config["params"] = _old_params(config["class"], config["params"])
        path.write_text(json.dumps({**config, "format_version": 1}))


@pytest.mark.parametrize("written", ["today", "version-1"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_fitted_head_and_scorer_round_trips_with_equal_outputs(tmp_path, case, written):
    """Saved and loaded: the same class, parameters and outputs, bit for bit on CPU; also from a folder with
    the parameter names version 1 wrote (before the renames of issue 12)."""
    backbone, x, m = _data()
    fitted, outputs = CASES[case](backbone, x, m)
    expected = outputs(fitted)
    save_fitted(fitted, tmp_path / "saved")
    assert {CONFIG_NAME, STATE_NAME} <= {p.name for p in (tmp_path / "saved").iterdir()}
    if written == "version-1":
        _as_version_1(tmp_path / "saved")
    loaded = load_fitted(tmp_path / "saved", backbone=backbone if case in NEEDS_BACKBONE else None)
    assert type(loaded) is type(fitted) and _plain_params(loaded) == _plain_params(fitted)
    for got, want in zip(outputs(loaded), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_alias_table_maps_every_old_name_to_a_parameter_of_today():
    import inspect

    from diffrep._legacy_formats import RENAMED_PARAMS, upgrade_params
    from diffrep.persistence import CLASSES

    assert RENAMED_PARAMS == {cls: {old: new for new, old in names.items()} for cls, names in VERSION_1_NAMES.items()}
    for policy, (per_image, draws) in VERSION_1_POLICY.items():
        assert upgrade_params("ReconstructionScorer", {"per_image_noise": per_image, "draws": draws}) == {"noise": policy}
    assert upgrade_params("MultiLevelScorer", {"levels": [3], "scorer_params": {"noise": "simplex", "draws": 2}}) == {
        "timesteps": [3], "scorer_params": {"noise_type": "simplex", "noise": "per_image_ensemble(2)"}}
    for cls, names in RENAMED_PARAMS.items():
        init = getattr(__import__(CLASSES[cls], fromlist=[cls]), cls).__init__
        assert set(names.values()) <= set(inspect.signature(init).parameters), cls


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_truncated_or_corrupt_state_file_is_refused_naming_it(tmp_path, case):
    backbone, x, m = _data()
    save_fitted(CASES[case](backbone, x, m)[0], tmp_path)
    state = tmp_path / STATE_NAME
    data = state.read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 8 + data[8:], b"junk"):
        state.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{STATE_NAME}: expected a readable safetensors file"):
            load_fitted(tmp_path, backbone=backbone)


@pytest.mark.parametrize("change, match", [
    ({"format_version": 3}, r"config\.json: expected format 'diffrep-fitted' version 2 \(or 1\), got 'diffrep-fitted' "
                            r"version 3"),
    ({"format": "diffrep-backbone"}, r"config\.json: expected format 'diffrep-fitted' version 2 \(or 1\), got "
                                     r"'diffrep-backbone'"),
    ({"class": "os.system"}, r"config\.json: expected a class among \[.*\], got 'os.system'"),
])
def test_a_wrong_format_version_or_class_is_refused_naming_the_config(tmp_path, change, match):
    backbone, x, m = _data()
    save_fitted(_calibrated(backbone, x, m)[0], tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        load_fitted(tmp_path, backbone=backbone)


def test_unreadable_config_missing_tensor_and_non_finite_state_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    backbone, x, m = _data()
    save_fitted(_knn(backbone, x, m)[0], tmp_path)
    (tmp_path / CONFIG_NAME).rename(tmp_path / "kept.json")
    with pytest.raises(FileNotFoundError, match=rf"expected .*{CONFIG_NAME}, it does not exist"):
        load_fitted(tmp_path, backbone=backbone)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: expected the JSON written by save_fitted"):
        load_fitted(tmp_path, backbone=backbone)
    (tmp_path / "kept.json").rename(tmp_path / CONFIG_NAME)
    tensors = load_file(str(tmp_path / STATE_NAME))
    bank = tensors.pop("memory_bank_")
    save_file(tensors, str(tmp_path / STATE_NAME))
    with pytest.raises(ValueError, match=r"do not fit together \(KeyError: 'memory_bank_'"):
        load_fitted(tmp_path, backbone=backbone)
    save_file({**tensors, "memory_bank_": bank.index_fill(0, torch.tensor([0]), float("nan"))},
              str(tmp_path / STATE_NAME))
    with pytest.raises(ValueError, match=r"state\.safetensors: expected finite values, got NaN/Inf in \['memory_bank_'\]"):
        load_fitted(tmp_path, backbone=backbone)


@pytest.mark.parametrize("case", sorted(NEEDS_BACKBONE))
def test_another_backbone_is_refused_naming_both_identities(tmp_path, case):
    from diffrep.features.cache import backbone_identity

    backbone, x, m = _data()
    save_fitted(CASES[case](backbone, x, m)[0], tmp_path)
    other = make_backbone("2d-2level", seed=1)
    mine, theirs = backbone_identity(backbone), backbone_identity(other)
    assert mine != theirs
    with pytest.raises(ValueError, match=rf"config\.json: expected the backbone it was fitted on \(identity {mine}, "
                                         rf"source not recorded\), got a backbone with identity {theirs}"):
        load_fitted(tmp_path, backbone=other)
    with pytest.raises(ValueError, match=rf"config\.json: the scorer needs its backbone \(identity {mine}\), saved "
                                         r"without a checkpoint path"):
        load_fitted(tmp_path)


def test_the_recorded_backbone_source_is_loaded_and_checked(tmp_path):
    backbone, x, m = _data()
    backbone.save(tmp_path / "bb")
    scorer, outputs = _calibrated(backbone, x, m)
    scorer.save(tmp_path / "scorer", backbone_source=str(tmp_path / "bb"))
    loaded = CalibratedScorer.load(tmp_path / "scorer")  # the backbone comes from the recorded checkpoint
    for got, want in zip(outputs(loaded), outputs(scorer)):
        np.testing.assert_array_equal(got, want)
    make_backbone("2d-2level", seed=2).save(tmp_path / "bb")  # the checkpoint changed since
    with pytest.raises(ValueError, match=r"scorer/config\.json: expected the backbone it was fitted on .*source .*bb\)"):
        CalibratedScorer.load(tmp_path / "scorer")


def test_refusals_write_nothing(tmp_path):
    """An unfitted object, a parameter that cannot be saved, or another class: no file appears."""
    backbone, x, m = _data()
    with pytest.raises(NotFittedError):
        save_fitted(FeatureDistanceScorer(backbone, ["up.1"], [5]), tmp_path / "a")
    with pytest.raises(NotFittedError):
        save_fitted(CalibratedScorer(DAEScorer(**DAE_ARCH)), tmp_path / "b")
    custom = DAEScorer(model=torch.nn.Conv2d(1, 1, 3, padding=1), steps=1, train_batch_size=2, progress=False).fit(x)
    with pytest.raises(ValueError, match="only a model built from channels/strides/num_res_units can be saved"):
        save_fitted(CalibratedScorer(custom).fit(x), tmp_path / "c")
    probe = LinearProbe(class_weight={0: 1.0, 1: 2.0}).fit(np.eye(4, dtype=np.float32), [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"LinearProbe\.class_weight: expected a JSON value .*got dict"):
        save_fitted(probe, tmp_path / "d")
    with pytest.raises(ValueError, match=r"expected one of \[.*\], got a builtins\.dict"):
        save_fitted({}, tmp_path / "e")
    assert list(tmp_path.iterdir()) == []
    backbone.save(tmp_path / "bb")
    before = {p.name: p.read_bytes() for p in (tmp_path / "bb").iterdir()}
    with pytest.raises(ValueError, match=r"bb/config\.json exists and is not a saved head or scorer \(format "
                                         r"'diffrep-backbone', expected 'diffrep-fitted'\)"):
        save_fitted(probe.set_params(class_weight=None).fit(np.eye(4, dtype=np.float32), [0, 1, 0, 1]), tmp_path / "bb")
    assert {p.name: p.read_bytes() for p in (tmp_path / "bb").iterdir()} == before


def test_loading_asks_for_the_class_it_gets(tmp_path):
    backbone, x, m = _data()
    _probe(backbone, x, m)[0].save(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: expected a saved PixelClassifier, got a saved LinearProbe"):
        PixelClassifier.load(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: expected format 'diffrep-fitted' version 2 \(or 1\), got "
                                         r"'diffrep-backbone'"):
        backbone.save(tmp_path / "bb")
        load_fitted(tmp_path / "bb")


@pytest.mark.parametrize("make, call", [
    (lambda bb: PixelClassifier(), lambda c, x: c.predict(torch.zeros(1, 2, 4, 4))),
    (lambda bb: LinearProbe(), lambda c, x: c.predict(np.zeros((2, 3)))),
    (lambda bb: FeatureDistanceScorer(bb, ["up.1"], [5]), lambda c, x: c.raw_maps(x)),
    (lambda bb: DAEScorer(**DAE_ARCH), lambda c, x: c.raw_maps(x)),
    (lambda bb: DAEScorer(**DAE_ARCH), lambda c, x: c.score(x)),
    (lambda bb: CalibratedScorer(ReconstructionScorer(bb, timestep=5)), lambda c, x: c.raw_maps(x)),
    (lambda bb: MultiLevelScorer(bb, timesteps=(3,)), lambda c, x: c.score(x)),
    (lambda bb: MultiLevelScorer(scorers=[DAEScorer(**DAE_ARCH)], normalise=None), lambda c, x: c.score(x)),
], ids=["pixel-classifier.predict", "linear-probe.predict", "feature-distance.raw_maps", "dae.raw_maps", "dae.score",
        "calibrated.raw_maps", "multi-level.score", "multi-level-of-an-unfitted-dae.score"])
def test_every_method_that_needs_fitting_raises_not_fitted_error(make, call):
    backbone, x, _ = _data()
    with pytest.raises(NotFittedError, match="fit"):
        call(make(backbone), x)


def test_dae_training_settings_are_init_parameters():
    """scikit-learn's rule: fit(X, masks) only; clone keeps the training settings."""
    from sklearn.base import clone

    _, x, _ = _data()
    dae = DAEScorer(**DAE_ARCH, steps=4, train_batch_size=3, lr=2e-3, seed=7)
    again = clone(dae).fit(x)
    assert again.training_ == {**again.training_, "steps": 4, "batch_size": 3, "lr": 2e-3, "seed": 7}
    assert dae.fit(x).loss_history_ == again.loss_history_ and len(again.loss_history_) == 4
    with pytest.raises(TypeError):
        dae.fit(x, None, 10)  # the old fit(..., steps) signature is gone
    with pytest.raises(ValueError, match="train_batch_size: expected an integer >= 1, got 0"):
        DAEScorer(**DAE_ARCH, train_batch_size=0).fit(x)


def test_an_earlier_dae_folder_still_loads_with_equal_maps(tmp_path):
    """config.json (format diffrep-dae) + model.safetensors, as DAEScorer.save wrote before diffrep.persistence."""
    from safetensors.torch import save_file

    _, x, m = _data()
    dae = DAEScorer(**DAE_ARCH, steps=3, train_batch_size=2, lr=1e-3, seed=4, median=3).fit(x, m)
    save_file({k: v.contiguous() for k, v in dae.model_.state_dict().items()}, str(tmp_path / "model.safetensors"))
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dae.get_params().items()
              if k in ("channels", "strides", "num_res_units", "in_channels", "noise_resolution", "noise_std",
                       "erode", "median", "top_fraction", "batch_size")}
    (tmp_path / "config.json").write_text(json.dumps({"format": "diffrep-dae", "format_version": 1, "params": params,
                                                      "training": dae.training_}))
    loaded = DAEScorer.load(tmp_path)
    assert (loaded.steps, loaded.train_batch_size, loaded.lr, loaded.seed, loaded.median) == (3, 2, 1e-3, 4, 3)
    np.testing.assert_array_equal(loaded.score(x, m).maps, dae.score(x, m).maps)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"model\.safetensors: expected a readable safetensors file"):
        DAEScorer.load(tmp_path)
