"""Draw samples from a trained checkpoint: a PNG grid and an .npz in the run directory.

python src/sample.py ckpt_path=.../checkpoints/last.ckpt sampler=ddim sampler.steps=50 num_samples=64
"""

import sys

import hydra
from omegaconf import DictConfig

from diffusion_elbo.cli import CONFIG_PATH, check_renamed_keys, register_resolvers, run_job
from diffusion_elbo.sampling import run_sample


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_job(run_sample, cfg)


if __name__ == "__main__":
    register_resolvers()
    check_renamed_keys(sys.argv[1:])
    main()
