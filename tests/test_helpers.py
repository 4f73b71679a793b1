"""The shared helpers each live in one place (issue 12, item 6): atomic writes, digests, integer and array
checks, the benchmarks' random-init control; and no module keeps a private copy of them."""
from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrep._atomic import atomic_savefig, atomic_write_json
from diffrep.digests import array_digest, backbone_identity, chunked_digest, json_digest
from diffrep.errors import as_dtype, as_numpy, check_label_range, check_positive_int, dtype_name

from .conftest import make_backbone

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _sources(*folders: str) -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


# ------------------------------------------------------------------------------------------ dtypes
def test_as_dtype_takes_a_torch_dtype_or_its_name_and_refuses_the_rest():
    assert as_dtype(torch.float16) is torch.float16 and as_dtype("float16") is torch.float16
    assert as_dtype("torch.bfloat16") is torch.bfloat16 and dtype_name(torch.float64) == "float64"
    for bad in ("half", "int8", torch.int64, np.float16, None):
        with pytest.raises(ValueError, match=r"dtype: expected a torch dtype or its name, one of \['float16'"):
            as_dtype(bad)
    with pytest.raises(ValueError, match=r"store: expected .* one of \['float16', 'float32'\], got 'float64'"):
        as_dtype("float64", "store", allowed=("float16", "float32"))


def test_public_functions_take_a_dtype_either_way(tmp_path):
    """One convention: every public ``dtype`` argument accepts ``torch.float16`` or ``"float16"`` alike."""
    from diffrep.backbones.checkpoint import save_backbone
    from diffrep.features import FeatureExtractor
    from diffrep.noise import make_noise

    backbone = make_backbone("2d-2level")
    images = torch.rand(2, 1, 16, 16)
    a = FeatureExtractor(backbone, ["mid"], [5], dtype="float16")(images)
    b = FeatureExtractor(backbone, ["mid"], [5], dtype=torch.float16)(images)
    assert all(v.dtype == torch.float16 and torch.equal(v, b[k]) for k, v in a.items())
    for kind in ("gaussian", "simplex", "coarse"):
        g = [torch.Generator().manual_seed(0) for _ in range(2)]
        assert torch.equal(make_noise(kind, (1, 1, 8, 8), generator=g[0], dtype="float64"),
                           make_noise(kind, (1, 1, 8, 8), generator=g[1], dtype=torch.float64))
    save_backbone(backbone, tmp_path / "a", dtype="float16")
    save_backbone(backbone, tmp_path / "b", dtype=torch.float16)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in ("config.json", "model.safetensors"))


def test_public_dtype_parameters_are_annotated_str_or_torch_dtype():
    """No public function of the library annotates ``dtype`` as a torch dtype only (or a string only)."""
    offenders = []
    for path, source in _sources("diffrep").items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_") or (
                    isinstance(node, ast.FunctionDef) and node.name == "__init__"):
                for arg in node.args.args + node.args.kwonlyargs:
                    if arg.arg == "dtype" and arg.annotation is not None:
                        text = ast.unparse(arg.annotation)
                        if text != "str | torch.dtype":
                            offenders.append(f"{path}:{node.lineno} {node.name}(dtype: {text})")
    assert offenders == []


# ------------------------------------------------------------------------------------------ integers
@pytest.mark.parametrize("value, minimum", [(0, 1), (-1, 0), (True, 0), (1.0, 1), ("3", 1), (1, 2), (None, 1)])
def test_check_positive_int_refuses_naming_the_value(value, minimum):
    with pytest.raises(ValueError, match=rf"n_things: expected an integer >= {minimum}, got {re.escape(repr(value))}"):
        check_positive_int(value, "n_things", minimum=minimum)


def test_check_positive_int_returns_python_ints():
    assert check_positive_int(np.int64(3), "n") == 3 and type(check_positive_int(np.int64(3), "n")) is int
    assert check_positive_int(0, "seed", minimum=0) == 0


def test_no_inline_integer_checks_remain():
    """Every 'isinstance(v, bool) or not isinstance(v, int...) or v < k' check is check_positive_int."""
    inline = re.compile(r"isinstance\((\w[\w.]*), bool\) or not isinstance\(\1, \(?int[\w., ]*\)\)? or \1 < ")
    found = [name for name, text in _sources("diffrep").items()
             if name != "diffrep/errors.py" and inline.search(text)]
    assert found == []


# ------------------------------------------------------------------------------------------ to numpy
def test_as_numpy_tensors_arrays_and_refusals():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    np.testing.assert_array_equal(as_numpy(t, "x"), np.arange(6, dtype=np.float32).reshape(2, 3))
    a = np.ones(3)
    assert as_numpy(a, "x") is a
    assert as_numpy(torch.ones(2, dtype=torch.bfloat16), "x").dtype == np.float32
    with pytest.raises(TypeError, match="maps: expected a numpy array or torch tensor, got list"):
        as_numpy([1, 2], "maps")


# ------------------------------------------------------------------------------------------ labels
def test_check_label_range_is_the_value_check_of_both_label_validators():
    from diffrep.data.brain import check_labels
    from diffrep.features.pixel_store import check_pixel_labels

    y = check_label_range(np.array([[0, 255], [2, 1]], dtype=np.uint8), 3, ignore_index=255, name="y")
    assert y.dtype == torch.int64 and y.tolist() == [[0, 255], [2, 1]]
    bad = np.array([[[0, 5], [9, -1]]])
    for check in (lambda: check_label_range(bad, 3), lambda: check_labels(bad, 3),
                  lambda: check_pixel_labels(bad, 3)):
        with pytest.raises(ValueError, match=r"labels: expected values in 0..2, got out-of-range value\(s\) \[-1, 5, 9\]"):
            check()
    for check in (lambda: check_label_range(bad * 1.0, 3), lambda: check_labels(bad * 1.0, 3),
                  lambda: check_pixel_labels(bad * 1.0, 3)):
        with pytest.raises(TypeError, match="labels: expected an integer label map, got dtype torch.float64"):
            check()


# ------------------------------------------------------------------------------------------ pooling, augmentation
def test_pool_to_is_the_one_adaptive_pooling():
    from diffrep.features.aggregate import pool_map, pool_to

    x = torch.rand(2, 3, 8, 8)
    np.testing.assert_allclose(pool_to(x, (2, 2)), torch.nn.functional.adaptive_avg_pool2d(x, 2))
    assert torch.equal(pool_map(x, 2), pool_to(x, (2, 2)).flatten(1))
    with pytest.raises(ValueError, match=r"feature map: expected \(N, C, \*spatial\) with 1-3 spatial dims"):
        pool_to(torch.rand(1, 1, 2, 2, 2, 2), (1, 1, 1, 1))
    sources = _sources("diffrep")
    assert [n for n, t in sources.items() if "adaptive_avg_pool" in t] == ["diffrep/features/aggregate.py"]


def test_one_brain_augment_adapter():
    from diffrep.anomaly import brain_augment as from_anomaly
    from diffrep.data.augment import brain_augment

    assert from_anomaly is brain_augment
    sources = _sources("diffrep")
    assert [n for n, t in sources.items() if t.count("augment_batch(") > t.count("def augment_batch(")] \
        == ["diffrep/data/anatomy.py", "diffrep/data/augment.py"]  # anatomy: the task's fixed test deformations


# ------------------------------------------------------------------------------------------ digests
def test_array_digest_is_shape_dtype_and_values_and_agrees_for_tensors_and_arrays():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_digest(a) == array_digest(torch.from_numpy(a)) == array_digest(a.copy())
    assert array_digest(a) != array_digest(a.reshape(4, 3))        # shape
    assert array_digest(a) != array_digest(a.astype(np.float64))  # dtype
    b = a.copy()
    b[2, 3] += 1
    assert array_digest(a) != array_digest(b)                       # values
    assert array_digest(a, None) != array_digest(a) != array_digest(None, a)
    assert array_digest(a[:, ::2]) == array_digest(np.ascontiguousarray(a[:, ::2]))


def test_chunked_digest_equals_the_whole_arrays_digest():
    a = torch.rand(7, 2, 3)
    assert chunked_digest([a[:3], a[3:5], a[5:]]) == array_digest(a)
    with pytest.raises(ValueError, match="chunks: expected dtype float32"):
        chunked_digest([a[:3], a[3:].double()])


def test_backbone_identity_is_stable_and_one_implementation():
    """Saved heads record the identity: its value for a fixed backbone must never change."""
    backbone = make_backbone("2d-2level")
    assert backbone_identity(backbone) == "1cec6666e850a0bb"
    other = make_backbone("2d-2level", seed=1)
    assert backbone_identity(other) != backbone_identity(backbone)
    from diffrep.features.cache import backbone_identity as reexported

    assert reexported is backbone_identity


def test_json_digest_ignores_key_order():
    assert json_digest({"a": 1, "b": [2, 3]}) == json_digest({"b": [2, 3], "a": 1}) != json_digest({"a": 2, "b": [2, 3]})
    assert len(json_digest({}, length=20)) == 20


def test_hashing_only_in_the_digest_modules():
    """hashlib is used in diffrep.digests and diffrep._provenance (code digests) only; the anomaly
    scorers' per-image noise seed is a seed, not an identity."""
    allowed = {"diffrep/digests.py", "diffrep/_provenance.py", "diffrep/anomaly/reconstruction.py"}
    users = {name for name, text in _sources("diffrep", "benchmarks").items() if re.search(r"^import hashlib", text, re.M)}
    assert users <= allowed, users - allowed


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_json_and_figure_leave_the_old_file_on_failure(tmp_path):
    target = atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert target.read_text() == '{\n  "a": 1\n}\n' and os.listdir(tmp_path) == ["r.json"]

    class Failing:
        def savefig(self, path, **options):
            Path(path).write_bytes(b"half")
            raise OSError("disk full")

    (tmp_path / "f.png").write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_savefig(Failing(), tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.png", "r.json"]


def test_atomic_savefig_keeps_the_format_of_the_target(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    atomic_savefig(fig, tmp_path / "x.png", dpi=20)
    plt.close(fig)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_files_are_written_through_diffrep_atomic():
    """No module writes a result by write_text/savefig/os.replace of its own (diffrep._atomic does it)."""
    pattern = re.compile(r"\.write_text\(|(?<!atomic_)\bsavefig\(|os\.replace\(|\.replace\(path\)")
    allowed = {"diffrep/_atomic.py", "diffrep/features/stream.py"}  # stream: renames its finished .partial file
    offenders = []
    for name, text in _sources("diffrep", "benchmarks").items():
        if name in allowed:
            continue
        tree = ast.parse(text)
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and pattern.search(lines[node.lineno - 1]) \
                    and "def savefig" not in lines[node.lineno - 1]:
                offenders.append(f"{name}:{node.lineno}")
    assert sorted(set(offenders)) == []


def test_benchmark_write_json_is_atomic(tmp_path, monkeypatch):
    import common

    path = common.write_json({"x": 1.5}, tmp_path / "out" / "r.json")
    assert path.read_text() == '{\n  "x": 1.5\n}\n'
    with pytest.raises(TypeError):
        common.write_json({"x": object()}, path)
    assert path.read_text() == '{\n  "x": 1.5\n}\n' and os.listdir(path.parent) == ["r.json"]


# ------------------------------------------------------------------------------------------ benchmarks' control
def test_random_init_control_differs_from_the_backbone_and_refuses_a_twin():
    import common

    from diffrep.backbones import Backbone, BackboneConfig

    from .conftest import TINY_CONFIGS

    trained = make_backbone("2d-2level")
    control = common.random_init_control(trained, seed=3)
    assert backbone_identity(control) != backbone_identity(trained)
    assert control.config.unet == trained.config.unet and "torch.manual_seed(3)" in control.config.provenance["note"]
    assert backbone_identity(common.random_init_control(trained, seed=3)) == backbone_identity(control)
    torch.manual_seed(5)
    untrained = Backbone(BackboneConfig(unet=TINY_CONFIGS["2d-2level"]))
    with pytest.raises(ValueError, match=r"torch.manual_seed\(5\).*untrained; pass --control-seed with another seed"):
        common.random_init_control(untrained, seed=5, seed_option="--control-seed")


def test_every_benchmark_uses_the_one_random_init_control():
    sources = _sources("benchmarks")
    assert [n for n, t in sources.items() if "def random_init_control" in t or "def random_control" in t] \
        == ["benchmarks/common.py"]
    users = {n for n, t in sources.items() if "random_init_control(" in t} - {"benchmarks/common.py"}
    assert users == {"benchmarks/anomaly_brain.py", "benchmarks/classification.py", "benchmarks/segmentation_brain.py",
                     "benchmarks/segmentation_descriptors.py", "benchmarks/segmentation_anatomy.py"}


def test_paired_ratio_pairs_rounds_and_alternation_reverses_the_order():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import interleaved_medians, paired_ratio

    timings = {"a": {"samples_s": [2.0, 4.0, 6.0]}, "b": {"samples_s": [1.0, 4.0, 2.0]}}
    result = paired_ratio(timings, "a", "b")
    assert result["median"] == 2.0 and result["rounds"] == 3  # ratios 2, 1, 3 (the ratio of medians is 1)
    order: list[str] = []
    measured = interleaved_medians({"x": lambda: order.append("x"), "y": lambda: order.append("y")}, repeats=2,
                                   warmup=0, alternate=True)
    assert order == ["x", "y", "y", "x"] and len(measured["x"]["samples_s"]) == 2
