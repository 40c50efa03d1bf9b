"""Per-stage wall-clock timing, profiler labels and memory figures for the prefill and decoding paths.

:class:`StageTimer` is the optional hook of :meth:`SDTPEngine.prefill`, :meth:`SDTPEngine.decode_step`
and :func:`~sdtp_core.generate.generate`: each named stage runs inside ``with timer("name"):``, which
adds its wall seconds to a per-name total and, when a :mod:`torch.profiler` session is active, labels
it with :func:`torch.profiler.record_function` so a Chrome trace shows one event per layer and stage.
On CUDA the timer synchronizes before reading the clock, so a stage's time is its GPU work. Without a
timer the instrumented code uses :func:`stage`, which returns one shared :class:`contextlib.nullcontext`
(no clock reads, no profiler calls).

Stage names are ``"<phase>/<stage>"``: ``prefill/embed``, ``prefill/layer.07``, ``prefill/prune.3``,
``prefill/head``, ``decode/embed``, ``decode/cache``, ``decode/layer.07``, ``decode/head``,
``decode/select``. :func:`group_stages` folds the per-layer entries into the segments between pruning
stages for reports.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

_NULL = contextlib.nullcontext()


class StageTimer:
    """Accumulates wall seconds and call counts per named stage.

    Args:
        device: synchronize this CUDA device around every stage (ignored on CPU).
        label: also emit :func:`torch.profiler.record_function` ranges (cheap when no profiler runs).
    """

    def __init__(self, device: torch.device | str | None = None, label: bool = True):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._cuda = device if device.type == "cuda" else None
        self._label = label
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block under ``name``."""
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        labelled = torch.profiler.record_function(name) if self._label else _NULL
        with labelled:
            start = time.perf_counter()
            try:
                yield
            finally:
                if self._cuda is not None:
                    torch.cuda.synchronize(self._cuda)
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def phase(self, prefix: str) -> dict[str, float]:
        """Seconds of the stages whose name starts with ``prefix/`` (prefix stripped), in first-use order."""
        return {k.split("/", 1)[1]: v for k, v in self.seconds.items() if k.startswith(prefix + "/")}

    def total(self, prefix: str) -> float:
        return sum(self.phase(prefix).values())


def stage(timer: StageTimer | None, name: str) -> contextlib.AbstractContextManager:
    """``timer(name)``, or a no-op context when there is no timer."""
    return _NULL if timer is None else timer(name)


def segment_names(num_layers: int, stage_layers: list[int]) -> list[str]:
    """Report name of the segment each layer belongs to: ``"layers 0-3"``, ``"layers 4-5"``, ..."""
    bounds = [0, *[s for s in stage_layers if 0 < s < num_layers], num_layers]
    names = []
    for a, b in zip(bounds, bounds[1:]):
        names += [f"layers {a}-{b - 1}"] * (b - a)
    return names


def group_stages(stages: dict[str, float], num_layers: int, stage_layers: list[int]) -> dict[str, float]:
    """Fold ``layer.NN`` entries of one phase into their segments, keeping every other stage in order.

    Segments are placed where their first layer ran, so the result reads in execution order; the
    values sum to the same total as ``stages``.
    """
    seg = segment_names(num_layers, stage_layers)
    out: dict[str, float] = {}
    for name, seconds in stages.items():
        key = seg[int(name.split(".", 1)[1])] if name.startswith("layer.") else name
        out[key] = out.get(key, 0.0) + seconds
    return out
