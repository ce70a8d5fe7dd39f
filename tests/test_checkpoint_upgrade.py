"""Checkpoints written before a config group built its objects by ``_target_`` load as they were trained: their
config is rewritten into today's form (:func:`diffusion_elbo.checkpoints.upgrade_config`)."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from diffusion_elbo.builders import CHAIN_KEYS
from diffusion_elbo.checkpoints import upgrade_config
from diffusion_elbo.core.logsnr import LearnedLogSNR
from diffusion_elbo.core.schedules import BetaSchedule, SigmoidBetas, make_schedule

OLD_SCHEDULES = "diffusion_elbo.core.schedules.make_schedule"
OLD_LOGSNR = "diffusion_elbo.core.logsnr.make_logsnr_schedule"


def test_a_named_beta_schedule_of_an_old_checkpoint_becomes_its_class_with_the_same_tables():
    old = {"_target_": OLD_SCHEDULES, "name": "sigmoid", "timesteps": 200, "start": -3.0, "end": 3.0, "tau": 0.7,
           "max_beta": 0.999}  # fmt: skip
    new = upgrade_config({"seed": 1, "schedule": old})
    assert new["seed"] == 1 and new["schedule"]["_target_"] == "diffusion_elbo.core.schedules.SigmoidBetas"
    assert "name" not in new["schedule"]
    schedule = instantiate(new["schedule"])
    assert isinstance(schedule, SigmoidBetas)
    assert torch.equal(schedule.chain.betas, make_schedule("sigmoid", 200, tau=0.7).betas)
    custom = upgrade_config({"schedule": {"_target_": OLD_SCHEDULES, "name": "custom", "betas": [0.1, 0.2]}})
    assert isinstance(instantiate(custom["schedule"]), BetaSchedule)


def test_an_old_continuous_time_node_keeps_its_bound_keys_and_builds_its_class():
    old = {"_target_": OLD_LOGSNR, "name": "learned", "gamma_min": -10.0, "gamma_max": 6.0, "hidden": 8,
           "timesteps": None, "eval_timesteps": 500, "variance_gradient": True, "lr": 0.01}  # fmt: skip
    node = upgrade_config({"schedule": old})["schedule"]
    assert node["_target_"] == "diffusion_elbo.core.logsnr.LearnedLogSNR"
    assert {k: node[k] for k in CHAIN_KEYS} == {"timesteps": None, "eval_timesteps": 500, "variance_gradient": True,
                                               "lr": 0.01}  # fmt: skip
    schedule = instantiate({k: v for k, v in node.items() if k not in CHAIN_KEYS})
    assert isinstance(schedule, LearnedLogSNR) and schedule.reference == (-10.0, 6.0)
    discrete = {"_target_": OLD_LOGSNR, "name": "logsnr_discrete", "base": "cosine", "base_timesteps": 100,
                "timesteps": None, "eval_timesteps": 100, "variance_gradient": False}  # fmt: skip
    node = upgrade_config({"schedule": discrete})["schedule"]
    schedule = instantiate({k: v for k, v in node.items() if k not in CHAIN_KEYS})
    assert torch.equal(schedule.discretize(100).alpha_bar, make_schedule("cosine", 100).alpha_bar)


def test_todays_config_and_an_unknown_name_are_left_as_they_are():
    today = {"schedule": {"_target_": "diffusion_elbo.core.schedules.LinearBetas", "timesteps": 1000}}
    assert upgrade_config(today) == today
    unknown = {"schedule": {"_target_": OLD_SCHEDULES, "name": "quartic"}}
    assert upgrade_config(unknown) == unknown  # building it then fails with the schedule's own message
