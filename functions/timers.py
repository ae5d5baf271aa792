"""Timer triggers: queue reindex and retrain jobs on schedules from app settings."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.jobs import JobKind, schedule_job
from shared.runtime import get_runtime

log = logging.getLogger(__name__)
bp = func.Blueprint()


def _fire(kind: JobKind, timer: func.TimerRequest) -> None:
    rt = get_runtime()
    schedule = rt.settings.reindex_schedule if kind == "reindex" else rt.settings.retrain_schedule
    record, queued = schedule_job(rt.storage, rt.queues, kind, schedule)
    what = "queued" if queued else "was already queued for this slot"  # a late or repeated firing finds it
    log.info("%s timer%s: job %s %s", kind, " (past due)" if timer.past_due else "", record.job_id, what)


def reindex_timer(timer: func.TimerRequest) -> None:
    """Queue the reindex of this schedule slot."""
    _fire("reindex", timer)


def retrain_timer(timer: func.TimerRequest) -> None:
    """Queue the retrain of this schedule slot."""
    _fire("retrain", timer)


# Registered without rebinding the names, so tests call the functions as the host would.
for handler, schedule in ((reindex_timer, "%REINDEX_SCHEDULE%"), (retrain_timer, "%RETRAIN_SCHEDULE%")):
    fire = bp.timer_trigger(arg_name="timer", schedule=schedule, run_on_startup=False, use_monitor=True)
    bp.function_name(handler.__name__)(fire(handler))
