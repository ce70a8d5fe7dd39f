"""Evaluation: the likelihoods of a model on a data split, and the ``src/eval.py`` job.

- :mod:`.runner`: the one shard-and-gather loop every estimator runs in (examples sharded over processes without
  padding, per-example randomness, results in data order), and the process launch;
- :mod:`.estimators`: the exact -ELBO, the probability-flow ODE and a continuous-time model's own bound, each over a
  split, with their summaries, and the objects of the ``likelihood`` config group that run them
  (:class:`LikelihoodEstimator`, the interface of an estimator of one's own);
- :mod:`.job`: ``run_eval``, the job itself (metrics.json, per_example.csv, FID, the checkpoint's W&B run).

Records and their files are in :mod:`diffusion_elbo.records`, the analytic-variance cache in
:mod:`diffusion_elbo.analytic`; training and sampling import nothing from here.
"""

from diffusion_elbo.evaluation.estimators import (
    ContinuousBound,
    ELBOSummary,
    Estimate,
    EvalRun,
    EvalSubject,
    ExactELBO,
    LikelihoodEstimator,
    ODESummary,
    ProbabilityFlowODE,
    evaluate_continuous,
    evaluate_elbo,
    evaluate_ode,
)
from diffusion_elbo.evaluation.job import run_eval
from diffusion_elbo.evaluation.runner import map_examples
from diffusion_elbo.records import paired_difference, write_metrics, write_per_example

__all__ = [
    "ContinuousBound",
    "ELBOSummary",
    "Estimate",
    "EvalRun",
    "EvalSubject",
    "ExactELBO",
    "LikelihoodEstimator",
    "ODESummary",
    "ProbabilityFlowODE",
    "evaluate_continuous",
    "evaluate_elbo",
    "evaluate_ode",
    "map_examples",
    "paired_difference",
    "run_eval",
    "write_metrics",
    "write_per_example",
]
