"""Zero-config registration with lm-eval, run at interpreter start-up by ``sdtp_lm_eval_hook.pth``.

lm-eval 0.4.13 has no plugin discovery for models, and its ``TaskManager`` only scans built-in tasks
plus ``--include_path``. This module installs a tiny import hook that does nothing until
``lm_eval.models`` or ``lm_eval.tasks.manager`` is imported; right *after* lm-eval has executed them it

* registers ``sdtp`` as a lazy placeholder (``sdtp_eval.model:SDTPLM``), so lm-eval's own built-ins are
  registered first (registering earlier would make lm-eval skip them) and nothing heavy is imported;
* makes every ``TaskManager`` also scan this package's task directory, after the built-ins, so its
  ``longbench_*`` tasks replace lm-eval's tasks of the same names.

It imports neither torch nor lm_eval itself. Set ``SDTP_NO_LM_EVAL_HOOK=1`` to disable it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

MODEL_NAME = "sdtp"
MODEL_TARGET = "sdtp_eval.model:SDTPLM"


def register_model() -> None:
    """Register the ``sdtp`` model with lm-eval's registry (lazily, by import path)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def patch_task_manager(module) -> None:
    """Make ``module.TaskManager`` include this package's tasks (after the built-ins, so they win)."""
    from sdtp_eval import tasks_dir

    cls = module.TaskManager
    if getattr(cls, "_sdtp_patched", False):
        return
    original_init = cls.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        paths = (
            []
            if include_path is None
            else list(include_path)
            if isinstance(include_path, (list, tuple))
            else [include_path]
        )
        ours = str(tasks_dir())
        if ours not in map(str, paths):
            paths.insert(0, ours)  # user paths come later and override ours
        original_init(self, *args, include_path=paths, **kwargs)

    cls.__init__ = __init__
    cls._sdtp_patched = True


_AFTER_IMPORT = {
    "lm_eval.models": lambda module: register_model(),
    "lm_eval.tasks.manager": patch_task_manager,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped, after):
        self._wrapped, self._after = wrapped, after

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        self._after(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        after = _AFTER_IMPORT.get(fullname)
        if after is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, after)
        return spec


def install() -> None:
    """Install the import hook (idempotent); applies at once to modules lm-eval already imported."""
    if os.environ.get("SDTP_NO_LM_EVAL_HOOK") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name, after in _AFTER_IMPORT.items():
        if name in sys.modules:
            after(sys.modules[name])
    sys.meta_path.insert(0, _Finder())


install()
