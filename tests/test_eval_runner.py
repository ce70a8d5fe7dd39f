"""The evaluation runner (diffusion_elbo.evaluation.runner.map_examples): every estimator's shard-and-gather loop."""

from __future__ import annotations

import pytest
import torch

from diffusion_elbo.core.elbo import example_generator
from diffusion_elbo.evaluation.runner import NO_EXAMPLES, map_examples

N = 11


def _dataset(n: int = N) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, generator=g), i % 2) for i in range(n)]


def _evaluate(x0: torch.Tensor, indices: list[int]):
    """A per-example estimate with per-example randomness (as the estimators draw it), and a per-batch extra."""
    noise = torch.stack([torch.randn(3, generator=example_generator(7, i)) for i in indices])
    value = ((x0 + noise) ** 2).sum(dim=1)
    return {"value": value, "index": torch.tensor(indices, dtype=torch.float64)}, (value.sum(), len(indices))


def _reference() -> torch.Tensor:
    data = _dataset()
    return torch.stack(
        [((x + torch.randn(3, generator=example_generator(7, i))) ** 2).sum().double() for i, (x, _) in enumerate(data)]
    )


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_results_are_in_data_order_and_do_not_depend_on_the_batch_size(batch_size):
    mapped = map_examples(_dataset(), _evaluate, batch_size=batch_size, device=torch.device("cpu"))
    assert mapped.columns["index"].tolist() == list(range(N))
    torch.testing.assert_close(mapped.columns["value"], _reference(), rtol=1e-6, atol=0)
    assert [extra[1] for extra in mapped.extras[0]] == [min(batch_size, N - s) for s in range(0, N, batch_size)]
    torch.testing.assert_close(mapped.summed(0).double(), _reference().sum(), rtol=1e-5, atol=0)


def test_an_empty_split_is_an_error_that_names_the_settings():
    with pytest.raises(ValueError, match="split= and num_examples="):
        map_examples([], _evaluate, batch_size=4, device=torch.device("cpu"))
    assert "empty" in NO_EXAMPLES


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        seen = []

        def evaluate(x0, indices):
            seen.extend(indices)
            return _evaluate(x0, indices)

        mapped = map_examples(_dataset(), evaluate, batch_size=2, device=torch.device("cpu"))
        if rank == 0:
            torch.save({"columns": mapped.columns, "extras": mapped.extras}, out)
        torch.save(seen, f"{out}.seen{rank}")
    finally:
        dist.destroy_process_group()


def test_three_processes_shard_without_padding_and_every_rank_gets_every_result(tmp_path):
    """11 examples on 3 ranks: rank r evaluates r, r + 3, ... (4/4/3, none twice, none padded); the gathered columns
    equal one process's, and the extras come per rank in rank order."""
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(3, str(tmp_path / "init"), str(out)), nprocs=3, join=True)
    got = torch.load(out)
    assert [torch.load(f"{out}.seen{r}") for r in range(3)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert got["columns"]["index"].tolist() == list(range(N))
    torch.testing.assert_close(got["columns"]["value"], _reference(), rtol=1e-6, atol=0)
    assert [[extra[1] for extra in batches] for batches in got["extras"]] == [[2, 2], [2, 2], [2, 1]]
