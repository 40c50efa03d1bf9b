"""Entry points for the YAMLs' ``!function`` tags (lm-eval loads these only from files next to the YAMLs).

The implementations live in :mod:`sdtp_eval.longbench.tasks`.
"""

from sdtp_eval.longbench.tasks import load_dataset, percent_mean, process_results

__all__ = ["load_dataset", "percent_mean", "process_results"]
