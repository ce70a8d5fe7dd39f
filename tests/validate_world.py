"""Run validation of a freshly seeded model on ``world`` CPU processes and write its numbers (rank 0) to ``out``:
python tests/validate_world.py <world> <out.json> [overrides...]. Used by the world-size invariance tests (Lightning's
DDP launcher starts ranks > 0 by running this script again)."""

import json
import sys

import lightning as L
import torch

from diffusion_elbo.builders import build_module
from tests.helpers import compose_train


def main() -> None:
    world, out, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    cfg = compose_train(out + ".run", ["trainer.limit_val_batches=1.0", "val_strata=8", *overrides])
    L.seed_everything(0)
    module, datamodule = build_module(cfg)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        profile = {k: v.tolist() for k, v in module.last_profile.items()}
        with open(out, "w") as f:
            json.dump({"metrics": metrics, "profile": profile}, f)


if __name__ == "__main__":
    main()
