"""Entry point of the Azure Container Apps jobs: ``python -m job --queues gpu|cpu``.

Jobs travel on two queues: embed and train_head (the GPU kinds) on one, reindex, retrain and analyse
on the other. In Azure the GPU job runs ``--queues gpu`` and the CPU job ``--queues cpu``; KEDA starts
an execution while its queue holds messages, and each execution works through the queue and exits
when it is empty (or idle for ``--idle-timeout`` seconds). The loop is ``job.worker.Worker``, the same
one ``clusterlens worker`` runs locally (on both queues).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from shared.queues import SERVE_CHOICES

    parser = argparse.ArgumentParser(prog="python -m job", description=__doc__.splitlines()[0])
    parser.add_argument("--forever", action="store_true", help="keep polling instead of exiting when idle")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="exit after this many idle seconds")
    parser.add_argument("--max-jobs", type=int, help="exit after this many messages")
    parser.add_argument(
        "--queues",
        choices=SERVE_CHOICES,
        default="all",
        help="take the GPU kinds' queue (gpu: embed and train_head by default), the others' (cpu), or both (all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every HTTP request at INFO
    from job.worker import install_signal_handlers, open_worker
    from shared.settings import get_settings

    worker = open_worker(get_settings(), serve=args.queues)
    install_signal_handlers(worker)
    logging.getLogger("job").info("worker %s on queues %s (%s)", worker.worker_id, worker.describe(), args.queues)
    stats = worker.run(until_idle=not args.forever, idle_timeout=args.idle_timeout, max_jobs=args.max_jobs)
    logging.getLogger("job").info("done: %s", json.dumps(stats.outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
