"""Gather the runs of a Hydra multirun into one table and one figure, saved next to the sweep.

python src/report.py sweep_dir=outputs/train/multiruns/<date>_<time>
"""

import hydra
from omegaconf import DictConfig

from diffusion_elbo.cli import CONFIG_PATH, register_resolvers, run_job
from diffusion_elbo.report import run_report


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    run_job(run_report, cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
