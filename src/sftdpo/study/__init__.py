"""Whole studies from one YAML spec: spec.py (grid expansion), runner.py (the study directory and its
run), local.py / ray.py (executors; `--jobs N`, Ray tasks), schedule.py (which run starts when, the
ETA), process.py (one run's process), index.py (study.db from the run directories), cost.py and
rates.py (estimates from measured rates). Imports go down: runner -> executors -> schedule -> process."""

from .runner import StudyDir, run_study
from .spec import expand, load_spec

__all__ = ["StudyDir", "expand", "load_spec", "run_study"]
