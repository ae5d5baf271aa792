"""Timer triggers: queue reindex and retrain jobs on schedules from app settings."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.jobs import JobKind, schedule_job
from shared.runtime import get_runtime

log = logging.getLogger(__name__)
bp = func.Blueprint()


def _fire(kind: JobKind, schedule: str, timer: func.TimerRequest) -> None:
    rt = get_runtime()
    record, queued = schedule_job(rt.storage, rt.queue, kind, schedule)
    log.info(
        "%s timer%s: job %s %s",
        kind,
        " (past due)" if timer.past_due else "",
        record.job_id,
        "queued" if queued else "was already queued for this slot",
    )


def reindex_timer(timer: func.TimerRequest) -> None:
    """Queue the reindex of this schedule slot (a late or repeated firing finds it queued)."""
    _fire("reindex", get_runtime().settings.reindex_schedule, timer)


def retrain_timer(timer: func.TimerRequest) -> None:
    """Queue the retrain of this schedule slot."""
    _fire("retrain", get_runtime().settings.retrain_schedule, timer)


bp.function_name("reindex_timer")(
    bp.timer_trigger(arg_name="timer", schedule="%REINDEX_SCHEDULE%", run_on_startup=False, use_monitor=True)(
        reindex_timer
    )
)
bp.function_name("retrain_timer")(
    bp.timer_trigger(arg_name="timer", schedule="%RETRAIN_SCHEDULE%", run_on_startup=False, use_monitor=True)(
        retrain_timer
    )
)
