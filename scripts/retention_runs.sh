#!/usr/bin/env bash
# The lm_eval runs behind results/retention/, results/training/ and the paper's Table 3 in results/paper_tables/
# (issue 11); the history of these runs: docs/history.md.
#
#   bash scripts/retention_runs.sh lbgen dense        # LongBench generation, one configuration
#   bash scripts/retention_runs.sh lbgen llmlingua 10 # the same, first 10 rows of each task (into lbgen10/)
#   bash scripts/retention_runs.sh table3 dense copa  # one Table 3 task (all eight without a task)
#   bash scripts/retention_runs.sh t3report attention default  # per-task reports of the Table 3 runs so far
#   bash scripts/retention_runs.sh t3long default     # the Table 3 documents whose prompts the default prunes
#   bash scripts/retention_runs.sh t3part dense mathqa 0 500   # a chunk of a long Table 3 task: documents 0-499
#   bash scripts/retention_runs.sh t3partreport attention mathqa 0   # its report, dense vs attention
#   bash scripts/retention_runs.sh ruler dense 2048   # the offline RULER group at one length, 20 rows a task
#   bash scripts/retention_runs.sh needle dense 2k 55 # the needle depth sweep, first 55 documents (5 per depth)
#   bash scripts/retention_runs.sh nll dense          # LongBench answer NLL, 46 answers at 2048 tokens
#   bash scripts/retention_runs.sh nllx dense         # a second answer-NLL set: 41 answers (2wikimqa_e, multifieldqa_en_e)
#
# Configurations: dense, default (the package's defaults until 2026-12-06, spelled out: attention scorer, prompts
# under 256 tokens dense), spread_default (the defaults since: the spread scorer at its layers, prompts under 256
# dense), line_default (the defaults since 2026-12-06 evening: the line scorer, prompts under 256 dense), sdtp
# (the shipped trained pruner), attention, attention64 (its query window 64 instead of 8), pooled
# (window 64, scores max-pooled over 31 slots), late_pooled (pooled, with 8 stages from
# layer 8 at keep 0.835 instead of 10 from layer 4 at 0.9: the same 1/tau 1.53), odd and pooled_odd (attention and
# pooled at the 10 odd layers 3, 5, ..., 21 instead of 4, 6, ..., 22: one layer earlier each; pooled_union_odd: there,
# a token survives if pooled or plain attention ranks it high), spread_odd (attention:64:63:15 at the odd layers: each
# token takes the highest score of the 63 slots before it and 15 after, so a key the question attends to keeps the value
# that follows it; spread31_odd: a span of 31 before and 7 after; spread_union_odd: its union with plain attention;
# these three ran before protected tokens stopped lending their scores to the span, commit a7b01d9 and earlier),
# spread_odd2 (spread_odd since protected tokens lend nothing: the default scorer, at every prompt length),
# sentence (attention:64:63:15:s at the same odd layers: the span stays inside each sentence; run as the then
# `sentence` preset), line (attention:64:63:15:l: inside each line; run as the then `line` preset), line95
# (attention:64:95:15:l, a span of 95 before: the `line` preset, the default scorer since 2026-12-06 evening),
# line95_k85 and line95_k95 (line95 at keep ratios 0.85 and 0.95: retention against 1/τ, results/default),
# line16 (line95 with a line of fewer than 16 tokens, a title or a `Passage 1:`, joined to the line below it: the
# default scorer since 2026-12-07 night, chosen on dev, results/default),
# late_spread (spread at the 8 odd layers from 7, keep 0.835), long (a pruner trained on long inputs, directory
# $LONG_PRUNER, default $RUNS_TRAIN/train_long/pruner: scripts/paper_tables.sh ablations), long_norank and long_lm_only
# (its Tables 4/5 ablations), long_rms (Stage 2 on its saliency
# with --scorer-input-norm rms: docs/training.md), long_fit, long_fit_rms and long_fit_query (the 'fit' stage on
# its saliency: token-only, token-only on RMS-normalised states, query-conditioned), ctx_fit (the 'fit' stage
# on long inputs built only from records with a context of their own: --context-only), mix_feat and mix_mlp (the
# 'fit' stage on the training mix, --mix: with the question-aware features, and the paper's MLP alone; issue 32,
# docs/training.md), norm, random; these prune
# every prompt (min_prompt_tokens=0); union (shipped+attention: a token survives if either the trained pruner or the
# attention scorer ranks it high, sdtp_core.scorers.RankUnion). snapkv, streaming_llm, h2o (kvpress's ObservedAttentionPress, eager
# attention), knorm, tova: a kvpress press alone (no pruning) removing 35% of every layer's KV entries,
# SDTP's KV budget at 1/tau 1.53 (the paper's Table 1 peers; generation tasks only, in the peers
# environment: docs/peers.md). sdtp_low: the attention scorer at the milder keep ratio 0.95 per stage;
# keep85, keep925: at 0.85 and 0.925 (with attention at 0.9 and sdtp_low, a keep-ratio sweep).
# sdtp_snapkv, sdtp_streaming_llm: SDTP's pruned prefill, then the press removing half of each layer's
# remaining entries (the paper's Table 6; peers environment). saliency: the answer-aware oracle (SDTP's Stage 1 target
# computed from the gold answer; analysis only, loglikelihood jobs: nll). Run two at a time on two cores (one
# torch thread each). llmlingua: LLMLingua v1 with the embedded model as its small LM keeping 65% of each
# generation prompt (SDTP's 1/tau 1.53), no pruning (peers environment; generation tasks only).
#
# Safe to edit while a job runs: the last line holds the dispatch and its exit, so bash reads nothing of
# the file after a job returns.
#
# Resumable: every request is cached (--use_cache), so a killed lane picks up where it stopped, and a
# configuration whose output directory exists is skipped. Outputs go to $RUNS (default runs/, ignored by
# git); the report commands in the results files read them from there. Needs the evaluation data offline
# (python -m sdtp_eval.data install --from ../shared/data) or Hub access.
#
# DTYPE (default bfloat16, as every committed run so far) sets the model's dtype. On a CPU without AVX512-BF16
# (lscpu shows no avx512_bf16) bf16 runs several times slower than float32 there: use DTYPE=float32 with a
# RUNS of its own (DTYPE=float32 RUNS=runs/fp32 ...), since runs are paired only with runs of the same dtype.
# SPLIT=test runs a suite's test documents instead (ruler, needle, lbgen, nll, table3; sdtp_eval/retention/splits.py) into
# $RUNS/test/: the first rows that --limit takes are the dev split, which every choice so far was made on.
set -u
SPLIT=${SPLIT:-dev}
RUNS=${RUNS:-runs}
RUNS_TRAIN=$RUNS  # where the trained pruners are, whichever split runs
[ "$SPLIT" = test ] && RUNS=$RUNS/test
DTYPE=${DTYPE:-bfloat16}
DT=",dtype=$DTYPE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more torch threads than cores oversubscribes (see docs)
LB=longbench_qasper_e,longbench_2wikimqa_e,longbench_multi_news_e,longbench_triviaqa_e,longbench_passage_count_e,longbench_lcc_e
T3=(copa cb wsc wic winogrande piqa boolq mathqa)
declare -A ARGS=(
  [dense]="prune=false"
  [default]="pruner=attention,min_prompt_tokens=256"
  [spread_default]="pruner=spread,min_prompt_tokens=256"
  [line_default]="pruner=line,min_prompt_tokens=256"
  [sdtp]="pruner=shipped,min_prompt_tokens=0"
  [attention]="pruner=attention,min_prompt_tokens=0"
  [attention64]="pruner=attention:64,min_prompt_tokens=0"
  [pooled]="pruner=attention:64:31,min_prompt_tokens=0"
  [late_pooled]="pruner=attention:64:31,layers=8:10:12:14:16:18:20:22,keep_ratio=0.835,min_prompt_tokens=0"
  [odd]="pruner=attention,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [pooled_odd]="pruner=attention:64:31,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [pooled_union_odd]="pruner=attention:64:31+attention,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [spread_odd]="pruner=attention:64:63:15,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [spread31_odd]="pruner=attention:64:31:7,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [spread_odd2]="pruner=attention:64:63:15,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [sentence]="pruner=attention:64:63:15:s,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [line]="pruner=attention:64:63:15:l,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [line95]="pruner=attention:64:95:15:l,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [line95_k85]="pruner=attention:64:95:15:l,layers=3:5:7:9:11:13:15:17:19:21,keep_ratio=0.85,min_prompt_tokens=0"
  [line95_k95]="pruner=attention:64:95:15:l,layers=3:5:7:9:11:13:15:17:19:21,keep_ratio=0.95,min_prompt_tokens=0"
  [line16]="pruner=attention:64:95:15:l16,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [spread_union_odd]="pruner=attention:64:63:15+attention,layers=3:5:7:9:11:13:15:17:19:21,min_prompt_tokens=0"
  [late_spread]="pruner=attention:64:63:15,layers=7:9:11:13:15:17:19:21,keep_ratio=0.835,min_prompt_tokens=0"
  [long]="pruner=${LONG_PRUNER:-$RUNS_TRAIN/train_long/pruner},min_prompt_tokens=0"
  [long_norank]="pruner=$RUNS_TRAIN/train_long_norank/pruner,min_prompt_tokens=0"
  [long_lm_only]="pruner=$RUNS_TRAIN/train_long_lm_only/pruner,min_prompt_tokens=0"
  [long_rms]="pruner=$RUNS_TRAIN/train_long_rms/pruner,min_prompt_tokens=0"
  [long_fit]="pruner=$RUNS_TRAIN/train_long_fit/pruner,min_prompt_tokens=0"
  [long_fit_rms]="pruner=$RUNS_TRAIN/train_long_fit_rms/pruner,min_prompt_tokens=0"
  [long_fit_query]="pruner=$RUNS_TRAIN/train_long_fit_query/pruner,min_prompt_tokens=0"
  [ctx_fit]="pruner=$RUNS_TRAIN/train_ctx_fit/pruner,min_prompt_tokens=0"
  [mix_feat]="pruner=results/training/mix_feat_pruner,min_prompt_tokens=0"  # the committed copy of runs/train_mix_feat/pruner
  [mix_mlp]="pruner=$RUNS_TRAIN/train_mix_mlp/pruner,min_prompt_tokens=0"
  [norm]="pruner=norm,min_prompt_tokens=0"
  [snapkv]="prune=false,press=snapkv,press_ratio=0.35"
  [streaming_llm]="prune=false,press=streaming_llm,press_ratio=0.35"
  [h2o]="prune=false,press=observed_attention,press_ratio=0.35,attn_implementation=eager"
  [knorm]="prune=false,press=knorm,press_ratio=0.35"
  [tova]="prune=false,press=tova,press_ratio=0.35"
  [sdtp_low]="pruner=attention,keep_ratio=0.95,min_prompt_tokens=0"
  [keep85]="pruner=attention,keep_ratio=0.85,min_prompt_tokens=0"
  [keep925]="pruner=attention,keep_ratio=0.925,min_prompt_tokens=0"
  [sdtp_snapkv]="pruner=attention,min_prompt_tokens=0,press=snapkv,press_ratio=0.5"
  [sdtp_streaming_llm]="pruner=attention,min_prompt_tokens=0,press=streaming_llm,press_ratio=0.5"
  [random]="pruner=random,min_prompt_tokens=0"
  [union]="pruner=shipped+attention,min_prompt_tokens=0"
  [saliency]="pruner=saliency,min_prompt_tokens=0"
  [llmlingua]="prune=false,compress=llmlingua,compress_rate=0.65"
)
mkdir -p "$RUNS/cache"

select_docs() {  # SUITE DEV_ARGS...: sets SEL to the dev split's --limit arguments and SPLIT_TASKS to nothing, or on
  # SPLIT=test SEL to --samples with the test split's file and SPLIT_TASKS to its comma-separated tasks
  local suite=$1; shift
  SEL="$*"; SPLIT_TASKS=
  [ "$SPLIT" = test ] || return 0
  SPLIT_TASKS=$(python -m sdtp_eval.retention.splits "$suite" test --out "$RUNS/splits/$suite.json" --tasks) || return 1
  SEL="--samples $RUNS/splits/$suite.json"
}

lbgen() {  # LongBench generation, 6 tasks (one per category) x 30 rows (all where fewer), 2048 tokens;
  # an optional LIMIT runs the first LIMIT rows of each task instead (into lbgenLIMIT/), sharing the cache,
  # so a later full run redoes none of them
  local limit=${2:-30} out="$RUNS/lbgen/$1"
  [ "$limit" != 30 ] && out="$RUNS/lbgen$limit/$1"
  [ -d "$out" ] && return
  select_docs lbgen --limit "$limit" || return
  lm_eval --model sdtp --model_args "${ARGS[$1]}${DT},truncation=middle,max_length=2048" \
    --tasks "${SPLIT_TASKS:-$LB}" $SEL --log_samples --use_cache "$RUNS/cache/lbgen_$1" --output_path "$out"
}

table3() {  # the paper's Table 3 tasks, full validation sets (MathQA: its test split, as lm-eval scores it);
  # BATCH (default 16) requests at a time: BoolQ's passages at 16 need ~16 GB in float32 (the logits of every
  # position over the 152K-token vocabulary), so run it with BATCH=4 beside another job
  local name=$1; shift
  local tasks=("$@"); [ ${#tasks[@]} -eq 0 ] && tasks=("${T3[@]}")
  if [ "$SPLIT" = test ]; then  # the test documents of all eight tasks in one run (sdtp_eval/retention/splits.py)
    [ -d "$RUNS/t3/$name" ] && return
    select_docs table3 || return
    lm_eval --model sdtp --model_args "${ARGS[$name]}${DT}" --tasks "$SPLIT_TASKS" --batch_size "${BATCH:-16}" \
      $SEL --log_samples --use_cache "$RUNS/cache/t3_$name" --output_path "$RUNS/t3/$name"
    return
  fi
  for task in "${tasks[@]}"; do
    [ -d "$RUNS/t3/$name/$task" ] && continue
    lm_eval --model sdtp --model_args "${ARGS[$name]}${DT}" --tasks "$task" --batch_size "${BATCH:-16}" \
      --log_samples --use_cache "$RUNS/cache/t3_${name}_$task" --output_path "$RUNS/t3/$name/$task"
  done
}

t3report() {  # one paired report per Table 3 task, dense against each named configuration that ran it:
  # results/paper_tables/table3_$DTYPE/TASK.{json,md,png}, whose JSON is committed as each task finishes (runs/ does
  # not move between machines); all tasks at once: paired --samples dense='results/paper_tables/table3_float32/*.json:dense' ...
  local task name samples
  for task in "${T3[@]}"; do
    [ -d "$RUNS/t3/dense/$task" ] || continue
    samples=("dense=$RUNS/t3/dense/$task")
    for name in "$@"; do [ -d "$RUNS/t3/$name/$task" ] && samples+=("$name=$RUNS/t3/$name/$task"); done
    [ ${#samples[@]} -gt 1 ] || continue
    python -m sdtp_eval.retention.paired --metric acc --samples "${samples[@]}" --out "results/paper_tables/table3_$DTYPE/$task"
  done
}

t3long() {  # one configuration on just the Table 3 documents with an input of at least min_prompt_tokens
  # (256) tokens, the only ones the default policy prunes (CB 2, BoolQ 230): `paired --fill default=dense`
  # completes the default column with dense's values (results/paper_tables/README.md, Table 3)
  local name=$1 docs="$RUNS/t3_long_docs.json"
  [ -d "$RUNS/t3long/$name" ] && return
  [ -f "$docs" ] || python -m sdtp_eval.retention.long_prompts --tasks "${T3[@]}" --out "$docs" || return
  lm_eval --model sdtp --model_args "${ARGS[$name]}${DT}" --batch_size "${BATCH:-4}" \
    --tasks "$(python -c 'import json, sys; print(",".join(json.load(open(sys.argv[1]))))' "$docs")" \
    --samples "$docs" --log_samples --use_cache "$RUNS/cache/t3long_$name" --output_path "$RUNS/t3long/$name"
}

t3part() {  # documents FIRST .. FIRST+COUNT-1 of one Table 3 task (the last chunk is cut to the task's size):
  # MathQA's 2,985 documents take 2-3 h of one core per configuration, more than a session spares, so it runs
  # in chunks (e.g. 500) whose reports are committed one by one (t3partreport) and survive a lost runs/
  local name=$1 task=$2 first=$3 count=$4
  local docs="$RUNS/t3part/${task}_${first}_$count.json" out="$RUNS/t3part/$name/${task}_$first"
  [ -d "$out" ] && return
  mkdir -p "$RUNS/t3part"
  [ -f "$docs" ] || python -c '
import json, sys
from lm_eval.tasks import TaskManager
task, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n = len(TaskManager().load([task])["tasks"][task].eval_docs)
if first >= n:
    sys.exit(f"{task} has {n} documents: nothing from {first}")
json.dump({task: list(range(first, min(first + count, n)))}, open(sys.argv[4], "w"))
' "$task" "$first" "$count" "$docs" || return
  lm_eval --model sdtp --model_args "${ARGS[$name]}${DT}" --tasks "$task" --batch_size "${BATCH:-16}" \
    --samples "$docs" --log_samples --use_cache "$RUNS/cache/t3_${name}_$task" --output_path "$out"
}

t3partreport() {  # the paired report of one chunk, dense against CONFIG (both must have run it):
  # results/paper_tables/table3_$DTYPE/TASK_FIRST (zero-padded), which the all-task glob merges by document
  local name=$1 task=$2 first=$3 run
  for run in dense "$name"; do
    [ -d "$RUNS/t3part/$run/${task}_$first" ] || { echo "no $run run of ${task}_$first" >&2; return 1; }
  done
  python -m sdtp_eval.retention.paired --metric acc --samples "dense=$RUNS/t3part/dense/${task}_$first" \
    "$name=$RUNS/t3part/$name/${task}_$first" --out "results/paper_tables/table3_$DTYPE/${task}_$(printf %04d "$first")"
}

ruler() {  # lm-eval's RULER tasks with a local haystack (sdtp_ruler_offline), one length
  local out="$RUNS/ruler$2/$1"
  [ -d "$out" ] && return
  select_docs ruler --limit 20 || return
  lm_eval --model sdtp --model_args "${ARGS[$1]}${DT}" --tasks sdtp_ruler_offline \
    --metadata "{\"max_seq_lengths\":[$2]}" $SEL --log_samples --use_cache "$RUNS/cache/ruler$2_$1" \
    --output_path "$out"
}

needle() {  # the needle depth sweep at one length (1k, 2k, 4k): the first LIMIT documents (11 depths each)
  local out="$RUNS/needle$2/$1"
  [ -d "$out" ] && return
  select_docs "needle$2" --limit "$3" || return
  lm_eval --model sdtp --model_args "${ARGS[$1]}${DT}" --tasks "sdtp_needle_depth_$2" $SEL \
    --log_samples --use_cache "$RUNS/cache/needle$2_$1" --output_path "$out"
}

nll() {  # LongBench answer NLL: first 20 rows of narrativeqa, qasper, hotpotqa_e (46 answers), 2048 tokens;
  # SPLIT=test: 2wikimqa_e rows 30-59 and multi_news_e rows 30-49
  [ -d "$RUNS/nll/$1" ] && return
  select_docs nll --limit 20 || return
  lm_eval --model sdtp --model_args "${ARGS[$1]}${DT}" \
    --tasks "${SPLIT_TASKS:-longbench_nll_narrativeqa,longbench_nll_qasper,longbench_nll_hotpotqa_e}" $SEL --log_samples \
    --use_cache "$RUNS/cache/nll_$1" --output_path "$RUNS/nll/$1"
}

nllx() {  # a second LongBench answer-NLL set: first 30 rows of 2wikimqa_e, all 11 of multifieldqa_en_e (41 answers)
  [ -d "$RUNS/nllx/$1" ] && return
  lm_eval --model sdtp --model_args "${ARGS[$1]}${DT}" \
    --tasks longbench_nll_2wikimqa_e,longbench_nll_multifieldqa_en_e --limit 30 --log_samples \
    --use_cache "$RUNS/cache/nllx_$1" --output_path "$RUNS/nllx/$1"
}

job=${1:-}; shift || true
if [[ ! "$job" =~ ^(lbgen|table3|t3report|t3long|t3part|t3partreport|ruler|needle|nll|nllx)$ ]] || [ -z "${ARGS[${1:-none}]:-}" ]; then
  configs=$(printf '%s\n' "${!ARGS[@]}" | sort | paste -sd '|')
  echo "usage: $0 lbgen|table3|t3report|t3long|t3part|t3partreport|ruler|needle|nll|nllx $configs [lbgen limit | table3 tasks... | t3part task first count | t3partreport task first | ruler length | needle 1k|2k|4k limit]" >&2
  exit 2
fi
"$job" "$@"; exit $?
