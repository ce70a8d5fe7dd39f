"""Refresh ``tests/durations.json`` from a pytest run's ``--durations=0`` report:

    python -m pytest -n 2 --durations=0 | tee /tmp/pytest.log
    python tests/durations.py /tmp/pytest.log

The file holds each item's seconds (setup + call + teardown, items over 1 s) and is read only by ``tests/conftest.py``
to order the slow items longest first for pytest-xdist (a stale or missing entry costs wall time, never a result)."""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"(\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(\S+)")
PATH = Path(__file__).with_name("durations.json")


def main(log: str) -> None:
    seconds: dict[str, float] = defaultdict(float)
    for line in Path(log).read_text().splitlines():
        match = LINE.search(line)
        if match:
            seconds[match.group(2)] += float(match.group(1))
    kept = {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]) if v >= 1.0}
    if not kept:
        raise SystemExit(f"{log} has no --durations=0 lines (run pytest with --durations=0)")
    PATH.write_text(json.dumps(kept, indent=0) + "\n")
    print(f"{len(kept)} items, {sum(kept.values()):.0f} s in all -> {PATH}")


if __name__ == "__main__":
    main(sys.argv[1])
