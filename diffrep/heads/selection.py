"""Choosing feature node(s) and timestep(s) for a linear probe, on a validation split only.

Every candidate (one ``FeatureKey(node, t)`` or a concatenation of several) is scored by fitting a
probe on training features and measuring accuracy on validation features carved from the
training data. :func:`select_node_timestep` never sees test data: its signature has no place for
it. The caller scores the chosen candidate, and only that one, on the test set.

Label-efficient subsets (:func:`sample_per_class`) are drawn from the training part, never from
the validation part.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from sklearn.base import clone

from .._types import FeatureKey
from ..errors import check_positive_int
from .linear_probe import LinearProbe, _as_numpy

Keys = tuple[FeatureKey, ...]
ConcatSpec = Sequence[Sequence[FeatureKey]] | Callable[[list[dict]], Sequence[Sequence[FeatureKey]]]


def key_name(keys: FeatureKey | Sequence[FeatureKey]) -> str:
    """``"up.1@11"`` for one key, ``"up.1@11+up.2@11"`` for a concatenation."""
    keys = (keys,) if isinstance(keys, FeatureKey) else tuple(keys)
    return "+".join(f"{k.node}@{k.timestep}" for k in keys)


def parse_key_name(name: str) -> Keys:
    """Inverse of :func:`key_name`."""
    out = []
    for part in name.split("+"):
        node, sep, t = part.rpartition("@")
        if not sep or not node or not t.lstrip("-").isdigit():
            raise ValueError(f"key name: expected 'node@timestep' parts joined by '+', got {name!r}")
        out.append(FeatureKey(node, int(t)))
    return tuple(out)


def _check_labels(y: Any, name: str) -> np.ndarray:
    y = np.asarray(_as_numpy(y))
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of labels, got shape {y.shape}")
    return y


def carve_validation(n: int, fraction: float = 0.1, seed: int = 0,
                     stratify: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (fit indices, validation indices), seeded, stratified by ``stratify``.

    Both index arrays are sorted. The validation part is ``round(fraction * n)`` samples; with
    ``stratify`` (the labels) every class keeps its proportion.
    """
    from sklearn.model_selection import train_test_split

    check_positive_int(n, "n", minimum=2)
    if not (isinstance(fraction, (float, int)) and 0 < fraction < 1):
        raise ValueError(f"fraction: expected a number strictly between 0 and 1, got {fraction!r}")
    if stratify is not None:
        stratify = _check_labels(stratify, "stratify")
        if stratify.shape[0] != n:
            raise ValueError(f"stratify: expected {n} labels, got {stratify.shape[0]}")
    n_val = int(round(fraction * n))
    if not 1 <= n_val < n:
        raise ValueError(f"fraction: {fraction} of {n} samples leaves an empty fit or validation part")
    try:
        fit_idx, val_idx = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=stratify)
    except ValueError as err:
        raise ValueError(f"carve_validation: cannot carve {n_val} stratified validation samples from {n} ({err})") from err
    return np.sort(fit_idx), np.sort(val_idx)


def sample_per_class(y: Any, k: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of exactly ``k`` samples of every class in ``y``, drawn without replacement.

    Raises ValueError naming the class when a class has fewer than ``k`` samples.
    """
    y = _check_labels(y, "y")
    check_positive_int(k, "labels_per_class")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    short = {c.item(): int(m) for c, m in zip(classes, counts) if m < k}
    if short:
        raise ValueError(f"labels_per_class: expected at least {k} samples of every class, "
                         f"but class(es) {short} have fewer (class: available count)")
    picked = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def stack_features(features: Mapping[FeatureKey, Any], keys: Sequence[FeatureKey], rows: Any = None) -> np.ndarray:
    """Concatenate the (N, C) feature arrays of ``keys`` along channels, as float32 (optionally a row subset)."""
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"keys: {[key_name(k) for k in missing]} not in features; available keys are "
                         f"{[key_name(k) for k in features]}")
    parts = []
    for k in keys:
        value = np.asarray(_as_numpy(features[k]))
        if value.ndim != 2:
            raise ValueError(f"features[{key_name(k)}]: expected pooled vectors of shape (N, C), got {value.shape}")
        parts.append(value if rows is None else value[rows])
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


@dataclass
class SelectionResult:
    """The outcome of a node x timestep selection, all measured on the validation split.

    ``table`` has one row per candidate in evaluation order; ``best`` is the winning key tuple
    (one key for a single node/timestep), with ``best_val_acc``. ``best_single`` and
    ``best_concat`` are the winners within each kind (``best_concat`` is None without
    concatenation candidates).
    """

    table: list[dict]
    best: Keys
    best_val_acc: float
    best_single: Keys
    best_single_val_acc: float
    best_concat: Keys | None = None
    best_concat_val_acc: float | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "table": self.table,
            "best": key_name(self.best), "best_val_acc": self.best_val_acc,
            "best_single": key_name(self.best_single), "best_single_val_acc": self.best_single_val_acc,
            "best_concat": key_name(self.best_concat) if self.best_concat else None,
            "best_concat_val_acc": self.best_concat_val_acc,
            **self.meta,
        }


def _winner(rows: list[dict]) -> dict:
    # highest validation accuracy; ties go to the smaller feature dimension, then to the earlier row
    return min(rows, key=lambda r: (-r["val_acc"], r["dim"], r["order"]))


def select_node_timestep(features_train: Mapping[FeatureKey, Any], y_train: Any,
                         features_val: Mapping[FeatureKey, Any], y_val: Any,
                         candidates: Iterable[FeatureKey] | None = None,
                         concat_candidates: ConcatSpec = (), probe: Any = None,
                         noise_levels: Mapping[int, float] | None = None,
                         progress: bool = False) -> SelectionResult:
    """Score every single key and every concatenation on the validation split; return the table and the choice.

    Args:
        features_train, features_val: ``{FeatureKey: (N, C) array or tensor}`` (pooled vectors)
            for the fit and validation parts of the *training* data.
        y_train, y_val: their labels.
        candidates: the single keys to score (default: every key of ``features_train``).
        concat_candidates: key sequences to concatenate, or a callable that receives the table of
            single-key rows and returns them (e.g. :func:`default_concatenations`).
        probe: an unfitted scikit-learn classifier, cloned for each candidate (default ``LinearProbe()``).
        noise_levels: ``{t: sqrt(1 - abar_t)}`` to record in the table.
        progress: show a tqdm bar.
    """
    y_train, y_val, candidates = _check_selection_inputs(features_train, y_train, features_val, y_val, candidates)
    probe = LinearProbe() if probe is None else probe
    levels = dict(noise_levels or {})
    table: list[dict] = []

    def score(keys: Keys, kind: str) -> dict:
        start = time.perf_counter()
        Xtr = stack_features(features_train, keys)
        model = clone(probe).fit(Xtr, y_train)
        val_acc = float(model.score(stack_features(features_val, keys), y_val))
        row = {"key": key_name(keys), "kind": kind, "nodes": [k.node for k in keys],
               "timesteps": [k.timestep for k in keys],
               "noise_levels": [levels.get(k.timestep) for k in keys],
               "dim": int(Xtr.shape[1]), "val_acc": val_acc,
               "fit_seconds": round(time.perf_counter() - start, 3), "order": len(table)}
        table.append(row)
        return row

    singles = [(k,) for k in dict.fromkeys(FeatureKey(*k) for k in candidates)]
    for keys in _bar(singles, progress):
        score(keys, "single")
    single_rows = list(table)
    concats = concat_candidates(single_rows) if callable(concat_candidates) else concat_candidates
    for keys in _bar(_new_concatenations(concats, set(singles), features_train, features_val), progress):
        score(keys, "concat")
    return _selection_result(table, n_fit=int(y_train.shape[0]), n_val=int(y_val.shape[0]))


def _check_selection_inputs(features_train: Mapping[FeatureKey, Any], y_train: Any,
                            features_val: Mapping[FeatureKey, Any], y_val: Any,
                            candidates: Iterable[FeatureKey] | None) -> tuple[np.ndarray, np.ndarray, list]:
    """Checked ``(y_train, y_val, candidates)``: every candidate in both feature mappings, one row per label."""
    y_train = _check_labels(y_train, "y_train")
    y_val = _check_labels(y_val, "y_val")
    if not features_train:
        raise ValueError("features_train: expected at least one feature key, got an empty mapping")
    candidates = list(features_train) if candidates is None else list(candidates)
    if not candidates:
        raise ValueError("candidates: expected at least one FeatureKey")
    for name, feats, y in (("features_train", features_train, y_train), ("features_val", features_val, y_val)):
        for k in candidates:
            if k not in feats:
                raise ValueError(f"{name}: key {key_name(k)} is missing; available keys are "
                                 f"{[key_name(x) for x in feats]}")
            rows = np.shape(feats[k])[0]
            if rows != y.shape[0]:
                raise ValueError(f"{name}[{key_name(k)}]: expected {y.shape[0]} rows (one per label), got {rows}")
    return y_train, y_val, candidates


def _bar(items: list, progress: bool) -> Iterable:
    """``items``, wrapped in a tqdm bar when ``progress``."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="probe selection", leave=False)


def _new_concatenations(concats: Iterable[Sequence[FeatureKey]], seen: set, features_train: Mapping[FeatureKey, Any],
                        features_val: Mapping[FeatureKey, Any]) -> list[Keys]:
    """The checked concatenations of ``concats`` not yet in ``seen`` (which grows), in order, each once."""
    todo = []
    for combo in concats:
        keys = tuple(FeatureKey(*k) for k in combo)
        if len(keys) < 2:
            raise ValueError(f"concat_candidates: expected two or more keys per concatenation, got {key_name(keys)!r}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"concat_candidates: repeated key in {key_name(keys)!r}")
        for k in keys:
            if k not in features_train or k not in features_val:
                raise ValueError(f"concat_candidates: key {key_name(k)} is not in the features")
        if keys not in seen:
            seen.add(keys)
            todo.append(keys)
    return todo


def _selection_result(table: list[dict], n_fit: int, n_val: int) -> SelectionResult:
    """The SelectionResult of a scored ``table``: overall, single-key and concatenation winners."""
    single_best = _winner([r for r in table if r["kind"] == "single"])
    concat_rows = [r for r in table if r["kind"] == "concat"]
    concat_best = _winner(concat_rows) if concat_rows else None
    overall = _winner(table)
    as_keys = lambda row: parse_key_name(row["key"])  # noqa: E731
    return SelectionResult(
        table=table, best=as_keys(overall), best_val_acc=overall["val_acc"],
        best_single=as_keys(single_best), best_single_val_acc=single_best["val_acc"],
        best_concat=as_keys(concat_best) if concat_best else None,
        best_concat_val_acc=concat_best["val_acc"] if concat_best else None,
        meta={"n_fit": n_fit, "n_val": n_val},
    )


def default_concatenations(single_rows: list[dict], top: Sequence[int] = (2, 3)) -> list[Keys]:
    """Concatenations worth trying once the single keys are scored (pass as ``concat_candidates``).

    For each k in ``top``: the k best keys overall, and the k best nodes at the best key's
    timestep; then every node at that timestep, and the best node at its two best timesteps.
    Keys inside a concatenation keep the table's order, so equal sets get one name.
    """
    if not single_rows:
        return []
    ranked = sorted(single_rows, key=lambda r: (-r["val_acc"], r["dim"], r["order"]))
    order = {r["key"]: r["order"] for r in single_rows}
    best = ranked[0]
    same_t = [r for r in ranked if r["timesteps"] == best["timesteps"]]
    same_node = [r for r in ranked if r["nodes"] == best["nodes"]]
    groups = [ranked[:k] for k in top] + [same_t[:k] for k in top] + [same_t, same_node[:2]]
    out: list[Keys] = []
    for group in groups:
        if len(group) < 2:
            continue
        keys = tuple(k for r in sorted(group, key=lambda r: order[r["key"]]) for k in parse_key_name(r["key"]))
        if keys not in out:
            out.append(keys)
    return out
