"""Entry points for ``sdtp_ruler_offline.yaml``'s ``!function`` tags (lm-eval loads them from files next to the YAML).

The implementations live in :mod:`sdtp_eval.retention.ruler`; importing it switches off upstream's nltk download.
"""

from lm_eval.tasks.ruler.common_utils import aggregate_metrics

from sdtp_eval.retention.ruler import (
    niah_multikey_2,
    niah_multikey_3,
    niah_single_1,
    ruler_cwe,
    ruler_fwe,
    ruler_vt,
)

__all__ = [
    "aggregate_metrics",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_single_1",
    "ruler_cwe",
    "ruler_fwe",
    "ruler_vt",
]
