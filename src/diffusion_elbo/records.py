"""Result files: strict JSON written atomically (metrics, train metrics, failure records) and the per-example CSV of
an evaluation, with the paired difference of two of them. The one place the project writes a record a reader (a
sweep report, rank 0, a person) may open while it is written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported by the CLI's failure records
    from torch import Tensor


def finite_or_null(value):
    """``value`` with every NaN and infinity (in nested dicts and lists too) replaced by None, so that it is strict
    JSON: Python's ``json`` would write bare ``NaN``, which other readers (``jq``, JavaScript, pandas' strict mode)
    refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def write_json(path: str | Path, record: dict, *, indent: int = 2) -> Path:
    """Write ``record`` to ``path`` as strict JSON (a non-finite value as null), atomically: to a temporary file of
    this process, then renamed over ``path``, so a reader never sees half a file and two processes never share a
    temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(finite_or_null(record), indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def write_metrics(metrics: dict, output_dir: str | Path, name: str = "metrics.json") -> Path:
    """``<output_dir>/<name>``, written by :func:`write_json`."""
    return write_json(Path(output_dir) / name, metrics)


def write_per_example(columns: dict[str, Tensor], output_dir: str | Path, name: str = "per_example.csv") -> Path:
    """Per-example values in bits/dim, in data order, one column each (``bpd``: -ELBO; ``ode_bpd``: the ODE's
    -log-likelihood): two evaluations of the same split (other variances, checkpoints, models or likelihoods) compare by
    paired differences, whose standard error is usually well below either bpd_se (the per-example values move
    together). ``columns``: name -> (N,) bits/dim."""
    path = Path(output_dir) / name
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    names = list(columns)
    values = [columns[c].tolist() for c in names]
    rows = "".join(f"{i}," + ",".join(f"{v[i]:.8f}" for v in values) + "\n" for i in range(len(values[0])))
    tmp.write_text("index," + ",".join(names) + "\n" + rows)
    os.replace(tmp, path)
    return path


def paired_difference(
    a: str | Path, b: str | Path, column_a: str = "bpd", column_b: str | None = None
) -> tuple[float, float]:
    """Mean and standard error of per-example ``column_a``(a) - ``column_b``(b) (bits/dim; ``column_b`` defaults to
    ``column_a``) from two ``per_example.csv`` of the same split (a and b may be the same file)."""
    import numpy as np

    def read(path, column):
        table = np.genfromtxt(path, delimiter=",", names=True)
        if column not in table.dtype.names:
            raise ValueError(f"{path} has no column {column!r}; it has {', '.join(table.dtype.names)}")
        return np.atleast_1d(table[column])

    x, y = read(a, column_a), read(b, column_b or column_a)
    if x.shape != y.shape:
        raise ValueError(f"{a} and {b} hold {x.size} and {y.size} examples: evaluate the same split to pair them")
    d = x - y
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
