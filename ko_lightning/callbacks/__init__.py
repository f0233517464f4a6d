"""Lightning callbacks of ko_lightning."""

from ko_lightning.callbacks.ko_schedule import KOScheduleCallback, RefreshOutcome, RefreshReport
from ko_lightning.callbacks.report import SampleReport

__all__ = ["KOScheduleCallback", "RefreshOutcome", "RefreshReport", "SampleReport"]
