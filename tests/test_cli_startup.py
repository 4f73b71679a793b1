"""The command line starts without torch/MONAI; diffrep's public names load lazily; cli and pipelines on top."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "sklearn", "scipy", "nibabel", "safetensors")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_building_the_parser_imports_no_torch_monai_or_sklearn():
    code = ("import json, sys, diffrep.cli; diffrep.cli.build_parser(); "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_help_of_every_command_group_imports_no_torch():
    """``diffrep --help`` and ``diffrep nodes --help`` exit 0 before any heavy import."""
    for argv in (["--help"], ["nodes", "--help"]):
        code = ("import sys\nfrom diffrep.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
                "    code = e.code\nprint('torch' in sys.modules, 'monai' in sys.modules, code)" % argv)
        done = _python(code)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "False False 0", (argv, done.stdout[-300:])


def test_python_m_diffrep_cli_runs_main():
    done = subprocess.run([sys.executable, "-m", "diffrep.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for command in ("nodes", "extract", "train", "import-monai", "demo", "anomaly", "probe", "segment", "zoo"):
        assert command in done.stdout


def test_import_diffrep_is_lazy_and_its_public_names_still_work():
    done = _python("import sys, diffrep; print('torch' in sys.modules, 'monai' in sys.modules)")
    assert done.returncode == 0 and done.stdout.split() == ["False", "False"], done.stderr
    import diffrep
    from diffrep.backbones import load_backbone
    from diffrep.features import FeatureExtractor, pool

    assert diffrep.FeatureExtractor is FeatureExtractor and diffrep.load_backbone is load_backbone
    assert diffrep.pool is pool
    assert set(diffrep.__all__) <= set(dir(diffrep))
    for name in diffrep.__all__:
        assert getattr(diffrep, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffrep.nope  # noqa: B018


def test_cli_vocabularies_equal_the_library_constants():
    """The option vocabularies spelled in the CLI (so the parser needs no torch) are the library's."""
    from diffrep import noise
    from diffrep.anomaly import reconstruction
    from diffrep.cli import anomaly, build_parser, probe
    from diffrep.features import noise_policy
    from diffrep.features.cache import DEFAULT_CACHE_DIR
    from diffrep.pipelines import probe as probe_pipeline
    from diffrep.pipelines import segmentation

    assert (anomaly.REVERSE_MODES, anomaly.NOISE_TYPES, anomaly.NOISE_POLICIES, anomaly.RESIDUALS) == (
        reconstruction.REVERSE_MODES, noise.EPS_NOISE_TYPES, noise_policy.RECONSTRUCTION_POLICIES,
        reconstruction.RESIDUALS)
    assert probe.DATASETS == probe_pipeline.DATASETS
    commands = build_parser()._subparsers._group_actions[0].choices
    probe_help = " ".join(commands["probe"].format_help().split())  # unwrapped
    assert " ".join(map(str, probe_pipeline.DEFAULT_TIMESTEPS)) in probe_help and DEFAULT_CACHE_DIR in probe_help
    fit = commands["segment"]._subparsers._group_actions[0].choices["fit"]
    assert " ".join(map(str, segmentation.DEFAULT_TIMESTEPS)) in " ".join(fit.format_help().split())


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for stmt in block.body for n in ast.walk(stmt)}


def _imports(path: Path) -> set[str]:
    """Absolute names of the diffrep modules ``path`` imports (relative and lazy imports resolved; imports for
    type checking only are left out)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = package.rsplit(".", 1)[0]  # the package a module (or an __init__) sits in
    names = set()
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "diffrep" or n.startswith("diffrep.")}


def test_library_imports_neither_cli_nor_pipelines():
    """cli sits on top, pipelines just below it: no library module imports them (no upward imports)."""
    offenders = []
    for path in sorted((ROOT / "diffrep").rglob("*.py")):
        part = path.relative_to(ROOT / "diffrep").parts[0]
        for name in _imports(path):
            if name.startswith("diffrep.cli") and part != "cli":
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
            if name.startswith("diffrep.pipelines") and part not in ("cli", "pipelines"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []
    # the check sees lazy (in-function) relative imports too
    assert "diffrep.pipelines.segmentation" in _imports(ROOT / "diffrep" / "cli" / "segment.py")


# The layers of the README's "Dependencies run one way": a unit (a package, or a top-level module) imports
# only units of a lower layer and itself. Helpers sit at the bottom and import only other helpers.
LAYERS = [
    {"_atomic", "_types", "_provenance", "_legacy_formats", "config", "devices", "digests", "distributed",
     "errors", "outputs", "diffusion", "noise", "compute"},
    {"backbones", "data"},
    {"features", "sampling", "likelihood", "persistence"},
    {"heads", "anomaly", "training"},
    {"pipelines"},
    {"cli"},
    {"diffrep"},  # the package's lazy public names
]


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else "diffrep"


def test_imports_run_one_way_as_the_readme_says():
    """Every diffrep module, lazy imports included, imports only its own unit or a lower layer."""
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    offenders, units = [], set()
    for path in sorted((ROOT / "diffrep").rglob("*.py")):
        source = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
        units.add(source)
        for name in _imports(path):
            target = _unit(name)
            below = layer.get(target, 99) < layer.get(source, -1) or layer.get(target) == layer.get(source) == 0
            if target != source and not below:
                offenders.append(f"{path.relative_to(ROOT)} ({source}) imports {name} ({target})")
    assert units <= set(layer), f"units without a layer: {sorted(units - set(layer))}"
    assert offenders == []
