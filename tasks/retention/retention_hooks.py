"""Entry points for the needle depth sweep and LongBench NLL YAMLs' ``!function`` tags.

lm-eval loads ``!function`` targets only from files next to the YAMLs; the implementations live in
:mod:`sdtp_eval.retention.needle` and :mod:`sdtp_eval.retention.longbench_nll`.
"""

from sdtp_eval.retention.longbench_nll import load_dataset as nll_dataset
from sdtp_eval.retention.longbench_nll import process_results as nll_results
from sdtp_eval.retention.needle import load_dataset as needle_dataset
from sdtp_eval.retention.needle import process_results as needle_results

__all__ = ["needle_dataset", "needle_results", "nll_dataset", "nll_results"]
