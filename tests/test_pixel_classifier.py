"""PixelClassifier: estimator contract, votes and uncertainty, bounded training memory, bad input, CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone

from diffrep.features.pixel_store import PixelStore
from diffrep.heads import PixelClassifier, combine_members, segmentation_metrics

REPO = Path(__file__).resolve().parent.parent


def toy(n=4, d=6, size=12, classes=3, seed=0):
    """Descriptors whose first `classes` channels carry a noisy one-hot of the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n, size, size), generator=g)
    x = torch.randn(n, d, size, size, generator=g) * 0.5
    x[:, :classes] += 2.0 * torch.nn.functional.one_hot(y, classes).permute(0, 3, 1, 2).float()
    return x, y


def small(**kw):
    params = dict(num_classes=3, n_members=4, epochs=3, batch_size=32, max_pixels_in_memory=300, seed=0)
    params.update(kw)
    return PixelClassifier(**params)


def test_fit_predict_shapes_and_learning():
    x, y = toy()
    clf = small()
    assert clf.fit(x, y) is clf
    assert clf.n_features_in_ == 6 and clf.classes_.tolist() == [0, 1, 2]
    labels, unc = clf.predict_with_uncertainty(x)
    assert labels.shape == (4, 12, 12) and labels.dtype == np.int64 and unc.shape == (4, 12, 12)
    proba = clf.predict_proba(x.numpy())
    assert proba.shape == (4, 3, 12, 12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert clf.score(x, y) > 0.9
    assert len(clf.loss_curve_) == 3 and len(clf.loss_curve_[0]) == 4


def test_clone_and_get_params():
    clf = small(vote="mean", hidden=(16, 8))
    params = clf.get_params()
    assert params["vote"] == "mean" and params["hidden"] == (16, 8) and params["max_pixels_in_memory"] == 300
    fitted = clf.fit(*toy())
    twin = clone(fitted)
    assert twin.get_params() == params and not hasattr(twin, "ensemble_")
    assert twin.set_params(n_members=2).n_members == 2


def test_same_seed_same_model_and_store_equals_arrays(tmp_path):
    x, y = toy()
    x16 = x.half()
    a = small().fit(x16.float(), y)
    store = PixelStore(tmp_path, {"num_images": 4, "image_shape": [12, 12], "data": "toy"})
    for i in range(4):
        store.write(i, x16[i], y[i])
    b = small().fit(store)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_array_equal(a.predict(x), b.predict(store))


def test_majority_vote_differs_from_mean_probability():
    probs = torch.tensor([[[0.51, 0.49]], [[0.51, 0.49]], [[0.0, 1.0]]])  # (K=3, P=1, C=2)
    majority, mean_prob, entropy = combine_members(probs, "majority")
    mean_label, _, _ = combine_members(probs, "mean")
    assert majority.item() == 0 and mean_label.item() == 1
    torch.testing.assert_close(mean_prob, torch.tensor([[0.34, 0.66]]))
    assert entropy.item() == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    # a 1-1 tie goes to the class with the higher mean probability
    tie = torch.tensor([[[0.6, 0.4]], [[0.1, 0.9]]])
    assert combine_members(tie, "majority")[0].item() == 1
    # the estimator routes its `vote` parameter
    x, y = toy()
    clf = small(vote="mean").fit(x, y)
    np.testing.assert_array_equal(clf.predict(x), clf.predict_proba(x).argmax(axis=1))


def test_uncertainty_is_zero_when_all_members_agree():
    x, y = toy()
    clf = small(n_members=5).fit(x, y)
    _, unc = clf.predict_with_uncertainty(x)
    assert unc.max() > 0  # independently initialised members disagree somewhere
    with torch.no_grad():  # make every member a copy of member 0
        for p in list(clf.ensemble_.weights) + list(clf.ensemble_.biases):
            p.copy_(p[:1].expand_as(p))
        for bn in clf.ensemble_.norms:
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t.view(5, -1)[:1].expand(5, -1).reshape(-1))
    labels, unc = clf.predict_with_uncertainty(x)
    assert np.all(unc == 0.0)
    assert np.all(clf.predict_proba(x).max(axis=1) > 0)


def test_save_load_roundtrip_uses_safetensors_and_json(tmp_path):
    x, y = toy()
    clf = small().fit(x, y)
    clf.save(tmp_path, metadata={"nodes": ["up.1"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "state.safetensors"]
    loaded = PixelClassifier.load(tmp_path)
    assert loaded.get_params() == clf.get_params() and loaded.metadata_ == {"nodes": ["up.1"]}
    np.testing.assert_array_equal(loaded.predict(x), clf.predict(x))


@pytest.mark.parametrize("make, match", [
    (lambda x, y: (x, y[:, :, :-1]), r"expected label maps of the image size \(12, 12\), got \(12, 11\)"),
    (lambda x, y: (x, y.index_fill(0, torch.tensor([0]), 3)),
     r"expected values in 0..2, got out-of-range value\(s\) \[3\]"),
    (lambda x, y: (x, y - 1), r"expected values in 0..2, got out-of-range value\(s\) \[-1\]"),
    (lambda x, y: (x[:0], y[:0]), r"expected at least one image \(N >= 1\), got N = 0"),
    (lambda x, y: (x, y[:2]), r"expected 4 label map\(s\), one per image, got 2"),
    (lambda x, y: (x[0], y[0]), r"expected descriptors of shape \(N, D, H, W\), got \(6, 12, 12\)"),
])
def test_bad_input_raises_value_error_naming_expected_and_got(make, match):
    x, y = toy()
    with pytest.raises(ValueError, match=match):
        small().fit(*make(x, y))


def test_bad_parameters_and_predict_input():
    x, y = toy()
    with pytest.raises(ValueError, match="vote: expected one of"):
        small(vote="median").fit(x, y)
    with pytest.raises(ValueError, match="n_members: expected an integer >= 1, got 0"):
        small(n_members=0).fit(x, y)
    clf = small().fit(x, y)
    with pytest.raises(ValueError, match="expected 6 features per pixel .*, got 5"):
        clf.predict(x[:, :5])
    with pytest.raises(TypeError, match="expected floating-point"):
        clf.predict(y[:, None])


def test_ignored_pixels_do_not_influence_the_fit():
    """Pixels labelled ignore_index are neither a class nor training data: garbage descriptors there change nothing."""
    x, y = toy()
    unlabelled = torch.rand(y.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    y = y.masked_fill(unlabelled, 255)
    a = small(num_classes=None, ignore_index=255).fit(x, y)
    x_garbage = x.clone()
    x_garbage.permute(0, 2, 3, 1)[unlabelled] = 1e3 * torch.randn(int(unlabelled.sum()), x.shape[1])
    b = small(num_classes=None, ignore_index=255).fit(x_garbage, y)
    assert a.classes_.tolist() == [0, 1, 2] and a.class_pixel_counts_.sum() == int((~unlabelled).sum())
    for key, value in a.ensemble_.state_dict().items():
        torch.testing.assert_close(value, b.ensemble_.state_dict()[key], rtol=0, atol=0)
    torch.testing.assert_close(a.mean_, b.mean_)
    assert a.score(x, y) > 0.9  # scored on the labelled pixels only


@pytest.mark.parametrize("shift, kwargs, match", [
    (10, {}, r"expected labels 0..C-1 .*found labels \[10, 11, 12\]"),
    (None, {}, r"found labels \[0, 1, 2, 255\].*ignore_index .*255"),
    (None, {"num_classes": 3}, r"expected values in 0..2, got out-of-range value\(s\) \[255\]"),
    ("all", {"ignore_index": 255}, r"expected at least one labelled pixel, got none \(every pixel is ignore_index 255\)"),
    (0, {"ignore_index": "255"}, r"ignore_index: expected an integer label value or None, got '255'"),
])
def test_labels_outside_0_to_c_minus_1_are_refused(shift, kwargs, match):
    x, y = toy()
    if shift == "all":
        y = torch.full_like(y, 255)
    elif shift is None:
        y = y.clone()
        y[0, 0, :3] = 255
    else:
        y = y + shift
    with pytest.raises(ValueError, match=match):
        small(**{"num_classes": None, **kwargs}).fit(x, y)


def test_num_classes_says_which_labels_are_valid():
    x, y = toy()
    clf = small(num_classes=14).fit(x, y + 10)  # labels 10..12 of a 14-class scheme, on purpose
    assert clf.classes_.tolist() == list(range(14)) and clf.class_pixel_counts_[:10].sum() == 0


def test_non_finite_descriptors_are_refused():
    x, y = toy()
    bad = x.clone()
    bad[:, 0] = float("nan")
    with pytest.raises(ValueError, match=r"X \(the epoch-0 pixel sample\): expected finite descriptors, got \d+ NaN"):
        small().fit(bad, y)
    clf = small().fit(x, y)
    with pytest.raises(ValueError, match=r"pixels: expected finite descriptors, got 144 NaN/Inf"):
        clf.predict(bad[:1])


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "head.json").write_text("{not json"), r"head\.json: expected the JSON written by"),
    (lambda d: (d / "head.json").write_text('{"format": "diffrep-pixel-classifier"}'), r"do not fit together \(KeyError"),
    (lambda d: (d / "head.safetensors").write_bytes(b"junk"), r"head\.safetensors: expected a readable safetensors"),
    (lambda d: _edit_json(d, n_features_in=7), r"do not fit together \(RuntimeError"),
    (lambda d: _nan_weights(d), r"head\.safetensors: expected finite weights, got NaN/Inf in \['ensemble"),
])
def test_garbled_head_folder_is_refused_naming_the_file(tmp_path, damage, match):
    """An earlier head.json + head.safetensors folder (still read): damage in it is named by file."""
    _save_legacy_head(small().fit(*toy()), tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=match):
        PixelClassifier.load(tmp_path)


def test_earlier_head_folder_still_loads_with_equal_predictions(tmp_path):
    x, y = toy()
    clf = small().fit(x, y)
    _save_legacy_head(clf, tmp_path, metadata={"nodes": ["up.1"]})
    loaded = PixelClassifier.load(tmp_path)
    assert loaded.get_params() == clf.get_params() and loaded.metadata_ == {"nodes": ["up.1"]}
    np.testing.assert_array_equal(loaded.predict_proba(x), clf.predict_proba(x))


def _save_legacy_head(clf, directory, metadata=None):
    """Write ``clf`` as PixelClassifier.save did before diffrep.persistence: head.json + head.safetensors."""
    from safetensors.torch import save_file

    tensors = {f"ensemble.{k}": v.detach().cpu().contiguous() for k, v in clf.ensemble_.state_dict().items()}
    tensors["mean"], tensors["scale"] = clf.mean_.contiguous(), clf.scale_.contiguous()
    save_file(tensors, str(directory / "head.safetensors"))
    old_names = {"seed": "random_state", "standardise": "standardize"}  # the parameter names of that time
    params = {old_names.get(k, k): v for k, v in dict(clf.get_params(), hidden=[int(h) for h in clf.hidden]).items()}
    config = {"format": "diffrep-pixel-classifier", "format_version": 1, "params": params,
              "num_classes": len(clf.classes_), "n_features_in": clf.n_features_in_,
              "n_train_images": clf.n_train_images_, "class_pixel_counts": [int(c) for c in clf.class_pixel_counts_],
              "loss_curve": clf.loss_curve_, "metadata": metadata or {}}
    (directory / "head.json").write_text(json.dumps(config, indent=2))


def _edit_json(directory, **changes):
    config = json.loads((directory / "head.json").read_text())
    (directory / "head.json").write_text(json.dumps({**config, **changes}))


def _nan_weights(directory):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "head.safetensors"))
    tensors["ensemble.weights.0"][0, 0, 0] = float("nan")
    save_file(tensors, str(directory / "head.safetensors"))


def test_segmentation_metrics_per_class_iou_and_dice():
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    m = segmentation_metrics(pred, truth, 3)
    assert m["iou"][:2] == [0.5, 2 / 3] and math.isnan(m["iou"][2])
    assert m["dice"][:2] == pytest.approx([2 / 3, 0.8])
    assert m["miou"] == pytest.approx((0.5 + 2 / 3) / 2)


# ----------------------------------------------------------------------------- bounded memory
CHILD = textwrap.dedent("""
    import json, re, sys
    import torch
    torch.set_num_threads(1)
    from diffrep.features.pixel_store import PixelStore
    from diffrep.heads import PixelClassifier

    def kb(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    root, fingerprints = sys.argv[1], json.loads(sys.argv[2])
    peaks = {}
    for mode in ("stream", "naive"):
        open("/proc/self/clear_refs", "w").write("5")  # peak := current RSS
        base = kb("VmRSS")
        peaks[mode] = []
        for fingerprint in fingerprints:  # no reset in between: a later, larger run must not raise the peak
            store = PixelStore(root, fingerprint)
            clf = PixelClassifier(num_classes=3, n_members=2, epochs=2, batch_size=256, max_pixels_in_memory=1024)
            if mode == "stream":
                clf.fit(store)
            else:  # the reference approach: every image's descriptors in one float32 RAM tensor
                x = torch.stack([store.read(i)[0].float() for i in range(len(store))])
                y = torch.stack([store.read_labels(i) for i in range(len(store))])
                clf.fit(x, y)
                del x, y
            peaks[mode].append((kb("VmHWM") - base) / 1024)
    print(json.dumps(peaks))
""")


def _make_store(root: Path, n: int, d: int = 256, size: int = 32) -> dict:
    fingerprint = {"num_images": n, "image_shape": [size, size], "test": "bounded-memory"}
    store = PixelStore(root, fingerprint)
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        store.write(i, torch.randn(d, size, size, generator=g).half(), torch.randint(0, 3, (size, size), generator=g))
    return fingerprint


def _training_peaks_mb(root: Path, fingerprints: list[dict]) -> dict[str, list[float]]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), json.dumps(fingerprints)], cwd=REPO,
                         capture_output=True, text=True, timeout=1700, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1800)  # about 20 s on an idle machine; a fresh interpreter imports torch and MONAI
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_training_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Training on 4 then on 64 labelled images (2 MB -> 32 MB of fp16 descriptors on disk) in a fresh
    process: streaming training's peak RSS rises by far less than the data grows, while the all-in-RAM
    approach, measured the same way right after, rises by about 2 x 60 MB of float32 copies."""
    few = _make_store(tmp_path, 4)
    many = _make_store(tmp_path, 64)
    peaks = _training_peaks_mb(tmp_path, [few, many])  # streaming first, then naive, in a fresh process
    (stream_few, stream_many), (naive_few, naive_many) = peaks["stream"], peaks["naive"]
    assert stream_many - stream_few < 8, (stream_few, stream_many)
    assert naive_many - naive_few > 60, (naive_few, naive_many)  # the same check catches the naive approach


# ------------------------------------------------------------------------------------------ CLI
def test_segment_cli_fit_and_predict(tmp_path):
    import argparse

    from diffrep.cli.segment import add_segment_cli

    from .conftest import make_backbone, make_images

    backbone = make_backbone("2d-2level")
    backbone.save(tmp_path / "bb")
    images = make_images(backbone, n=3, size=16).numpy()
    labels = (images[:, 0] > 0.5).astype(np.int64)
    np.save(tmp_path / "x.npy", images[:, 0])
    np.save(tmp_path / "y.npy", labels)
    parser = argparse.ArgumentParser()
    add_segment_cli(parser.add_subparsers(dest="command"))
    fit = parser.parse_args(["segment", "fit", str(tmp_path / "bb"), "--images", str(tmp_path / "x.npy"),
                             "--labels", str(tmp_path / "y.npy"), "--nodes", "up.0", "up.1", "--timesteps", "5", "50",
                             "--members", "2", "--epochs", "2", "--out", str(tmp_path / "head")])
    assert fit.func(fit) == 0
    assert (tmp_path / "head" / "state.safetensors").is_file()
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    metadata = config["fitted"]["metadata_"]
    assert metadata["nodes"] == ["up.0", "up.1"] and metadata["timesteps"] == [5, 50]
    pred = parser.parse_args(["segment", "predict", str(tmp_path / "head"), "--images", str(tmp_path / "x.npy"),
                              "--out", str(tmp_path / "pred.npy"), "--uncertainty", str(tmp_path / "unc.npy")])
    assert pred.func(pred) == 0
    out = np.load(tmp_path / "pred.npy")
    assert out.shape == (3, 16, 16) and set(np.unique(out)) <= {0, 1}
    assert np.load(tmp_path / "unc.npy").shape == (3, 16, 16)
    bad = parser.parse_args(["segment", "fit", str(tmp_path / "bb"), "--images", str(tmp_path / "x.npy"),
                             "--labels", str(tmp_path / "x.npy"), "--nodes", "up.0", "--timesteps", "5",
                             "--out", str(tmp_path / "h2")])
    with pytest.raises(TypeError, match="expected an integer label map"):
        bad.func(bad)


def test_segmentation_pipeline_is_what_the_cli_runs(tmp_path):
    """fit_segmentation_head + predict_segmentation (the library calls behind `segment fit|predict` and the brain
    benchmark) give the CLI's label maps bit for bit, and the saved metadata is enough to predict again."""
    import torch

    from diffrep.cli import main
    from diffrep.pipelines.segmentation import fit_segmentation_head, load_segmentation_head, predict_segmentation

    from .conftest import make_backbone, make_images

    backbone = make_backbone("2d-2level")
    backbone.save(tmp_path / "bb")
    images = make_images(backbone, n=3, size=16)
    labels = (images[:, 0] > 0.5).long()
    np.save(tmp_path / "x.npy", images.numpy())
    np.save(tmp_path / "y.npy", labels.numpy())
    assert main(["segment", "fit", str(tmp_path / "bb"), "--images", str(tmp_path / "x.npy"), "--labels",
                 str(tmp_path / "y.npy"), "--nodes", "up.0", "up.1", "--timesteps", "5", "50", "--members", "2",
                 "--epochs", "2", "--seed", "3", "--out", str(tmp_path / "cli-head")]) == 0
    assert main(["segment", "predict", str(tmp_path / "cli-head"), "--images", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "cli.npy")]) == 0
    clf, store, metadata = fit_segmentation_head(backbone, images, labels, tmp_path / "store", nodes=["up.0", "up.1"],
                                                 timesteps=[5, 50], num_classes=2, seed=3, members=2, epochs=2,
                                                 backbone_name=str(tmp_path / "bb"))
    assert len(store) == 3 and metadata["nodes"] == ["up.0", "up.1"] and metadata["seed"] == 3
    clf.save(tmp_path / "lib-head", metadata=metadata)
    loaded, loaded_backbone = load_segmentation_head(tmp_path / "lib-head")
    pred, unc = predict_segmentation(loaded, loaded_backbone, images, images_per_batch=2)
    np.testing.assert_array_equal(pred, np.load(tmp_path / "cli.npy"))
    assert pred.shape == unc.shape == (3, 16, 16)
    with torch.no_grad():
        next(loaded_backbone.unet.parameters()).view(-1)[0] += 1.0
    loaded_backbone.save(tmp_path / "other")
    with pytest.raises(ValueError, match="backbone: expected weights with digest"):
        load_segmentation_head(tmp_path / "lib-head", str(tmp_path / "other"))


def test_segment_cli_ignore_index_and_overwrite(tmp_path, capsys):
    """255 marks unlabelled pixels: a 2-class head, not 256; a fitted head or a prediction is replaced only with --overwrite."""
    from diffrep.cli import main

    from .conftest import make_backbone, make_images

    backbone = make_backbone("2d-2level")
    backbone.save(tmp_path / "bb")
    images = make_images(backbone, n=2, size=16).numpy()[:, 0]
    labels = (images > 0.5).astype(np.int64)
    labels[:, :4] = 255
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    fit = ["segment", "fit", str(tmp_path / "bb"), "--images", str(tmp_path / "x.npy"), "--labels",
           str(tmp_path / "y.npy"), "--nodes", "up.1", "--timesteps", "5", "--members", "2", "--epochs", "1",
           "--ignore-index", "255", "--out", str(tmp_path / "head")]
    assert main(fit) == 0
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    head = PixelClassifier.load(tmp_path / "head")
    assert len(head.classes_) == 2 and config["params"]["ignore_index"] == 255
    assert head.class_pixel_counts_.sum() == int((labels != 255).sum())
    assert main(fit) == 2 and "already holds config.json" in capsys.readouterr().err
    assert main(fit + ["--overwrite"]) == 0
    predict = ["segment", "predict", str(tmp_path / "head"), "--images", str(tmp_path / "x.npy"),
               "--out", str(tmp_path / "pred.npy")]
    assert main(predict) == 0
    assert main(predict) == 2 and "already exists" in capsys.readouterr().err
    assert main(predict + ["--overwrite"]) == 0
    assert set(np.unique(np.load(tmp_path / "pred.npy"))) <= {0, 1}
