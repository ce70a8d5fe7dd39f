"""Rebuild a run's EMA of any length after training (post-hoc EMA, Karras et al. 2024) from the snapshots written with
callbacks=posthoc_ema: one checkpoint per width, which src/eval.py and src/sample.py take like any other.

python src/posthoc_ema.py run_dir=outputs/train/runs/<run> sigma_rel=0.08
python src/posthoc_ema.py run_dir=... 'sigma_rel=[0.03,0.05,0.08,0.12,0.16,0.2]' decay=0.999
"""

import sys

import hydra
from omegaconf import DictConfig

from diffusion_elbo.cli import CONFIG_PATH, check_renamed_keys, register_resolvers, run_job
from diffusion_elbo.posthoc import run_posthoc_ema


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="posthoc_ema")
def main(cfg: DictConfig) -> None:
    run_job(run_posthoc_ema, cfg)


if __name__ == "__main__":
    register_resolvers()
    check_renamed_keys(sys.argv[1:])
    main()
