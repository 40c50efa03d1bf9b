"""Zero-config registration with lm-eval, run at interpreter start-up by ``sdtp_lm_eval_hook.pth``.

lm-eval 0.4.13 has no plugin discovery for models, and its ``TaskManager`` only scans built-in tasks
plus ``--include_path``. This module installs a tiny import hook that does nothing until
``lm_eval.models`` or ``lm_eval.tasks.manager`` is imported; right *after* lm-eval has executed them it

* registers ``sdtp`` as a lazy placeholder (``sdtp_eval.model:SDTPLM``), so lm-eval's own built-ins are
  registered first (registering earlier would make lm-eval skip them) and nothing heavy is imported;
* makes every ``TaskManager`` also scan this package's task directory, after the built-ins, so its
  ``longbench_*`` tasks replace lm-eval's tasks of the same names (silently: the docs say so once);
* gives lm-eval's HF backend the embedded model as its default ``pretrained``, so
  ``lm_eval --tasks longbench_narrativeqa`` (model ``hf``, no model_args) runs; an explicit
  ``pretrained`` is left untouched.

It imports neither torch nor lm_eval itself. A failure inside the hook never breaks ``lm_eval``: it
warns once and leaves lm-eval as it is (``--include_path`` then reaches the tasks). Set
``SDTP_NO_LM_EVAL_HOOK=1`` to disable it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
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
    logging.getLogger("lm_eval.tasks._index").addFilter(_quiet_overrides)


def _quiet_overrides(record: logging.LogRecord) -> bool:
    """Drop lm-eval's "Task ... overrides existing task" warnings for this package's own tasks."""
    if "overrides existing task" not in str(record.msg):
        return True
    from sdtp_eval import tasks_dir

    return not (len(record.args or ()) >= 2 and str(record.args[1]).startswith(str(tasks_dir())))


def patch_hf_default_pretrained(module) -> None:
    """``HFLM(pretrained=None)`` loads the embedded model instead of failing; anything else is unchanged."""
    cls = module.HFLM
    if getattr(cls, "_sdtp_default_pretrained", False):
        return
    original_init = cls.__init__

    def __init__(self, *args, **kwargs):
        if not args and kwargs.get("pretrained") is None:
            from sdtp_core.embedded import EMBEDDED_MODEL_NAME, resolve_pretrained

            kwargs["pretrained"] = resolve_pretrained(None)
            logging.getLogger("lm_eval.sdtp").info(
                "no pretrained model given: using sdtp's embedded %s (%s)", EMBEDDED_MODEL_NAME, kwargs["pretrained"]
            )
        original_init(self, *args, **kwargs)

    cls.__init__ = functools.wraps(original_init)(__init__)
    cls._sdtp_default_pretrained = True


_AFTER_IMPORT = {
    "lm_eval.models": lambda module: register_model(),
    "lm_eval.tasks.manager": patch_task_manager,
    "lm_eval.models.huggingface": patch_hf_default_pretrained,
}
_warned = False


def _safely(after, module) -> None:
    """Run a registration step; on any error warn once and leave lm-eval untouched."""
    global _warned
    try:
        after(module)
    except Exception as e:  # never break lm_eval (for any model) because of this hook
        if not _warned:
            _warned = True
            from sdtp_eval import tasks_dir

            logging.getLogger("lm_eval.sdtp").warning(
                "sdtp could not register itself with this lm-eval (%s: %s). lm-eval works as usual. For sdtp's "
                "tasks pass `--include_path %s`; the `sdtp` model is registered by `import sdtp_eval.model` "
                "(Python API) or by lm-eval's entry-point discovery where it has one.",
                type(e).__name__,
                e,
                tasks_dir(),
            )


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped, after):
        self._wrapped, self._after = wrapped, after

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)  # lm-eval's own import: its errors are its own
        _safely(self._after, module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        after = _AFTER_IMPORT.get(fullname)
        if after is None:
            return None
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, after)
            return spec
        except Exception:  # let the regular import machinery find it
            return None


def install() -> None:
    """Install the import hook (idempotent); applies at once to modules lm-eval already imported."""
    if os.environ.get("SDTP_NO_LM_EVAL_HOOK") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name, after in _AFTER_IMPORT.items():
        if name in sys.modules:
            _safely(after, sys.modules[name])
    sys.meta_path.insert(0, _Finder())


install()
