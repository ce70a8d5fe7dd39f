"""Read the records of an offline W&B run file (``run-<id>.wandb``), the file `wandb sync` uploads, so tests can
check what reached W&B (config, summary, metric definitions, artifacts) without a server.

The file is a LevelDB-style log (W&B's "datastore" format): a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)
and a piece of a serialized ``wandb_internal_pb2.Record``. The client writes it from Go and no longer ships a
Python reader, hence these few lines.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # crc32c, length, chunk type


def read_records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    pos, records, pending = 7, [], b""
    while pos + HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER.size:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        chunk = data[pos + HEADER.size : pos + HEADER.size + length]
        pos += HEADER.size + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list, kind: str) -> list:
    """The records whose ``record_type`` is ``kind`` (``config``, ``summary``, ``metric``, ``artifact``, ...)."""
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@dataclass
class OfflineRun:
    """What one offline run file says about its run: the values W&B would show after `wandb sync`."""

    run_id: str
    name: str
    group: str
    config: dict  # top-level keys, JSON-decoded, the last value of each
    steps: list[int]  # trainer/global_step of each history row, in order
    summary: dict  # top-level keys (images and tables: their dicts), the last value of each
    exit_code: int | None  # None: the file has no exit record (the run never finished)


def read_run(path: str | Path) -> OfflineRun:
    records = read_records(path)
    run = of_type(records, "run")[0]
    config, summary, steps = {}, {}, []
    for update in [u for c in of_type(records, "config") for u in c.update] + list(run.config.update):
        if update.key:
            config[update.key] = json.loads(update.value_json)
    for record in of_type(records, "summary"):
        for update in record.update:
            key = update.key or update.nested_key[0]
            value = json.loads(update.value_json)
            if not update.key and len(update.nested_key) > 1:  # one field of an image's or table's dict
                summary.setdefault(key, {})[".".join(update.nested_key[1:])] = value
            else:
                summary[key] = value
    for row in of_type(records, "history"):
        for item in row.item:
            if (item.key or ".".join(item.nested_key)) == "trainer/global_step":
                steps.append(int(json.loads(item.value_json)))
    exits = of_type(records, "exit")
    return OfflineRun(
        run_id=run.run_id,
        name=run.display_name,
        group=run.run_group,
        config=config,
        steps=steps,
        summary=summary,
        exit_code=exits[-1].exit_code if exits else None,
    )


def runs_in(run_dir: str | Path, *, timeout_s: float = 60.0) -> list[OfflineRun]:
    """The offline W&B runs under ``<run_dir>/wandb``, oldest first, once each has its exit record: W&B's service
    process writes the file and under load can still be flushing when the job's process has ended."""
    paths = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    runs = [read_run(p) for p in paths]
    while any(r.exit_code is None for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = [read_run(p) for p in paths]
    return runs
