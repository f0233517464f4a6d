"""Lightning callbacks of ko_lightning: the KO schedule refresh, the in-training evaluation and the end-of-fit
sample and guidance reports."""

from ko_lightning.callbacks.eval_callback import EvalCallback
from ko_lightning.callbacks.guidance_report import GuidanceReport
from ko_lightning.callbacks.ko_schedule import KOScheduleCallback
from ko_lightning.callbacks.sample_report import SampleReport
from ko_lightning.kinetic.refresh import RefreshOutcome, RefreshReport

__all__ = ["EvalCallback", "GuidanceReport", "KOScheduleCallback", "RefreshOutcome", "RefreshReport", "SampleReport"]
