"""Read the records of an offline W&B run file (``run-<id>.wandb``), the file `wandb sync` uploads, so tests can
check what reached W&B (config, summary, metric definitions, artifacts) without a server.

The file is a LevelDB-style log (W&B's "datastore" format): a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)
and a piece of a serialized ``wandb_internal_pb2.Record``. The client writes it from Go and no longer ships a
Python reader, hence these few lines.
"""

from __future__ import annotations

import struct
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
