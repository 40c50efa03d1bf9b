#!/usr/bin/env bash
# The runs behind the paper's tables on the embedded model (issue 9). Each step is resumable: rerun the
# same command after an interruption (compare --resume reuses finished runs and continues unfinished
# ones from lm-eval's request cache; training resumes from its checkpoints; Stage 1 skips stored samples).
#
#   bash scripts/paper_tables.sh table1     # LongBench: dense, SDTP, SDTP-low, LLMLingua, presses, SDTP∘press (Tables 1, 6)
#   bash scripts/paper_tables.sh table2     # latency, FLOPs, KV memory vs length (run it on an idle machine)
#   bash scripts/paper_tables.sh ablations  # Tables 4/5: pruners trained without rank / rank+MSE losses
#
# table1 runs in the peers environment (kvpress and LLMLingua; kvpress pins transformers<5.3: docs/peers.md);
# the others run in the main one. Outputs: results/paper_tables/ (and results/peers/ for table1's speed run) for
# reports, $RUNS (default runs/, ignored by git) for lm-eval outputs.
set -eu
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# SDTP's default schedule keeps 1/1.53 = 65% of the prompt's tokens per layer on average, so a press that
# removes 35% of every layer's entries holds the same KV budget; LLMLingua keeps 65% of the tokens.
MATCHED=0.35

case ${1:-} in
  table1)
    # LongBench generation (the retention suite's 6 tasks x <= 30 rows, 2048 tokens, middle truncation) for
    # every method, one lm-eval run each (scripts/retention_runs.sh: resumable, skipped when done); then
    # every method's speed in one process on the same texts; then the paired score report and the table.
    for config in dense attention sdtp_low streaming_llm snapkv h2o knorm tova sdtp_snapkv llmlingua; do
      bash scripts/retention_runs.sh lbgen "$config"
    done
    python -m sdtp_eval.peers.long_text --lengths 2048 --docs 5 --continuation 64 \
      --presses streaming_llm snapkv observed_attention knorm tova --ratio $MATCHED --sdtp-press-ratio 0.5 \
      --sdtp-low 0.95 --llmlingua 0.65 --dtype bfloat16 --threads 1 --out results/peers/table1_speed_cpu
    # labels = the speed report's method names, so the table can join them
    runs=(dense sdtp=attention sdtp_low streaming_llm snapkv observed_attention=h2o knorm tova sdtp+snapkv=sdtp_snapkv
          llmlingua)
    samples=() records=()
    for r in "${runs[@]}"; do
      label=${r%%=*} dir=$RUNS/lbgen/${r#*=}
      [ -d "$dir" ] || continue
      samples+=("$label=$dir")
      [ "$label" = dense ] || records+=("$label=$dir")
    done
    python -m sdtp_eval.retention.paired --metric score --samples "${samples[@]}" --out results/paper_tables/table1_longbench_cpu
    python -m sdtp_eval.peers.tradeoff --scores results/paper_tables/table1_longbench_cpu.json \
      --speed results/peers/table1_speed_cpu.json --length 2048 --records "${records[@]}" \
      --out results/paper_tables/table1_tradeoff_cpu
    ;;
  table2)
    python -m sdtp_core.bench --pruner attention --lengths 1024 2048 4096 8192 16384 --new-tokens 32 --reps 2 \
      --json results/paper_tables/table2_latency_cpu.json
    ;;
  ablations)
    # The long-input pruner (all three losses), then Stage 2 alone on its saliency without the ranking
    # loss, and without ranking and MSE (LM loss only). The data path is part of the saliency store's
    # identity: give the same DATA to every step.
    DATA=${DATA:-../shared/data/dolly/dolly_subset_1000.jsonl}
    # Measured cost (2-core AMD EPYC, bf16, one torch thread, beside another 1-thread job): Stage 1
    # 28 min (160 samples), Stage 2 64 min per pruner (40 optimizer steps of 4 samples, ~1,000 tokens each).
    common=(--data "$DATA" --max-samples 160 --max-length 1024 --distractor-tokens 800 --epochs 1
            --grad-accum 4 --checkpoint-every 5 --dtype bfloat16 --saliency-dir "$RUNS/train_long/saliency")
    resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
    python -m sdtp_core.train all "${common[@]}" --out "$RUNS/train_long" $(resume "$RUNS/train_long")
    python -m sdtp_core.train prune "${common[@]}" --no-rank --out "$RUNS/train_long_norank" \
      $(resume "$RUNS/train_long_norank")
    python -m sdtp_core.train prune "${common[@]}" --no-rank --no-mse --out "$RUNS/train_long_lm_only" \
      $(resume "$RUNS/train_long_lm_only")
    ;;
  *)
    echo "usage: $0 table1|table2|ablations" >&2
    exit 2
    ;;
esac
