"""`make bench-reliability`: fuzzing, hostile files, load and crash trials; writes bench/results/reliability.json.

1. Fuzz: Schemathesis from the app's own OpenAPI schema against the real server (>= 2,000 requests).
2. Load: mixed search / image / label traffic at concurrency 32 for 60 s against the same server,
   its memory sampled once a second.
3. Hostile files: the corpus of tests/hostile.py through HTTP upload and the blob trigger.
4. Crash: the worker SIGKILLed at random points during embed, reindex and retrain, 10 trials each.
5. Static: bandit (high / medium findings) and detect-secrets over the tracked files.

Every figure that must be zero (:data:`MUST_BE_ZERO`) is checked at the end and each one that is not, or
is missing, goes into the file's ``problems`` list; the exit status is 1 when that list is not empty.
A full run writes every key of the file, with the machine it ran on (``device``). ``--parts`` and the
size options make a quick partial check of the code path; such a run must write elsewhere (``--out``),
so the committed file always comes from one full run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.crash import run_crash
from bench.embed import device
from bench.fuzz import run_fuzz
from bench.load import run_load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "reliability.json"
MEMORY_BOUND_MB = 50.0  # the server's resident memory may not grow more than this across the load run
BANDIT_TARGETS = ("shared", "functions", "tools", "bench", "function_app.py")
# Lines that look like secrets and are not: the infra file's reasons for leaving the keys out mention "a
# secret", and the vendored provider arguments name the public git commits they were read from.
SECRET_REASON_LINES = r'"CLUSTERLENS_(API|READ)_KEY": "a secret|^\s*"commit": "[0-9a-f]{40}",?$'
PARTS = ("server", "hostile", "crash", "static")  # server: fuzzing, then load, on one served collection
MIN_FUZZ_REQUESTS = 2000
# Per part, the figures that must be zero: each one that is not (or is missing) is a problem.
MUST_BE_ZERO = {
    "server": ("fuzz_5xx", "load_errors"),
    "hostile": ("hostile_crashes",),
    "crash": ("crash_lost", "crash_duplicated", "query_failures"),
    "static": ("bandit_high", "bandit_medium", "secrets_found"),
}
# run_crash's headline figures stay at the top of the file; the rest of its result goes under crash_detail.
CRASH_TOP = ("crash_trials", "crash_lost", "crash_duplicated", "queries", "queries_during_rebuild", "query_failures")


def bandit_report() -> dict[str, Any]:
    """bandit's JSON report on the app's code (the tests and :func:`static_checks` read the same one)."""
    done = subprocess.run(  # noqa: S603 - our own tool on our own code
        [str(Path(sys.executable).with_name("bandit")), "-r", *BANDIT_TARGETS, "-f", "json", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def secret_scan() -> tuple[int, dict[str, Any]]:
    """detect-secrets over the tracked text files: (files scanned, findings by file)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # noqa: S607
    text_files = [f for f in files if not f.endswith((".png", ".tsv"))]
    done = subprocess.run(  # noqa: S603
        [str(Path(sys.executable).with_name("detect-secrets")), "scan", "--exclude-lines", SECRET_REASON_LINES]
        + text_files,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return len(text_files), json.loads(done.stdout)["results"]


def static_checks() -> dict[str, Any]:
    """bandit's findings by severity and detect-secrets' findings."""
    results = bandit_report()["results"]
    _, secrets = secret_scan()
    return {
        "bandit_high": sum(r["issue_severity"] == "HIGH" for r in results),
        "bandit_medium": sum(r["issue_severity"] == "MEDIUM" for r in results),
        "bandit_low": sum(r["issue_severity"] == "LOW" for r in results),
        "secrets_found": sum(len(v) for v in secrets.values()),
    }


def server_parts(workdir: Path, examples: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """Build a small complete collection, serve it, fuzz it, then load it."""
    from tests import full_collection
    from tests.keys import API_KEY
    from tests.servers import server_process

    data_dir = workdir / "served"
    full_collection.build(full_collection.settings_for(data_dir))
    out: dict[str, Any] = {}
    with server_process({"CLUSTERLENS_DATA_DIR": str(data_dir), **full_collection.ENV}) as (url, pid):
        out.update(run_fuzz(url, API_KEY, examples=examples, seed=0))
        if out["fuzz_exit_code"] == 0:
            out.pop("fuzz_output_tail", None)
        queue = httpx.get(f"{url}/api/label-queue", params={"n": 200}).json()["items"]
        ids = [item["id"] for item in queue]
        images = [httpx.get(f"{url}/api/images/{i}").content for i in ids[:20]]
        out.update(run_load(url, API_KEY, seconds=seconds, concurrency=concurrency, pid=pid, ids=ids, images=images))
    out["load_memory_bound_mb"] = MEMORY_BOUND_MB
    return out


def find_problems(result: dict[str, Any], parts: list[str] | tuple[str, ...] = PARTS) -> list[str]:
    """Every figure of the parts run that breaks its bound: a must-be-zero figure that is not zero or is
    missing, too few fuzzed requests, failed Schemathesis checks, the server's memory growing past its bound."""
    problems = [key for part in parts for key in MUST_BE_ZERO[part] if result.get(key) != 0]
    if "server" in parts:
        if (result.get("fuzz_requests") or 0) < MIN_FUZZ_REQUESTS:
            problems.append(f"fuzz_requests < {MIN_FUZZ_REQUESTS}")
        if result.get("fuzz_failures"):
            problems.append("fuzz_failures")
        if (result.get("load_rss_growth_mb") or 0) > MEMORY_BOUND_MB:
            problems.append("load_rss_growth_mb")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=80, help="Schemathesis examples per operation and phase")
    parser.add_argument("--seconds", type=float, default=60, help="load duration")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--trials", type=int, default=10, help="crash trials per job kind")
    parser.add_argument("--crash-images", type=int, default=600, help="images the crash trials upload (about)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {', '.join(PARTS)} (a partial run needs --out elsewhere)",
    )
    args = parser.parse_args(argv)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if len(parts) < len(PARTS) and args.out.resolve() == RESULTS.resolve():
        parser.error(f"a partial run would leave {RESULTS.name} with figures from two runs: pass --out")

    from tests.hostile import run_corpus

    result: dict[str, Any] = {"device": device()}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="clusterlens-reliability-") as tmp, tqdm(parts, unit="part") as bar:
        work = Path(tmp)
        for step in bar:
            bar.set_description(step)
            t0 = time.perf_counter()
            if step == "server":
                result.update(server_parts(work, args.examples, args.seconds, args.concurrency))
            elif step == "hostile":
                hostile = run_corpus(work / "hostile")
                result["hostile_files"] = hostile["hostile_files"]
                result["hostile_crashes"] = hostile["hostile_crashes"]
                result["hostile_detail"] = {
                    k: hostile[k] for k in ("crashes", "http", "blob", "mismatches", "not_found", "decode_mismatches")
                }
            elif step == "crash":
                crash = run_crash(work / "crash", trials_per_kind=args.trials, seed=0, images=args.crash_images)
                result.update({k: crash.pop(k) for k in CRASH_TOP})
                result["crash_detail"] = crash
            else:
                result.update(static_checks())
            timings[step] = round(time.perf_counter() - t0, 1)
    result["seconds"] = timings
    problems = find_problems(result, parts)
    result["problems"] = problems
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    head = {k: result.get(k) for k in (
        "fuzz_requests", "fuzz_5xx", "hostile_files", "hostile_crashes", "load_requests", "load_errors",
        "load_p50_ms", "load_p99_ms", "crash_trials", "crash_lost", "crash_duplicated", "bandit_high",
        "bandit_medium", "secrets_found",
    )}  # fmt: skip
    print(json.dumps(head, indent=2))
    print(f"written to {args.out}" + (f"; NOT MET: {', '.join(problems)}" if problems else "; every zero is zero"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
