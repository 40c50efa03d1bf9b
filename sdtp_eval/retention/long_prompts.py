"""The documents of loglikelihood tasks whose model input reaches N tokens, as lm_eval ``--samples`` JSON.

The deployment policy (``min_prompt_tokens=256``) prunes only those inputs and computes every
shorter one unpruned. So a policy run of just these documents, completed by the dense run's
values (``paired --fill default=dense``), gives a task's policy column at a fraction of a full
run's cost (BoolQ: 230 of 3,270 documents)::

    python -m sdtp_eval.retention.long_prompts --tasks boolq cb --min-tokens 256 --out runs/long_docs.json
    lm_eval --model sdtp --tasks boolq,cb --samples runs/long_docs.json --log_samples ...

Inputs are measured as the ``sdtp`` model builds them: lm-eval's own requests for each task (its prompts,
0-shot), encoded by HFLM's ``_encode_pair`` with the model's tokenizer, then ``SDTPLM.model_input``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def input_lengths(lm, task_names: list[str]) -> dict[str, dict[int, int]]:
    """``{task: {doc_id: longest model input over the document's loglikelihood requests}}`` for ``lm``, the
    ``sdtp`` model (its ``model_input``, the input its pruning decides on)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(task_names, TaskManager())
    lengths: dict[str, dict[int, int]] = {}
    for name in task_names:
        task = tasks[name]
        if task.OUTPUT_TYPE not in ("multiple_choice", "loglikelihood"):
            raise ValueError(f"{name} is a {task.OUTPUT_TYPE} task; this measures loglikelihood inputs only")
        task.build_all_requests()
        longest = lengths.setdefault(name, {})
        for instance in task.instances:
            context, continuation = instance.args
            n = len(lm.model_input(*lm._encode_pair(context, continuation)))
            longest[instance.doc_id] = max(n, longest.get(instance.doc_id, 0))
    return lengths


def long_documents(lengths: dict[str, dict[int, int]], min_tokens: int) -> dict[str, list[int]]:
    """``{task: sorted doc_ids}`` of the documents with an input of at least ``min_tokens`` tokens (tasks
    without one are left out)."""
    found = {task: sorted(d for d, n in docs.items() if n >= min_tokens) for task, docs in lengths.items()}
    return {task: docs for task, docs in found.items() if docs}


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval loglikelihood tasks, e.g. boolq cb")
    parser.add_argument("--min-tokens", type=int, default=None, help="default: 256, the policy's")
    parser.add_argument("--pretrained", default=None, help="model (default: the embedded one); sets the tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for lm_eval --samples")
    args = parser.parse_args(argv)
    from sdtp_core.loading import POLICY_MIN_PROMPT_TOKENS
    from sdtp_eval.model import SDTPLM

    min_tokens = POLICY_MIN_PROMPT_TOKENS if args.min_tokens is None else args.min_tokens
    lm = SDTPLM(pretrained=args.pretrained, prune="false", dtype="float32")
    lengths = input_lengths(lm, args.tasks)
    found = long_documents(lengths, min_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found))
    for task, docs in lengths.items():
        print(f"{task}: {len(found.get(task, []))} of {len(docs)} documents have an input of >= {min_tokens} tokens")
    return found


if __name__ == "__main__":
    main()
