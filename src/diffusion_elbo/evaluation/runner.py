"""One way to spread an evaluation over processes: the examples are sharded without padding, each is evaluated with
its own randomness (the estimator draws it from :func:`~diffusion_elbo.core.elbo.example_generator` of the seed and
the example's index), and the per-example results are gathered in data order. The numbers are therefore those of
one process, whatever the number of processes and the batch size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

NO_EXAMPLES = "no examples to evaluate: the data split is empty (check split= and num_examples=)"


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def launch_processes(cfg: DictConfig):
    """``trainer.devices=N`` (N > 1, or a list): N processes on ``trainer.accelerator`` (cpu: gloo, gpu: NCCL), started
    by Lightning Fabric as training starts them (rank > 0 runs this script again); the examples are then sharded over
    them by :func:`map_examples`. None for one process."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if devices in (1, "1", None):
        return None
    from lightning.fabric import Fabric

    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    num_nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return fabric


@dataclass
class Mapped:
    """What :func:`map_examples` returns: per-example columns in data order, and what each batch returned besides."""

    columns: dict[str, Tensor]  # name -> (N,) float64, example i in row i (in the order of the dataset)
    extras: list[list[Any]]  # extras[r][k]: the extra value of rank r's k-th batch, ranks in order

    def summed(self, key: int | str = 0) -> Any:
        """The sum of the extras' ``key`` entries: over each rank's batches in order, then over the ranks in order (the
        same float sums on any number of processes that give each rank the same batches)."""
        per_rank = [_sum(e[key] for e in batches) for batches in self.extras]
        return _sum(p for p in per_rank if p is not None)


def _sum(values) -> Any:
    total = None
    for v in values:
        total = v if total is None else total + v
    return total


def map_examples(
    dataset: Sequence,
    evaluate: Callable[[Tensor, list[int]], tuple[dict[str, Tensor], Any]],
    *,
    batch_size: int,
    device: torch.device,
) -> Mapped:
    """``evaluate(x0, indices)`` over every example of ``dataset`` (items (x0, ...)), ``batch_size`` at a time: x0
    (b, *D) on ``device``, ``indices`` the examples' positions in the dataset. It returns ({name: (b,)} per-example
    values, extra), ``extra`` anything else of the batch (a per-t sum, a solver's step count).

    Under torch.distributed rank r takes examples r, r + W, ... (no padding: every example exactly once), and every
    rank receives all ranks' results (one all_gather_object at the end). Raises ValueError for an empty dataset."""
    rank, world = rank_world()
    indices = list(range(rank, len(dataset), world))
    done: list[int] = []  # this rank's examples in the order evaluated
    parts: dict[str, list[Tensor]] = {}  # name -> this rank's batches of values
    extras: list[Any] = []
    for start in range(0, len(indices), int(batch_size)):
        chunk = indices[start : start + int(batch_size)]
        x0 = torch.stack([dataset[i][0] for i in chunk]).to(device)
        columns, extra = evaluate(x0, chunk)
        for name, column in columns.items():
            parts.setdefault(name, []).append(column.detach().double().cpu())
        done.extend(chunk)
        extras.append(extra)
    shards = [(done, {name: torch.cat(values) for name, values in parts.items()}, extras)]
    if world > 1:  # one gather of whole columns per rank
        import torch.distributed as dist

        shards = [None] * world
        dist.all_gather_object(shards, (done, {name: torch.cat(v) for name, v in parts.items()}, extras))
    order = [i for shard_done, _, _ in shards for i in shard_done]
    if not order:
        raise ValueError(NO_EXAMPLES)
    position = torch.argsort(torch.tensor(order))  # row k of the result: example k of the dataset
    names = next(columns for _, columns, _ in shards if columns).keys()
    merged = {name: torch.cat([columns[name] for _, columns, _ in shards if columns])[position] for name in names}
    return Mapped(merged, [shard_extras for _, _, shard_extras in shards])
