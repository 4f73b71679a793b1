"""End-to-end pipelines: library functions that chain backbones, features and heads into one task.

What lives here: :mod:`.probe` (``run_probe``, ``ProbeRun``, ``load_probe_dataset``: linear probe with
node x timestep chosen on validation), :mod:`.segmentation` (``fit_segmentation_head``,
``predict_segmentation``: pixel descriptors + PixelClassifier) and :mod:`.demo` (``run_demo``).
They take arguments and return results; they never parse command lines or print summaries.

Who may import it: :mod:`diffrep.cli`, the benchmarks, tests and users. Nothing else inside
``diffrep`` imports it (pipelines sit above backbones, features, heads, data and anomaly). This
``__init__`` imports no submodule, so importing one pipeline does not load the others.
"""
