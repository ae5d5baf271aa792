"""The ``clusterlens`` command line. It prints; the library it calls (``shared``) logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError

from shared.errors import ClusterlensError
from shared.queues import SERVE_CHOICES
from shared.settings import Settings, get_settings
from shared.storage import Storage, open_storage

if TYPE_CHECKING:
    from job.embeddings import EmbedStats
    from shared.ingest import IngestSummary
    from shared.jobs import JobRecord

DATASETS = ("fashion-mnist", "skimage-photos")
STRATEGY_CHOICES = ("random", "least_confidence", "margin", "entropy")


def _progress(total: int | None, desc: str, unit: str = "img"):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None)


def _keep_labels(items: Iterable[Any], share: float) -> Iterable[Any]:
    """Keep the label of a fixed random ``share`` of the items (seeded: the same images every run)."""
    import dataclasses
    import random

    rng = random.Random(0)
    for item in items:
        yield item if rng.random() < share else dataclasses.replace(item, label=None)


INGEST_WORKERS = 16  # images in flight in `clusterlens ingest` (and the demo's)


def cmd_ingest(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from shared.ingest import IngestItem, IngestSummary, folder_items, ingest_items, scan_folder

    if getattr(args, "container", None):
        return _ingest_container(args, settings, storage)
    items: Iterable[IngestItem]
    if args.dataset == "fashion-mnist":
        from job.datasets import fashion_mnist_items

        total = args.limit or (60000 if args.split == "train" else 10000)
        items = fashion_mnist_items(settings.fashion_mnist_dir, args.split, args.limit, args.offset)
        desc = f"ingest fashion-mnist/{args.split}"
        if args.label_share is not None:
            items = _keep_labels(items, args.label_share)
    elif args.dataset == "skimage-photos":
        from job.datasets import SKIMAGE_PHOTOS, skimage_photo_items

        total, items, desc = len(SKIMAGE_PHOTOS), skimage_photo_items(), "ingest skimage photos"
    else:
        files = scan_folder(Path(args.path))
        if args.limit:
            files = files[: args.limit]
        total, items, desc = len(files), folder_items(files), f"ingest {args.path}"
    summary = IngestSummary()
    with _progress(total, desc) as bar:
        for result in ingest_items(storage, settings, items, workers=args.workers):
            summary.count(result)
            bar.update(1)
    _print_summary(summary)
    return 0


def _ingest_container(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    """``clusterlens ingest --container NAME [--prefix P]``: register the images already there, in place."""
    from shared.ingest import IngestSummary, ingest_container, open_container

    blobs = open_container(storage, args.container, args.prefix or "")  # a clear error before any work
    summary = IngestSummary()
    where = f"{args.container}/{args.prefix or ''}"
    with _progress(None, f"register {where} in place") as bar:  # listed as it goes: no total up front
        for result in ingest_container(storage, settings, blobs, workers=args.workers):
            summary.count(result)
            bar.update(1)
    _print_summary(summary)
    if blobs.skipped:
        print(f"  skipped {blobs.skipped} of {blobs.listed} blobs: not image file names (not read)")
    return 0


def _print_summary(summary: IngestSummary) -> None:
    """The ingest summary line, then the first quarantined images with their reasons."""
    print(f"added {summary.added}, already known {summary.duplicate}, quarantined {summary.quarantined}")
    for problem in summary.problems[:20]:
        print(f"  quarantined {problem.source}: {problem.reason}")
    if len(summary.problems) > 20:
        print(f"  ... and {len(summary.problems) - 20} more (see the quarantine container)")


def _encoder(settings: Settings):  # type: ignore[no-untyped-def]
    from shared.encoder import ImageEncoder

    return ImageEncoder.from_settings(settings)


def cmd_embed(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    if args.backfill:
        from shared.jobs import api_job, enqueue
        from shared.queues import open_job_queues

        record, queued = enqueue(storage, open_job_queues(settings), api_job("embed", {"backfill": True}))
        print(
            f"backfill job {record.job_id} {'queued' if queued else 'was already queued'}: a worker splits the "
            f"pending images into units of {settings.embed_unit_size:,}, and every worker running takes units"
        )
        return 0
    _embed_with_progress(args, settings, storage)
    return 0


def _embed_with_progress(args: argparse.Namespace, settings: Settings, storage: Storage) -> EmbedStats:
    """Embed pending images (at most ``args.first`` when given) with a progress bar; prints what it did."""
    from job.embeddings import embed_pending

    encoder = _encoder(settings)
    bar = _progress(None, f"embed ({encoder.version}, {encoder.providers[0]})")
    with bar:
        stats = embed_pending(
            storage,
            settings,
            encoder,
            progress=bar.update,
            on_total=lambda n: _set_total(bar, n),
            limit=getattr(args, "first", None),
        )
    print(
        f"embedded {stats.embedded} of {stats.pending} pending images "
        f"({stats.images_per_second:.0f} img/s; seconds: {json.dumps(stats.seconds)})"
    )
    if stats.failed:
        print(f"  {len(stats.failed)} images could not be decoded and were skipped")
    return stats


def _set_total(bar: Any, total: int) -> None:
    bar.total = total
    bar.refresh()


def cmd_reindex(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.reindex import reindex

    encoder = _encoder(settings)
    t0 = time.perf_counter()
    result = reindex(storage, settings, encoder.version, force=args.force)
    verb = {
        "full": "built and published",
        "incremental": f"published (+{result.added} added to the existing clusters):",
        "unchanged": "is up to date:",
        "superseded": "was built but not published (a newer build is current):",
    }[result.mode]
    print(
        f"index {result.version} {verb} {result.count} images in {result.nlist} clusters ({result.kind}), "
        f"nprobe {result.nprobe} for recall@10 {result.recall_at_10} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def cmd_index(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from shared.index import current_version, list_versions, read_manifest, rollback

    if args.action == "rollback":
        before, after = rollback(storage, args.to)
        print(f"index rolled back: {before} -> {after} (servers switch within {settings.index_refresh_seconds:g} s)")
        return 0
    current = current_version(storage)
    versions = list_versions(storage)
    if not versions:
        print("no index has been published yet")
        return 0
    print("   version   images  kind      clusters  nprobe  recall@10  space     built")
    for version in versions:
        m = read_manifest(storage, version)
        recall = m.recall.at_10 if m.recall else "-"
        mark = "*" if version == current else " "
        print(
            f"{mark}  {version}  {m.count:>7}  {m.kind:<8}  {m.nlist:>8}  {m.nprobe:>6}  {recall!s:>9}  "
            f"{m.space:<8}  {m.built_at}"
        )
    return 0


def cmd_train_head(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.train_head import train_on_collection

    encoder = _encoder(settings)
    trained, version = train_on_collection(
        storage,
        settings,
        encoder.version,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    t = trained.manifest.train
    print(
        f"projection head {version} trained on {t['train']} labelled images ({len(trained.manifest.classes)} "
        f"classes, {t['device']}{', mixed precision' if t['mixed_precision'] else ''}, {t['seconds']:.1f} s); "
        f"held out {t['held_out']}: accuracy {t['val_accuracy']}, 10-NN accuracy {t['val_knn10_accuracy']}"
    )
    if trained.manifest.dropped_classes:
        dropped = trained.manifest.dropped_classes
        print(f"  left out {len(dropped)} labels with a single image: {', '.join(dropped[:10])}")
    if settings.index_space != "head":
        print("  to search in its 64-d space: CLUSTERLENS_INDEX_SPACE=head clusterlens reindex")
    else:
        print("  run `clusterlens reindex` to build the index in its space")
    return 0


def cmd_label_queue(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from shared.labelling import label_queue
    from shared.live_index import LiveIndex

    out = label_queue(LiveIndex(settings, storage), args.n, args.strategy)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    c = out["classifier"]
    if c:
        print(
            f"classifier {c['version']} ({c['kind']}, {c['labels_used']} labels, held-out accuracy "
            f"{c['accuracy']}); {c['labels_since']} labels since. Strategy: {out['strategy']}"
        )
    else:
        print("no classifier yet: images spread over the clusters (label some, then `clusterlens retrain`)")
    print(f"{out['labelled']} labelled, {out['unlabelled']} unlabelled")
    for item in out["items"]:
        p = item["prediction"]
        guess = f"{p['label']} ({p['prob']:.2f})" if p else "-"
        unsure = f"{item['uncertainty']:.3f}" if item["uncertainty"] is not None else "-"
        print(f"{item['id']}  cluster {item['cluster']:>4}  predicted {guess:<24} uncertainty {unsure}")
    return 0


def cmd_label(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from shared.labelling import submit_labels
    from shared.queues import open_job_queues
    from shared.search import SearchService

    pairs = [(args.id, args.label)] if args.id else []
    if args.csv:
        import csv

        with open(args.csv, newline="", encoding="utf-8") as fh:
            pairs += [(row[0].strip(), row[1].strip()) for row in csv.reader(fh) if len(row) >= 2]
    if not pairs:
        print("clusterlens label: give ID LABEL or --csv FILE", file=sys.stderr)
        return 2
    service = SearchService(settings, storage)
    queues = open_job_queues(settings)
    total_ok = 0
    for start in range(0, len(pairs), settings.max_label_batch):
        chunk = pairs[start : start + settings.max_label_batch]
        body = {"labels": [{"id": i, "label": lab} for i, lab in chunk], "user": args.user or _login()}
        _, out = submit_labels(service.live, queues, body)
        total_ok += out["accepted"]
        for err in out["errors"]:
            print(f"  line {start + err['index'] + 1}: {err['id']}: {err['error']['message']}", file=sys.stderr)
        if out.get("retrain_job"):
            print(f"queued retrain job {out['retrain_job']}")
    print(f"labelled {total_ok} of {len(pairs)}")
    return 0 if total_ok == len(pairs) else 1


def _login() -> str:
    import getpass
    import re

    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "cli"
    return name if re.fullmatch(r"[A-Za-z0-9@._ +-]{1,64}", name) else "cli"


def cmd_retrain(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.retrain import train_and_publish

    if args.kind:
        settings = settings.model_copy(update={"classifier_kind": args.kind})
    encoder = _encoder(settings)
    bar = _progress(None, "retrain", unit="step")
    result = train_and_publish(storage, settings, encoder.version, progress=bar.set_postfix_str)
    bar.close()
    if result.version is None:
        print(f"retrain skipped: {result.reason}")
        return 1
    m = result.metrics
    held = (
        f"held-out accuracy {m['accuracy']}, macro-F1 {m['macro_f1']} on {m['holdout']} labels"
        if m.get("evaluated")
        else f"not evaluated: {m.get('reason')}"
    )
    print(
        f"classifier {result.version} ({settings.classifier_kind}) trained on {result.labels_used} labels, "
        f"{len(result.classes)} classes; {held}; predictions for {result.predictions} images "
        f"({result.seconds.get('total', 0):.1f} s)"
    )
    if result.left_out:
        print(f"  left out (fewer than two labels): {', '.join(result.left_out)}")
    return 0


def cmd_dedupe(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.duplicates import run_dedupe

    if args.precision is not None:
        settings = settings.model_copy(update={"dedupe_precision": args.precision})
    bar = _progress(None, "dedupe", unit="step")

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    result = run_dedupe(storage, settings, _encoder(settings), seed=args.seed, progress=stage)
    bar.close()
    c = result.calibration
    print(
        f"near-duplicates {result.version}: {result.groups} groups of {result.images} images at pixel match >= "
        f"{c['threshold']} (calibrated on {c['copies']} copies for precision {c['target_precision']}: expected "
        f"precision {c['expected_precision']}, recall {c['expected_recall']})"
    )
    if not c["reached"]:
        print("  no threshold reaches the target precision here: only identical images are grouped")
    print("  see them: GET /api/duplicates, or the page's Duplicates view")
    return 0


def cmd_analyse(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.run_analysis import run_analysis, summary
    from shared.storage import REPORTS

    updates: dict[str, Any] = {}
    if args.k is not None:
        updates["analysis_k"] = args.k
    if args.map_sample is not None:
        updates["analysis_map_sample"] = args.map_sample
    if args.maps:
        updates["analysis_maps"] = args.maps
    settings = settings.model_copy(update=updates)
    bar = _progress(None, "analyse", unit="step")

    def stage(name: str, done: int, total: int) -> None:
        bar.set_postfix_str(name)
        bar.update(0 if done else 1)

    out = summary(run_analysis(storage, settings, _encoder(settings).version, progress=stage))
    bar.close()
    where = storage.local_path(REPORTS, f"{out['report_version']}/report.html")
    agreement = out["agreement"]
    print(
        f"report {out['report_version']}: {out['images']} images ({out['labelled']} labelled), k = {out['k']}, "
        f"silhouette {out['silhouette']}"
        + (f", adjusted Rand {agreement['adjusted_rand']}, purity {agreement['purity']}" if agreement else "")
    )
    print("  maps: " + ", ".join(f"{m} {s} s" for m, s in out["maps"].items()))
    if out["accuracy"]:
        accuracy = ", ".join(f"{m} {a}" for m, a in out["accuracy"].items())
        print(f"  held-out accuracy: {accuracy}; best {out['best_model']} (serves POST /api/classify)")
    print(f"  anomalies flagged: {out['anomalies']}; likely mislabels: {out['mislabels']}")
    for step, reason in out["skipped"].items():
        print(f"  skipped {step}: {reason}")
    page = where or f"/api/reports/{out['report_version']}/report.html on the server"
    print(f"  {out['seconds']['total']:.1f} s; open {page}")
    return 0


def cmd_simulate_al(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.simulation import dataset_features, plot_learning_curves, run_simulation

    encoder = _encoder(settings)
    bar = _progress(args.limit or 60_000, f"embed {args.dataset}")
    data = dataset_features(
        settings, encoder, args.dataset, limit=args.limit, test_limit=args.test_limit, progress=bar.update
    )
    bar.close()
    rounds = _progress(None, "simulate", unit="round")
    result = run_simulation(
        data,
        strategies=args.strategies,
        seeds=tuple(range(args.seeds)),
        seed_frac=args.seed_frac,
        batch_frac=args.batch_frac,
        max_frac=args.max_frac,
        small_batch_frac=args.small_batch_frac or None,
        classifier=args.classifier,
        on_round=lambda *a: rounds.update(1),
    )
    rounds.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_learning_curves(result, out.with_suffix(".png"))
    full = result["full_label_accuracy"]
    print(f"full-label accuracy ({args.classifier}, {len(data.y_pool)} labels): {full:.4f}")
    for strategy in args.strategies:
        curve = result[strategy]
        points = ", ".join(
            f"{f:.0%}: {a:.4f}" for f, a in zip(curve["labeled_frac"], curve["accuracy_mean"], strict=True)
        )
        reach = result["labels_to_reach_99pct_of_full"].get(strategy)
        print(f"  {strategy:<17} {points}  (99% of full at {f'{reach:.0%}' if reach else 'not reached'})")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from shared.filters import parse_filters
    from shared.search import SearchService

    service = SearchService(settings, storage)
    filters = parse_filters({"label": args.label, "cluster": args.cluster})
    if args.image:
        out = service.search_image(Path(args.image).read_bytes(), args.k, filters)
    else:
        out = service.search_id(args.id, args.k, filters)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    probes = ", ".join(str(p["cluster"]) for p in out["cluster_probe"])
    print(f"searched clusters {probes} in {out['timing_ms']['total']} ms")
    for rank, r in enumerate(out["results"], 1):
        print(f"{rank:>3}  {r['score']:.4f}  cluster {r['cluster']:>4}  {r['label'] or '-':<14} {r['id']}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    import subprocess

    import uvicorn

    from functions.http_api import create_app

    url = f"http://localhost:{args.port}"
    print(f"\nclusterlens is serving the search page at {url}")
    if settings.api_key is not None:
        key = settings.api_key.get_secret_value()
        print(f"  to label, upload and start jobs from the page, open {url}/#key={key}")
        print(f"  upload:  curl -H 'X-API-Key: {key}' -F image=@some-image.png {url}/api/images")
    else:
        print("  write endpoints (upload, labels, jobs, delete) are closed: set CLUSTERLENS_API_KEY to open them")
    print(f"  health:  curl {url}/api/health")
    print(f"  search:  curl -F image=@some-image.png -F k=5 {url}/api/search")
    print(f"  API docs: {url}/api/docs   (Ctrl-C stops)\n")
    import signal

    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler that
    # ends the process before `finally` could stop the worker, which then outlived the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    worker = None
    if args.worker:  # the same loop as the container jobs, on both local queues
        # Stopping the page stops its worker at once: a running job goes back on the queue for next time.
        # Ctrl-C reaches the worker too; it starts with SIGINT ignored (inherited) until it has set up its
        # own handler, so a Ctrl-C while it is still importing is no traceback: the SIGTERM below ends it.
        default_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            worker = subprocess.Popen([sys.executable, "-m", "tools.cli", "worker", "--requeue-on-stop"])
        finally:
            signal.signal(signal.SIGINT, default_sigint)
        print(f"  a worker (pid {worker.pid}) runs queued jobs and embeds and indexes uploads as they arrive\n")
    try:
        uvicorn.run(create_app(settings=settings), host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:  # stuck in native code: its job's message comes back by itself
                worker.kill()
                worker.wait()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from job.worker import install_signal_handlers, open_worker

    if not args.verbose:
        logging.getLogger("shared").setLevel(logging.INFO)
    worker = open_worker(settings, storage, serve=args.queues)
    install_signal_handlers(worker, requeue=args.requeue_on_stop)
    where = settings.data_dir if settings.storage_backend == "local" else "Azure Storage"
    print(f"clusterlens worker {worker.worker_id}: taking jobs from queues {worker.describe()} ({where})", flush=True)
    stats = worker.run(until_idle=args.until_idle, idle_timeout=args.idle_timeout, max_jobs=args.max_jobs)
    print(f"worker done: {json.dumps(stats.outcomes)}", flush=True)
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    from shared.jobs import JobStore, api_job, enqueue
    from shared.queues import open_job_queues

    store = JobStore(storage)
    if args.action == "start":
        if not args.kind:
            print("clusterlens jobs start: give --kind", file=sys.stderr)
            return 2
        params: dict[str, Any] = {"force": True} if args.force else {}
        if args.kind == "ingest_container":
            if not args.container:
                print("clusterlens jobs start: ingest_container needs --container", file=sys.stderr)
                return 2
            from shared.ingest import open_container

            open_container(storage, args.container, args.prefix or "")  # a clear error now, not in the job
            params = {"container": args.container, **({"prefix": args.prefix} if args.prefix else {})}
        record, queued = enqueue(storage, open_job_queues(settings), api_job(args.kind, params))
        print(f"job {record.job_id} {'queued' if queued else 'was already queued'}")
        return 0
    if args.action == "show":
        if not args.id:
            print("clusterlens jobs show: give --id", file=sys.stderr)
            return 2
        print(json.dumps(store.get(args.id).model_dump(mode="json"), indent=1))
        return 0
    for r in store.recent(args.limit):
        done = r.progress.get("done")
        total = r.progress.get("total")
        progress = f"{done}/{total}" if done is not None else ""
        error = f"  {r.error.code}: {r.error.message}" if r.error else ""
        print(f"{r.created_at:%Y-%m-%d %H:%M:%S}  {r.status:<9} {r.job_id:<40} {progress:>11}{error}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings, storage: Storage) -> int:
    """Ingest, embed the first ``--first`` images and index them (what search needs), then serve; what
    can wait runs as queued jobs on the demo's worker, in order: the rest of the embeddings and the
    index over all of them, the first classifier and the first analysis (minutes: clusters, UMAP, t-SNE).

    The jobs are queued durably before the server starts, so a demo stopped while they run runs them
    the next time; a demo with its classifier and report already built queues nothing.
    """
    steps = [
        argparse.Namespace(
            dataset="fashion-mnist",
            split="train",
            limit=args.limit,
            offset=0,
            path=None,
            label_share=args.label_share,
            workers=INGEST_WORKERS,
        ),
        argparse.Namespace(dataset="skimage-photos", limit=None, path=None, workers=INGEST_WORKERS),
    ]
    for step in steps:
        cmd_ingest(step, settings, storage)
    embedded = _embed_with_progress(args, settings, storage)
    cmd_reindex(argparse.Namespace(force=False), settings, storage)
    queued = _queue_first_jobs(settings, storage, rest=embedded.pending > embedded.embedded + len(embedded.failed))
    if args.no_serve:  # build everything, then exit: run the jobs here
        if queued:
            from job.worker import open_worker

            print(f"running {', '.join(r.job_id for r in queued)} ...")
            stats = open_worker(settings, storage).run(until_idle=True)
            print(f"jobs done: {json.dumps(stats.outcomes)}")
        return 0
    if queued and not args.worker:
        print("  no worker (--no-worker): start `clusterlens worker` to run them")
    if settings.api_key is None:  # the demo's page may write: a key of its own, kept with its data
        settings = settings.model_copy(update={"api_key": SecretStr(demo_key(settings.data_dir))})
    return cmd_serve(args, settings, storage)


def _queue_first_jobs(settings: Settings, storage: Storage, *, rest: bool) -> list[JobRecord]:
    """Queue the rest of the demo's embeddings (``rest``: images are still waiting for theirs) and the
    index over them, its first classifier and its first analysis, unless they are done or on their way.

    Job ids are made from the index version, so a second demo over the same index finds the job the
    first one queued (:func:`shared.jobs.enqueue` queues an id once) instead of adding another.

    Returns:
        The records of the jobs not finished yet (queued now or earlier).
    """
    from datetime import UTC, datetime

    from shared.classifier import current_classifier_version
    from shared.index import current_version
    from shared.jobs import FINISHED, JobKind, JobMessage, JobStore, enqueue
    from shared.queues import open_job_queues
    from shared.reports import current_report

    wanted: list[tuple[JobKind, str, str]] = []
    if rest:  # the page is served on the first images; the rest follow
        wanted.append(("embed", "the rest of the images", "they become searchable when it has run"))
        wanted.append(("reindex", "the index over all of them", "search covers them all once it has run"))
    if current_classifier_version(storage) is None:  # predictions and a labelling queue
        wanted.append(("retrain", "the label classifier", "the Label view shows its predictions once it has run"))
    if current_report(storage) is None:  # clusters, maps and the review lists
        what = "the first analysis (clusters, maps, review lists)"
        wanted.append(("analyse", what, "the Map and Review views show it once it has run"))
    queues = open_job_queues(settings)
    out = []
    for kind, what, after in wanted:
        record = JobStore(storage).pending(kind)
        if record is None:
            job_id = f"{kind}-demo-{current_version(storage) or 'first'}"
            params = {"all": True} if kind == "embed" else {}
            message = JobMessage(job_id=job_id, kind=kind, origin="demo", params=params, created_at=datetime.now(UTC))
            record, _ = enqueue(storage, queues, message)
        if record.status in FINISHED:  # this index's job has run already: say how, rather than run it again
            how = f": {record.error.message}" if record.error else ""
            again = f"`clusterlens jobs start --kind {kind}` runs it again"
            print(f"{what}: job {record.job_id} {record.status}{how} ({again})")
            continue
        print(f"{what}: job {record.job_id} ({record.status}); {after}")
        out.append(record)
    return out


def demo_key(data_dir: Path) -> str:
    """The demo's write key: made once (random, readable by its owner only) and kept in ``data_dir``."""
    path = Path(data_dir) / "demo-api-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError("a number from 1 to 256")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a share is from 0 to 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterlens", description="Search, map and label an image collection.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "ingest",
        help="add images from a folder (class subfolders become labels), a dataset, or a Blob container in place",
    )
    p.add_argument("path", nargs="?", help="folder of images (jpg/png/webp/bmp/tiff), searched recursively")
    p.add_argument("--dataset", choices=DATASETS, help="ingest a packaged dataset instead of a folder")
    p.add_argument(
        "--container",
        help="register the images already in this Blob container (its real name; locally a folder under the "
        "data dir) in place: each is read once, never copied; the app's own containers are refused",
    )
    p.add_argument("--prefix", help="with --container: only blobs whose names start with this")
    p.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--offset", type=int, default=0, help="skip this many dataset images first")
    p.add_argument(
        "--label-share",
        type=_share,
        help="Fashion-MNIST: keep the labels of this share of the images (a fixed random choice), the rest "
        "come in unlabelled, for active learning (default: all labelled)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=INGEST_WORKERS,
        help=f"images in flight at once: their storage round trips overlap (default {INGEST_WORKERS}; 1: in turn)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("embed", help="embed every image not embedded yet")
    p.add_argument(
        "--backfill",
        action="store_true",
        help="queue it as a job instead, split into units that every running worker (job replica) shares",
    )
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("reindex", help="build and publish the cluster-routed index")
    p.add_argument(
        "--force", action="store_true", help="rebuild even if nothing changed, and publish even below the recall target"
    )
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("index", help="list published index versions, or roll back to an earlier one")
    p.add_argument("action", choices=("list", "rollback"))
    p.add_argument("--to", help="version to roll back to (default: the one before the current)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("train-head", help="train the 64-d projection head on the labelled images' embeddings")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.set_defaults(func=cmd_train_head)

    p = sub.add_parser("search", help="similar images by image file or stored id")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", help="query image file")
    g.add_argument("--id", help="stored image id")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--label", help="only images with this label")
    p.add_argument("--cluster", type=int, help="only images in this cluster")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("label-queue", help="the next images to label: least certain first, spread over clusters")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, help="default: CLUSTERLENS_AL_STRATEGY")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_label_queue)

    p = sub.add_parser("label", help="label images: ID LABEL, or a CSV file of id,label rows")
    p.add_argument("id", nargs="?", help="image id")
    p.add_argument("label", nargs="?", help="its label (a class of the label set)")
    p.add_argument("--csv", help="file of id,label rows")
    p.add_argument("--user", default=None, help="who labels (default: your login name)")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("retrain", help="train the label classifier on every label, publish it and its predictions")
    p.add_argument("--kind", choices=("lightgbm", "logistic", "knn"), help="default: CLUSTERLENS_CLASSIFIER_KIND")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("analyse", help="cluster, map, classify and review the collection; publish a report")
    p.add_argument("--k", type=int, help="k-means clusters (default: CLUSTERLENS_ANALYSIS_K; 0: silhouette sweep)")
    p.add_argument("--map-sample", type=int, help="UMAP and t-SNE draw at most this many images")
    p.add_argument("--maps", nargs="+", choices=("pca", "umap", "tsne"), help="which 2-D maps (default: all)")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser("dedupe", help="calibrate the near-duplicate threshold, find the groups, publish them")
    p.add_argument("--precision", type=float, help="target precision (default: CLUSTERLENS_DEDUPE_PRECISION)")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration sample and transforms")
    p.set_defaults(func=cmd_dedupe)

    p = sub.add_parser("simulate-al", help="replay active learning on a labelled dataset (true labels as oracle)")
    p.add_argument("--dataset", choices=("fashion-mnist",), default="fashion-mnist")
    p.add_argument("--limit", type=int, help="pool: the first N training images (default all 60,000)")
    p.add_argument("--test-limit", type=int, help="test: the first N test images (default all 10,000)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGY_CHOICES, default=list(STRATEGY_CHOICES))
    p.add_argument("--seeds", type=int, default=3, help="random seeds (seed sets) to average over")
    p.add_argument("--seed-frac", type=float, default=0.05, help="random seed set, share of the pool")
    p.add_argument("--batch-frac", type=float, default=0.05, help="labels asked per round, share of the pool")
    p.add_argument("--max-frac", type=float, default=0.3, help="stop at this labelled share")
    p.add_argument("--small-batch-frac", type=float, default=0.01, help="the smaller-batch variant; 0: skip it")
    p.add_argument("--classifier", choices=("lightgbm", "logistic", "knn"), default="lightgbm")
    p.add_argument("--out", default="active_learning.json", help="JSON path; the PNG goes beside it")
    p.set_defaults(func=cmd_simulate_al)

    p = sub.add_parser(
        "worker", help="run queued jobs (embed, reindex, train-head, retrain, analyse): the container job's loop"
    )
    p.add_argument("--until-idle", action="store_true", help="exit once its queues are empty")
    p.add_argument(
        "--queues",
        choices=SERVE_CHOICES,
        default="all",
        help="take the GPU kinds' queue (gpu: embed and train_head by default), the others' (cpu), or both (all)",
    )
    p.add_argument("--idle-timeout", type=float, help="with --until-idle: also exit after this many idle seconds")
    p.add_argument("--max-jobs", type=int, help="exit after this many messages")
    p.add_argument(
        "--requeue-on-stop",
        action="store_true",
        help="on Ctrl-C or SIGTERM stop at once, putting the running job back on the queue (default: finish it)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("jobs", help="list recent jobs, show one, or start one")
    p.add_argument("action", nargs="?", choices=("list", "show", "start"), default="list")
    p.add_argument("--id", help="job id (show)")
    p.add_argument(
        "--kind",
        choices=("reindex", "retrain", "train_head", "analyse", "ingest_container", "dedupe"),
        help="job kind (start)",
    )
    p.add_argument("--container", help="start ingest_container: the Blob container to register in place")
    p.add_argument("--prefix", help="start ingest_container: only blobs whose names start with this")
    p.add_argument("--force", action="store_true", help="start: reindex even if nothing changed")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_jobs)

    for name, helptext in (
        ("serve", "serve the API and search page"),
        ("demo", "ingest Fashion-MNIST and sample photos, embed, index, serve"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--port", type=int, default=7071)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument(
            "--worker",
            action=argparse.BooleanOptionalAction,
            default=name == "demo",
            help="also run a worker, so uploads are embedded and searchable within seconds",
        )
        if name == "demo":
            p.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST images to ingest")
            p.add_argument(
                "--label-share",
                type=_share,
                default=0.05,
                help="share of Fashion-MNIST images that keep their label; the rest are for labelling",
            )
            p.add_argument(
                "--first",
                type=int,
                default=2000,
                help="images embedded before the page is served; the demo's worker embeds the rest",
            )
            p.add_argument("--no-serve", action="store_true", help="build everything, then exit")
        p.set_defaults(func=cmd_serve if name == "serve" else cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every HTTP request at INFO
    logging.getLogger("azure.identity").setLevel(logging.ERROR)  # its failures reach the user as our message
    if args.command == "ingest" and sum(map(bool, (args.path, args.dataset, args.container))) != 1:
        print("clusterlens ingest: give one of a folder, --dataset or --container", file=sys.stderr)
        return 2
    if args.command == "ingest" and args.prefix is not None and not args.container:
        print("clusterlens ingest: --prefix goes with --container", file=sys.stderr)
        return 2
    try:
        settings = get_settings()
        return int(args.func(args, settings, open_storage(settings)))
    except ValidationError as exc:
        problems = "; ".join(f"CLUSTERLENS_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"clusterlens: invalid settings: {problems}", file=sys.stderr)
        return 2
    except ClusterlensError as exc:
        print(f"clusterlens {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"clusterlens {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
