"""Materialise a converted dataset in the ``datasets`` library's own cache, where offline ``load_dataset`` finds it.

With ``HF_HUB_OFFLINE=1`` (or when the Hub is unreachable) ``datasets.load_dataset("aps/super_glue", "copa")``
falls back to the *datasets cache*: ``$HF_DATASETS_CACHE/aps___super_glue/copa/<version>/<hash>/`` holding a
``dataset_info.json`` (features, ``config_name``, split sizes) and one Arrow stream file per split
(``super_glue-validation.arrow``). Every ``datasets`` release that lm-eval 0.4.13 accepts (>= 2.16) reads this
layout through its ``cache`` builder, and it is exactly what an online ``load_dataset`` leaves behind, so the
upstream task YAMLs work unchanged. (A Hub-cache snapshot, ``$HF_HUB_CACHE/datasets--aps--super_glue``, is not
enough: ``datasets`` 5 refuses to resolve Hub repositories at all when offline, before looking at that cache.)

Each copy written here carries an ``sdtp_install.json`` manifest; copies without one came from the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets.arrow_writer import ArrowWriter

from sdtp_eval.datasets.common import HubTarget, Row

MANIFEST = "sdtp_install.json"
VERSION = "0.0.0"  # what the datasets library uses for data-file (parquet) repositories


def default_cache_root() -> Path:
    """The datasets cache in effect: ``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets`` (``~/.cache/huggingface``)."""
    return Path(datasets.config.HF_DATASETS_CACHE).expanduser()


def dataset_name(target: HubTarget) -> str:
    """The builder's dataset name: the repository name in snake case (prefix of the Arrow file names)."""
    return datasets.naming.camelcase_to_snakecase(target.repo_id.split("/")[-1])


def config_dir(root: Path, target: HubTarget) -> Path:
    """``<root>/<namespace>___<name>/<config>``: the directory holding every cached copy of this config."""
    namespace, _, _ = target.repo_id.rpartition("/")
    folder = f"{namespace}___{dataset_name(target)}" if namespace else dataset_name(target)
    return root / folder / target.config_name


@dataclass(frozen=True)
class CachedCopy:
    """One prepared copy of a config in the datasets cache (``manifest`` is ``None`` for Hub downloads)."""

    path: Path
    splits: dict[str, int]
    manifest: dict[str, Any] | None

    @property
    def fingerprint(self) -> str | None:
        """The source fingerprint recorded by sdtp, if sdtp wrote this copy."""
        return None if self.manifest is None else self.manifest.get("fingerprint")


def cached_copies(root: Path, target: HubTarget) -> list[CachedCopy]:
    """Every complete copy of ``target`` in the cache at ``root``, oldest first (the newest is the one loaded)."""
    copies = []
    base = config_dir(root, target)
    for path in base.glob("*/*"):
        info_file = path / "dataset_info.json"
        if path.name.startswith(".") or path.name.endswith(".incomplete") or not info_file.is_file():
            continue
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
            splits = {name: int(split.get("num_examples", 0)) for name, split in (info.get("splits") or {}).items()}
        except (OSError, ValueError, AttributeError):
            continue
        manifest_file = path / MANIFEST
        manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else None
        copies.append(CachedCopy(path, splits, manifest))
    return sorted(copies, key=lambda copy: copy.path.stat().st_mtime)


def _write_split(path: Path, rows: list[Row], features: datasets.Features) -> tuple[int, int]:
    table = datasets.Dataset.from_list(rows, features=features).data.table
    writer = ArrowWriter(features=features, path=str(path))
    try:
        writer.write_table(table)
        return writer.finalize()
    finally:
        writer.close()


def write_copy(
    root: Path, target: HubTarget, split_rows: dict[str, list[Row]], fingerprint: str, manifest: dict[str, Any]
) -> Path:
    """Write ``split_rows`` as the cached copy ``<config dir>/0.0.0/<fingerprint>`` and return its path.

    The copy is assembled in a hidden temporary directory and renamed into place, so a failure leaves nothing
    half-written that ``datasets`` could pick up. Older copies written by sdtp for this config are removed
    afterwards; copies downloaded from the Hub are left alone.
    """
    version_dir = config_dir(root, target) / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    final = version_dir / fingerprint
    temp = version_dir / f".sdtp-tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        name = dataset_name(target)
        splits = datasets.SplitDict(dataset_name=name)
        for split, rows in split_rows.items():
            count, size = _write_split(temp / f"{name}-{split}.arrow", rows, target.features)
            splits.add(datasets.SplitInfo(name=split, num_bytes=size, num_examples=count, dataset_name=name))
        info = datasets.DatasetInfo(
            description=f"Installed offline by sdtp_eval.data from the original release files ({MANIFEST}).",
            features=target.features,
            builder_name="parquet",
            dataset_name=name,
            config_name=target.config_name,
            version=VERSION,
            splits=splits,
        )
        info.write_to_directory(str(temp))
        (temp / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": fingerprint}, indent=2), encoding="utf-8")
        if final.exists():  # --force over an identical copy: swap, then drop the old one
            old = version_dir / f".sdtp-old-{fingerprint}-{os.getpid()}"
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    for copy in cached_copies(root, target):
        if copy.manifest is not None and copy.path != final:
            shutil.rmtree(copy.path, ignore_errors=True)
    return final
