"""A fresh process's first answer: load the published index (memory-mapped) and answer one query.

``python -m bench.load_probe STORE QUERY.npy`` prints the result rows as JSON. :mod:`bench.search`
times it from process start to that line (``load_s``). It imports what a query worker imports for
search and nothing more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from shared.index import load_current
from shared.storage import LocalStorage


def main(argv: list[str]) -> int:
    store, query_file = Path(argv[0]), Path(argv[1])
    index = load_current(LocalStorage(store), store / "cache")
    hits = index.search(np.load(query_file), 10)
    print(json.dumps(hits.rows[0].tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
