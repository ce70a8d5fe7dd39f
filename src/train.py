"""Train a diffusion model: python src/train.py [model=unet schedule=linear trainer.devices=4 ...]

Sweeps: python src/train.py -m schedule=linear,cosine,sigmoid
"""

import sys

import hydra
from omegaconf import DictConfig

from diffusion_elbo.cli import CONFIG_PATH, check_renamed_keys, check_trainer_overrides, register_resolvers, run_job
from diffusion_elbo.training import train


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_job(train, cfg)
    # returned for Hydra sweepers that optimise a value (hparams_search=optuna)
    return metrics.get(cfg.get("optimized_metric") or "val/elbo_bpd") if metrics else None


if __name__ == "__main__":
    register_resolvers()
    check_renamed_keys(sys.argv[1:])
    check_trainer_overrides(sys.argv[1:])
    main()
