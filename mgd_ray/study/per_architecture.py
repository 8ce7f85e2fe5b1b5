"""Early stopping for a multi-objective search: ASHA on val mIoU, within each student architecture.

Tune's ASHA ranks trials by one metric. In a search of mIoU against cost, one ASHA over every trial
would rank a cheap student's trials against an expensive one's on mIoU alone, stop the cheap ones at
the first rung, and empty the cheap end of the Pareto front, the part a user with a small budget
came for. Architectures differ in cost, not within one (cost is a function of the architecture), so
a trial is only compared with trials of its own architecture: each has an ASHA of its own, and a
trial is stopped when it falls below the cut of its architecture's rung. An architecture with one
trial is never stopped early.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerArchitectureASHA(FIFOScheduler):
    """One ``ASHAScheduler`` per value of ``trial.config[key]`` (the searched student), made on first sight."""

    def __init__(self, key: str, metric: str | None = None, mode: str | None = None, **asha: Any):
        super().__init__()
        self._key, self._asha_settings = key, asha
        self._metric, self._mode = metric, mode
        self._groups: dict[str, ASHAScheduler] = {}
        self._group_of: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric and metric != self._metric) or (self._mode and mode and mode != self._mode):
            return False
        self._metric, self._mode = self._metric or metric, self._mode or mode
        return True

    def _group(self, tune_controller: Any, trial: Trial) -> ASHAScheduler:
        """The ASHA of the trial's architecture, the trial added to it when first seen."""
        if trial.trial_id not in self._group_of:
            name = str(trial.config.get(self._key))
            if name not in self._groups:
                self._groups[name] = ASHAScheduler(metric=self._metric, mode=self._mode, **self._asha_settings)
            self._group_of[trial.trial_id] = name
            self._groups[name].on_trial_add(tune_controller, trial)
        return self._groups[self._group_of[trial.trial_id]]

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._group(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self._group(tune_controller, trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._group(tune_controller, trial).on_trial_complete(tune_controller, trial, result)
        self._group_of.pop(trial.trial_id)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._group(tune_controller, trial).on_trial_remove(tune_controller, trial)
        self._group_of.pop(trial.trial_id)

    def debug_string(self) -> str:
        return f"ASHA per architecture ({self._key}), trials stopped: {self.stopped()}"

    def stopped(self) -> dict[str, int]:
        """How many trials each architecture's ASHA stopped early."""
        return {name: asha._num_stopped for name, asha in self._groups.items()}
