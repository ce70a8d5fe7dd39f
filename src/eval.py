"""Evaluate the exact ELBO (bits/dim, its three terms and the per-t profile) and write metrics.json.

python src/eval.py data=gaussian model=gaussian_oracle schedule=cosine schedule.timesteps=100
python src/eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
"""

import sys

import hydra
from omegaconf import DictConfig

from diffusion_elbo.cli import CONFIG_PATH, check_renamed_keys, register_resolvers, run_job
from diffusion_elbo.evaluation import run_eval


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_job(run_eval, cfg)


if __name__ == "__main__":
    register_resolvers()
    check_renamed_keys(sys.argv[1:])
    main()
