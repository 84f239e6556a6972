"""What users run: sweeps of number-format schemes with metrics, timing, DDP and reports.

``precsim sweep`` (see :mod:`precsim.experiments.command`) is the command line; from Python::

    from precsim.experiments import load_spec, run_sweep
    rows = run_sweep(load_spec("examples/sweep.yaml", epochs=1, out="runs/try"))
"""

from precsim.experiments.schemes import BUILTIN_SCHEMES, DEFAULT_SCHEMES, builtin_scheme
from precsim.experiments.spec import SchemeSpec, SweepSpec, load_spec
from precsim.experiments.sweep import run_sweep

__all__ = ["BUILTIN_SCHEMES", "DEFAULT_SCHEMES", "SchemeSpec", "SweepSpec", "builtin_scheme", "load_spec",
           "run_sweep"]
