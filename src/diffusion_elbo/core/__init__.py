"""The math of diffusion-elbo: pure torch, no Lightning, Hydra or W&B.

Timestep convention: t is a LongTensor (B,) in 1..T (t = 1 is the decoder p(x_0 | x_1)); schedule tables
have T + 1 entries indexed by t. Losses and ELBO terms are in nats unless a name says bits (``_bpd``).
"""

from diffusion_elbo.core.chain import InvalidScheduleError, NoiseSchedule
from diffusion_elbo.core.distributions import (
    discretized_gaussian_log_likelihood,
    gaussian_log_prob,
    nats_to_bits_per_dim,
    normal_kl,
    quantize,
)
from diffusion_elbo.core.elbo import (
    ELBOResult,
    MCEstimate,
    consistency_mc_elbo,
    consistency_prior_nats,
    consistency_term_nats,
    decoder_nll_nats,
    denoising_kl_nats,
    exact_elbo,
    mc_elbo,
    prior_kl_nats,
    standard_error,
    stratified_elbo,
    stratified_timesteps,
    term_from_output,
    term_nats,
)
from diffusion_elbo.core.forward import q_mean_variance, q_posterior_mean_variance, q_sample, q_step_sample
from diffusion_elbo.core.logsnr import LogSNRSchedule
from diffusion_elbo.core.losses import Objective, weighted_mse
from diffusion_elbo.core.parametrization import Parametrization, predict_eps, predict_x0, training_target
from diffusion_elbo.core.reverse import DecoderVariance, ReverseVariance, p_mean_variance
from diffusion_elbo.core.samplers import Spacing, ancestral_sample, ddim_sample, spaced_timesteps
from diffusion_elbo.core.schedules import BetaSchedule, make_schedule
from diffusion_elbo.core.timesteps import (
    ImportanceSampler,
    TimestepSampler,
    TimestepSampling,
    UniformSampler,
    make_timestep_sampler,
)

__all__ = [
    "BetaSchedule",
    "DecoderVariance",
    "ELBOResult",
    "ImportanceSampler",
    "InvalidScheduleError",
    "LogSNRSchedule",
    "MCEstimate",
    "NoiseSchedule",
    "Objective",
    "Parametrization",
    "ReverseVariance",
    "Spacing",
    "TimestepSampler",
    "TimestepSampling",
    "UniformSampler",
    "ancestral_sample",
    "consistency_mc_elbo",
    "consistency_prior_nats",
    "consistency_term_nats",
    "ddim_sample",
    "decoder_nll_nats",
    "denoising_kl_nats",
    "discretized_gaussian_log_likelihood",
    "exact_elbo",
    "gaussian_log_prob",
    "make_schedule",
    "make_timestep_sampler",
    "mc_elbo",
    "nats_to_bits_per_dim",
    "normal_kl",
    "p_mean_variance",
    "predict_eps",
    "predict_x0",
    "prior_kl_nats",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "q_step_sample",
    "quantize",
    "spaced_timesteps",
    "standard_error",
    "stratified_elbo",
    "stratified_timesteps",
    "term_from_output",
    "term_nats",
    "training_target",
    "weighted_mse",
]
