"""lm-evaluation-harness integration of SDTP: the ``sdtp`` model, LongBench tasks and metrics, offline data.

Importing this package is cheap (no torch, no lm_eval): the interpreter imports it at start-up through
``sdtp_lm_eval_hook.pth`` to register the model and tasks lazily when lm_eval itself is imported.
"""

from pathlib import Path


def tasks_dir() -> Path:
    """Directory of this package's lm-eval task YAMLs (``tasks/`` of the repository)."""
    installed = Path(__file__).resolve().parent / "tasks"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "tasks"  # editable install / source checkout
