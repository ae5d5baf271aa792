"""Fuzz the real server from its own OpenAPI schema with Schemathesis, and count what came back.

Every check Schemathesis has runs (its default: all of them; ``--checks all`` would override the
per-operation settings below): no 5xx, status codes, content types, headers and bodies matching
the schema, invalid input refused, unsupported methods answered with 405 + Allow, auth enforced where
the schema says so). ``bench/schemathesis.toml`` lists the refusals that are about meaning (random
bytes are no image). Requests are counted from the HAR recording of the run, so the figures are what
the server really answered.

``python -m bench.fuzz URL --examples 100`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"


def run_fuzz(url: str, api_key: str, *, examples: int, seed: int = 0, workers: int = 2) -> dict[str, Any]:
    """Run ``schemathesis run`` against ``url`` (a running server) and summarise it.

    Args:
        url: the server's base URL; the schema is read from ``/api/openapi.json``.
        api_key: the write key, sent on every request (the auth checks also send requests without it).
        examples: test cases per operation and phase (Schemathesis's ``--max-examples``).
        seed: the generator's seed, for a repeatable run.
        workers: concurrent Schemathesis workers.

    Returns:
        ``fuzz_requests`` (requests the server answered), ``fuzz_5xx``, ``fuzz_failures`` (failed checks,
        by code and title), ``fuzz_operations``, ``fuzz_statuses`` (count per status), ``fuzz_seconds``,
        ``fuzz_exit_code``.
    """
    with tempfile.TemporaryDirectory(prefix="clusterlens-fuzz-") as tmp:
        har, report = Path(tmp) / "run.har", Path(tmp) / "run.json"
        command = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(CONFIG),
            "run",
            f"{url}/api/openapi.json",
            "--max-examples",
            str(examples),
            "--seed",
            str(seed),
            "--workers",
            str(workers),
            "--header",
            f"X-API-Key: {api_key}",
            "--request-timeout",
            "60",
            "--report",
            "har,json",
            "--report-har-path",
            str(har),
            "--report-json-path",
            str(report),
            "--no-color",
        ]
        # cwd: Schemathesis keeps a cache folder where it runs
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False, cwd=tmp)  # noqa: S603
        if not report.exists():
            raise RuntimeError(f"schemathesis did not run: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        summary = json.loads(report.read_text())
        entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = Counter(int(e["response"]["status"]) for e in entries)
    failures = [
        {"code": f["code"], "title": f["title"], "count": f["count"], "operations": f["operations"]}
        for f in summary.get("failures", [])
    ]
    return {
        "fuzz_requests": len(entries),
        "fuzz_5xx": sum(n for status, n in statuses.items() if status >= 500),
        "fuzz_failures": failures,
        "fuzz_errors": len(summary.get("errors", [])),
        "fuzz_operations": summary["operations"]["tested"],
        "fuzz_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "fuzz_seconds": round(summary["running_time"], 1),
        "fuzz_exit_code": done.returncode,
        "fuzz_output_tail": done.stdout[-3000:] if done.returncode else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(run_fuzz(args.url, args.key, examples=args.examples, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
