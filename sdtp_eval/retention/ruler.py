"""lm-eval 0.4.13's own RULER tasks, made runnable offline with the embedded model's tokenizer.

Nothing of RULER is re-implemented: the ``sdtp_ruler_offline`` group (``tasks/retention/sdtp_ruler_offline.yaml``)
lists the upstream tasks whose haystack is built locally and only swaps in the wrappers below as their
``custom_dataset``. A wrapper

* names a tokenizer when the run gives none (upstream stops with an assertion): ``tokenizer`` /
  ``pretrained`` of the metadata, else the embedded Qwen2.5-Coder-0.5B-Instruct directory;
* defaults ``max_seq_lengths`` to :data:`DEFAULT_LENGTHS` (upstream: 4096 only);
* calls the upstream generator unchanged, then orders its rows by (sample index, length), so that
  ``--limit N`` takes samples of every length instead of the first N of the shortest (upstream lists
  all samples of one length before the next).

Importing this module also imports ``lm_eval.tasks.ruler.prepare_niah`` with ``nltk.download`` switched off:
upstream tries to download nltk's ``punkt_tab`` at import time, which only its essay haystack (a Hub data set,
so never offline anyway) uses.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sdtp_eval.retention import tokenizer_name

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096)

OFFLINE_TASKS: dict[str, str] = {
    "niah_single_1": "niah_utils.niah_single_1",
    "niah_multikey_2": "niah_utils.niah_multikey_2",
    "niah_multikey_3": "niah_utils.niah_multikey_3",
    "ruler_vt": "vt_utils.get_vt_dataset",
    "ruler_cwe": "cwe_utils.get_cw_dataset",
    "ruler_fwe": "fwe_utils.fwe_download",
}
"""Upstream RULER tasks whose data is generated locally -> their upstream ``custom_dataset`` function."""

ONLINE_TASKS: dict[str, str] = {
    "niah_single_2": "essay haystack: Hub data set baber/paul_graham_essays (+ nltk punkt_tab)",
    "niah_single_3": "essay haystack: Hub data set baber/paul_graham_essays (+ nltk punkt_tab)",
    "niah_multikey_1": "essay haystack: Hub data set baber/paul_graham_essays (+ nltk punkt_tab)",
    "niah_multiquery": "essay haystack: Hub data set baber/paul_graham_essays (+ nltk punkt_tab)",
    "niah_multivalue": "essay haystack: Hub data set baber/paul_graham_essays (+ nltk punkt_tab)",
    "ruler_qa_squad": "downloads SQuAD v2 dev JSON (rajpurkar.github.io)",
    "ruler_qa_hotpot": "downloads HotpotQA dev JSON from the Hub",
}
"""Upstream RULER tasks that need a download, and why."""


@contextmanager
def no_nltk_download() -> Iterator[None]:
    """Make ``nltk.download`` a logged no-op for the duration (upstream calls it at import time)."""
    import nltk

    original = nltk.download

    def refuse(info_or_id: Any = None, *args: Any, **kwargs: Any) -> bool:
        logger.info("sdtp: not downloading nltk data %r (only RULER's online essay haystack needs it)", info_or_id)
        return False

    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = original


def upstream(target: str) -> Callable[..., Any]:
    """The upstream function ``module.func`` of ``lm_eval.tasks.ruler`` (imported without nltk downloads)."""
    module_name, func = target.rsplit(".", 1)
    with no_nltk_download():
        module = importlib.import_module(f"lm_eval.tasks.ruler.{module_name}")
    return getattr(module, func)


def offline_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The metadata an upstream generator gets: a resolved ``tokenizer`` and default ``max_seq_lengths``."""
    out = dict(kwargs)
    out["tokenizer"] = tokenizer_name(kwargs)
    lengths = out.get("max_seq_lengths") or list(DEFAULT_LENGTHS)
    out["max_seq_lengths"] = [int(n) for n in lengths]
    return out


def interleave_lengths(data: dict[str, Any]) -> dict[str, Any]:
    """Upstream's ``{"test": Dataset}`` with rows ordered by (``index``, ``max_length``), nothing else changed."""
    test = data["test"]
    keys = list(zip(test["index"], test["max_length"]))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return {**data, "test": test.select(order)}


def _wrapper(task: str) -> Callable[..., Any]:
    target = OFFLINE_TASKS[task]

    def build(**kwargs: Any) -> Any:
        kwargs = offline_kwargs(kwargs)
        logger.info("sdtp: RULER %s at %s tokens, tokenizer %s", task, kwargs["max_seq_lengths"], kwargs["tokenizer"])
        return interleave_lengths(upstream(target)(**kwargs))

    build.__name__ = task
    build.__doc__ = f"Upstream ``{target}`` with the offline defaults of :func:`offline_kwargs`."
    return build


niah_single_1 = _wrapper("niah_single_1")
niah_multikey_2 = _wrapper("niah_multikey_2")
niah_multikey_3 = _wrapper("niah_multikey_3")
ruler_vt = _wrapper("ruler_vt")
ruler_cwe = _wrapper("ruler_cwe")
ruler_fwe = _wrapper("ruler_fwe")

# Before lm-eval loads the upstream YAMLs, whose !function imports prepare_niah (which would try the download and
# then print "Downloaded punkt_tab" whatever happened).
with no_nltk_download(), contextlib.redirect_stdout(io.StringIO()):
    importlib.import_module("lm_eval.tasks.ruler.prepare_niah")
