"""Diagnostics of SDTP's pruned prefill: one command, one subcommand per question.

* ``needle``: where a scorer loses the needle of the depth sweep, stage by stage (:mod:`.needle`);
* ``start``: whether a pruned run loses a RULER task by dropping the start of the prompt's content, tested by
  protecting it (:mod:`.start`)::

    python -m sdtp_eval.retention.diagnose needle --length 2048 --limit 33 \\
        --pruners shipped attention norm random --out results/training/needle_survival_2k
    python -m sdtp_eval.retention.diagnose start --length 1024 --limit 20 --tasks ruler_cwe --pruner line \\
        --out results/retention/ruler_start_protected_1k

Every subcommand takes ``--length``, ``--limit``, ``--model`` (default: the embedded model), ``--dtype`` and
``--out`` (output stem: ``OUT.json``, ``OUT.md``, ``OUT.png``); ``start`` also ``--tasks``. The model runs on
the CPU, batch 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .. import write_report
from . import needle, start

#: subcommand -> its module: ``DEFAULTS`` (of the shared options), ``add_arguments(parser)`` (its own options),
#: ``run(args, model, tokenizer) -> report``, ``format_markdown(report)``, ``plot(report, path)``
SUBCOMMANDS = {"needle": needle, "start": start}


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every subcommand shares (each sets its own defaults)."""
    parser.add_argument("--length", type=int, help="prompt length in tokens (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="first documents, of each task (default: %(default)s)")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.md, OUT.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdtp_eval.retention.diagnose", description=__doc__.split("\n")[0])
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    for name, module in SUBCOMMANDS.items():
        sub = subcommands.add_parser(
            name, help=module.__doc__.split("\n")[0], description=module.__doc__.split("\n\n")[0]
        )
        common_arguments(sub)
        module.add_arguments(sub)
        sub.set_defaults(**module.DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    from sdtp_core.loading import load_model

    args = build_parser().parse_args(argv)
    module = SUBCOMMANDS[args.subcommand]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    command = "python -m sdtp_eval.retention.diagnose " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, **module.run(args, model, tokenizer)}
    write_report(args.out, report, module.format_markdown(report), module.plot)
    return report
