"""Where a run's processes come from when a launcher, not Lightning, starts them."""

from __future__ import annotations

import os
import zlib

from lightning.fabric.plugins.environments import ClusterEnvironment


class SubmititLocalEnvironment(ClusterEnvironment):
    """The ranks of a ``hydra/launcher=submitit_local`` job with ``hydra.launcher.tasks_per_node=N``: submitit starts
    one process per task with its ids in ``SUBMITIT_LOCAL_*`` variables, so Lightning must not start more. (Under
    ``submitit_slurm`` Lightning's own SLURMEnvironment reads the same from SLURM's variables.) The rendezvous port
    is derived from the job id, the same in every task of the job and different between jobs."""

    @staticmethod
    def detect() -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return 20000 + zlib.crc32(os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0").encode()) % 20000

    def world_size(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_NTASKS"])

    def set_world_size(self, size: int) -> None:
        pass  # fixed by submitit

    def global_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_GLOBALID"])

    def set_global_rank(self, rank: int) -> None:
        pass  # fixed by submitit

    def local_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_LOCALID"])

    def node_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NODEID", "0"))
