"""Converters from the original release files to the Hub datasets that lm-eval's upstream tasks load.

One module per source (``superglue``, ``piqa``, ``winogrande``, ``mathqa``, ``longbench``); ``hub_cache`` writes
the converted rows where ``datasets.load_dataset`` finds them offline. :data:`TARGETS` lists every
(Hub id, config) in install order.
"""

from __future__ import annotations

from sdtp_eval.datasets import mathqa, piqa, superglue, winogrande
from sdtp_eval.datasets.common import DataError, HubTarget, SplitSource

TARGETS: list[HubTarget] = [*superglue.TARGETS, *piqa.TARGETS, *winogrande.TARGETS, *mathqa.TARGETS]

__all__ = ["TARGETS", "DataError", "HubTarget", "SplitSource"]
