"""Offline evaluation data: ``python -m sdtp_eval.data install --from DIR`` (and ``list``).

``install`` converts the original release files in ``DIR`` (layout: see ``docs/data.md``) into the Hub datasets
that lm-eval 0.4.13's *upstream* task YAMLs load -- ``aps/super_glue`` (copa, boolq, cb, wic, wsc.fixed),
``baber/piqa``, ``allenai/winogrande`` (winogrande_xl) and ``regisss/math_qa`` -- and writes them into the
``datasets`` cache, where ``load_dataset`` finds them with ``HF_HUB_OFFLINE=1``. It also copies the LongBench and
LongBench-E jsonl files byte for byte to :func:`sdtp_eval.paths.longbench_file`.

Re-running is cheap and idempotent: a target whose source files (and converter) are unchanged is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the converters import `datasets`; keep `--help` fast by importing them lazily
    from sdtp_eval.datasets import HubTarget

CONVERTER_VERSION = 1  # bump when a conversion changes, so existing installs are rebuilt


@dataclass
class Report:
    """What an install run did, for printing and for the exit status."""

    installed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TargetPlan:
    """How one Hub target will be built: each split and the split it is read from (itself, or a stand-in)."""

    read_from: dict[str, str]
    notes: list[str]


def _say(out: TextIO, message: str) -> None:
    print(message, file=out, flush=True)


def plan_target(target: HubTarget, root: Path) -> TargetPlan | str:
    """The splits to build for ``target`` from ``root``, or the reason it must be skipped (a missing file)."""
    read_from: dict[str, str] = {}
    notes: list[str] = []
    train_missing: Path | None = None
    for split, source in target.splits.items():
        missing = source.missing(root)
        if not missing:
            read_from[split] = split
        elif split == "train" and target.standin_from:
            train_missing = missing[0]
        else:
            return f"missing source file {missing[0]}"
    if "train" not in read_from and target.standin_from:
        if target.standin_from not in read_from:
            return f"no split to stand in for train ({target.standin_from} is not available)"
        why = target.absent.get("train") or f"source file {train_missing} is missing"
        notes.append(
            f"train: STAND-IN, a copy of {target.standin_from} ({why}); lm-eval requires the split to exist "
            f"and draws few-shot examples from it"
        )
        read_from = {"train": target.standin_from, **read_from}
    for split, why in target.absent.items():
        if split != "train":
            notes.append(f"{split}: not installed ({why})")
    return TargetPlan(read_from, notes)


def fingerprint(target: HubTarget, root: Path, plan: TargetPlan) -> str:
    """A short hash of everything an installed copy depends on: source bytes, features, split plan, converter."""
    from sdtp_eval.datasets.longbench import sha256

    files = {name: sha256(root / name) for name in target.source_files() if (root / name).is_file()}
    payload = {
        "converter": CONVERTER_VERSION,
        "repo": target.repo_id,
        "config": target.config_name,
        "features": target.features.to_dict(),
        "splits": plan.read_from,
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def install_target(
    target: HubTarget, root: Path, cache: Path, *, force: bool, dry_run: bool, out: TextIO, report: Report
) -> None:
    """Install one Hub target into the datasets cache at ``cache`` and record the outcome in ``report``."""
    from sdtp_eval.datasets import DataError
    from sdtp_eval.datasets.hub_cache import cached_copies, write_copy

    label = f"{target.task} ({target.repo_id}, {target.config_name})"
    plan = plan_target(target, root)
    if isinstance(plan, str):
        report.skipped.append(f"{label}: {plan}")
        _say(out, f"  skipped: {plan}")
        return
    for note in plan.notes:
        _say(out, f"  note: {note}")
    print_ = fingerprint(target, root, plan)
    copies = cached_copies(cache, target)
    if not force and any(copy.fingerprint == print_ for copy in copies):
        report.skipped.append(f"{label}: already installed and unchanged")
        _say(out, "  skipped: already installed and unchanged")
        return
    hub = [copy for copy in copies if copy.manifest is None]
    if hub and not force:
        reason = f"a copy downloaded from the Hub is already cached ({hub[-1].path}); --force installs over it"
        report.skipped.append(f"{label}: {reason}")
        _say(out, f"  skipped: {reason}")
        return
    try:
        rows = {split: target.splits[split].read(root) for split in dict.fromkeys(plan.read_from.values())}
        for split, rows_of in rows.items():
            expected = target.splits[split].expected_rows
            if expected is not None and len(rows_of) != expected:
                files = ", ".join(str(root / name) for name in target.splits[split].files)
                raise DataError(f"{files}: {len(rows_of)} rows, the official {split} split has {expected}")
    except DataError as error:
        report.errors.append(f"{label}: {error}")
        _say(out, f"  ERROR: {error}")
        return
    sizes = ", ".join(f"{split} {len(rows[source])}" for split, source in plan.read_from.items())
    if dry_run:
        report.installed.append(f"{label}: would install {sizes}")
        _say(out, f"  would install: {sizes}")
        return
    manifest: dict[str, object] = {
        "installed_by": "python -m sdtp_eval.data install",
        "source_dir": str(root),
        "task": target.task,
        "splits": {split: {"rows": len(rows[source]), "from": source} for split, source in plan.read_from.items()},
        "notes": plan.notes,
    }
    split_rows = {split: rows[source] for split, source in plan.read_from.items()}
    path = write_copy(cache, target, split_rows, print_, manifest)
    report.installed.append(f"{label}: {sizes}")
    _say(out, f"  installed: {sizes} -> {path}")


def install_longbench(root: Path, *, force: bool, dry_run: bool, out: TextIO, report: Report) -> None:
    """Copy every LongBench / LongBench-E file of ``root`` byte for byte (see :mod:`sdtp_eval.datasets.longbench`)."""
    from sdtp_eval.datasets import DataError, longbench

    copies = longbench.plan(root)
    if not copies:
        report.skipped.append(f"longbench: missing source files ({root / 'longbench'}/*.jsonl, {root / 'longbench_e'})")
        _say(out, "  skipped: no longbench/*.jsonl or longbench_e/*_e.jsonl files")
        return
    for number, copy in enumerate(copies, start=1):
        label = f"longbench {copy.dataset}"
        prefix = f"  [{number}/{len(copies)}] {copy.dataset}:"
        if not force and copy.unchanged():
            report.skipped.append(f"{label}: already installed and unchanged")
            _say(out, f"{prefix} skipped (already installed and unchanged)")
            continue
        try:
            rows = longbench.validate(copy.source) if dry_run else longbench.install(copy)
        except DataError as error:
            report.errors.append(f"{label}: {error}")
            _say(out, f"{prefix} ERROR: {error}")
            continue
        verb = "would copy" if dry_run else "copied"
        report.installed.append(f"{label}: {rows} rows")
        _say(out, f"{prefix} {verb} {rows} rows -> {copy.destination}")


def run_install(
    source: Path,
    *,
    cache: Path | None = None,
    only: Sequence[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    out: TextIO | None = None,
) -> Report:
    """Install everything selected by ``only`` (task names and/or ``longbench``; default: all) from ``source``.

    Raises :class:`~sdtp_eval.datasets.DataError` when ``source`` is not a directory or ``only`` names an unknown
    target; problems with individual files are recorded in the returned :class:`Report`.
    """
    from sdtp_eval.datasets import TARGETS, DataError
    from sdtp_eval.datasets.hub_cache import default_cache_root

    if not source.is_dir():
        raise DataError(f"source directory {source} does not exist (expected the release files, see docs/data.md)")
    names = [target.key for target in TARGETS] + ["longbench"]
    selected = list(only) if only else names
    unknown = sorted(set(selected) - set(names))
    if unknown:
        raise DataError(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    cache = cache or default_cache_root()
    out = out or sys.stdout
    report = Report()
    chosen = [target for target in TARGETS if target.key in selected]
    _say(out, f"{'Dry run: ' if dry_run else ''}installing from {source} into the datasets cache {cache}")
    for number, target in enumerate(chosen, start=1):
        _say(out, f"[{number}/{len(chosen)}] {target.task}: {target.repo_id} config {target.config_name}")
        install_target(target, source, cache, force=force, dry_run=dry_run, out=out, report=report)
    if "longbench" in selected:
        from sdtp_eval.paths import data_home

        _say(out, f"LongBench files -> {data_home()}")
        install_longbench(source, force=force, dry_run=dry_run, out=out, report=report)
    verb = "would install" if dry_run else "installed"
    _say(out, f"\nDone: {len(report.installed)} {verb}, {len(report.skipped)} skipped, {len(report.errors)} errors.")
    for line in report.skipped:
        _say(out, f"  skipped  {line}")
    for line in report.errors:
        _say(out, f"  ERROR    {line}")
    if not report.errors and not dry_run:
        env = "" if cache == default_cache_root() else f"HF_DATASETS_CACHE={cache} "
        _say(out, f"Run lm-eval offline with: {env}HF_HUB_OFFLINE=1 lm_eval --tasks <tasks> ...")
    return report


def list_installed(cache: Path | None = None, out: TextIO | None = None) -> int:
    """Print every target's cached copies (sdtp-installed or from the Hub) and the LongBench files; return 0."""
    from sdtp_eval.datasets import TARGETS
    from sdtp_eval.datasets.hub_cache import cached_copies, default_cache_root
    from sdtp_eval.paths import data_home

    cache = cache or default_cache_root()
    out = out or sys.stdout
    _say(out, f"datasets cache: {cache}")
    for target in TARGETS:
        copies = cached_copies(cache, target)
        if not copies:
            _say(out, f"  {target.task:<11} {target.repo_id} [{target.config_name}]: not installed")
        for copy in copies[-1:]:  # the newest copy is the one load_dataset uses
            origin = "sdtp (local release)" if copy.manifest else "Hugging Face Hub"
            sizes = ", ".join(f"{split} {count}" for split, count in copy.splits.items())
            _say(out, f"  {target.task:<11} {target.repo_id} [{target.config_name}]: {sizes}  from {origin}")
    files = sorted(data_home().glob("longbench*/*.jsonl"))
    _say(out, f"LongBench files in {data_home()}: {len(files)}")
    for path in files:
        _say(out, f"  {path.parent.name}/{path.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``--help`` documents every option)."""
    parser = argparse.ArgumentParser(
        prog="python -m sdtp_eval.data",
        description="Install the evaluation data from local release files so lm-eval runs offline "
        "(HF_HUB_OFFLINE=1) with its upstream task definitions. See docs/data.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cache_help = (
        "datasets cache to write/read (default: $HF_DATASETS_CACHE, else $HF_HOME/datasets, else "
        "~/.cache/huggingface/datasets). lm-eval must see the same directory, e.g. via HF_DATASETS_CACHE."
    )
    install = commands.add_parser(
        "install",
        help="convert and install the datasets",
        description="Convert the release files in DIR to the Hub datasets lm-eval loads (aps/super_glue, "
        "baber/piqa, allenai/winogrande, regisss/math_qa) in the datasets cache, and copy the LongBench files "
        "to the sdtp data home. Unchanged targets are skipped. Exit status 1 if any file is corrupt.",
    )
    install.add_argument(
        "--from",
        dest="source",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory with the original release files (copa/, piqa/, winogrande/, superglue/, mathqa/, "
        "longbench/, longbench_e/)",
    )
    install.add_argument("--cache-dir", type=Path, help=cache_help)
    install.add_argument(
        "--data-home",
        type=Path,
        help="where the LongBench files go (default: $SDTP_DATA_HOME, else ~/.cache/sdtp/data)",
    )
    install.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated subset: copa,boolq,cb,wic,wsc,piqa,winogrande,mathqa,longbench (default: all)",
    )
    install.add_argument("--dry-run", action="store_true", help="read and check everything, write nothing")
    install.add_argument(
        "--force",
        action="store_true",
        help="reinstall even when unchanged, and install over a copy already downloaded from the Hub",
    )
    listing = commands.add_parser("list", help="show what is installed", description="Show the cached copies.")
    listing.add_argument("--cache-dir", type=Path, help=cache_help)
    listing.add_argument("--data-home", type=Path, help="the sdtp data home to inspect for LongBench files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sdtp_eval.data``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.data_home is not None:
        os.environ["SDTP_DATA_HOME"] = str(args.data_home)
    if args.command == "list":
        return list_installed(args.cache_dir)
    from sdtp_eval.datasets import DataError

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    try:
        report = run_install(args.source, cache=args.cache_dir, only=only, force=args.force, dry_run=args.dry_run)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
