#!/usr/bin/env bash
# A one-at-a-time sweep of HFedMoE's aggregation and selection hyper-parameters around the
# defaults (issue "FedAlign-MoE ... and aggregation defaults chosen by measurement", item 3):
# for each benchmark setting, `hfedmoe compare --methods $METHOD` once with the defaults and
# once per changed value, each over SEEDS seeds; `hfedmoe compare` reuses finished runs, so
# an interrupted sweep resumes. Then `python tools/sweep_table.py runs/sweep` prints the table
# of docs/hfedmoe.md ("Choosing tau, beta and lambda").
#
# Environment overrides (defaults in brackets):
#   METHOD [hfedmoe]  BENCHES ["bbc"]  ALPHAS ["0.1 0.5"]  SEEDS [2]  OUT [runs/sweep]
#   SETTINGS ["default hfedmoe.tau=0.15 hfedmoe.tau=0.3 hfedmoe.beta=1.0 hfedmoe.beta=0.0
#             hfedmoe.lambda=0.0 hfedmoe.lambda=1.0"]
# Extra arguments go to every `hfedmoe compare` (e.g. --set num-server-rounds=3).
# FedAlign's routing-regulariser weight, for example:
#   METHOD=fedalign OUT=runs/sweep-fedalign ALPHAS=0.1 SETTINGS="default
#   fedalign.routing-weight=0.0 fedalign.routing-weight=0.3 fedalign.routing-weight=1.0" tools/sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-hfedmoe}
BENCHES=${BENCHES:-bbc}
ALPHAS=${ALPHAS:-0.1 0.5}
SEEDS=${SEEDS:-2}
OUT=${OUT:-runs/sweep}
SETTINGS=${SETTINGS:-default hfedmoe.tau=0.15 hfedmoe.tau=0.3 hfedmoe.beta=1.0 hfedmoe.beta=0.0 hfedmoe.lambda=0.0 hfedmoe.lambda=1.0}
HFEDMOE=${HFEDMOE:-.venv/bin/hfedmoe}

for bench in $BENCHES; do
  for alpha in $ALPHAS; do
    for setting in $SETTINGS; do
      extra=()
      [[ "$setting" != default ]] && extra=(--set "$setting")
      dir="$OUT/$bench-$alpha/$setting"
      if [[ -f "$dir/comparison.json" ]]; then
        echo "sweep: $dir is done"
        continue
      fi
      echo "sweep: $dir"
      # the results page's benchmark settings: a constant lr, as its runs had
      "$HFEDMOE" compare --methods "$METHOD" --seeds "$SEEDS" --config "conf/bench/$bench.toml" \
        --set "data.dirichlet-alpha=$alpha" --set train.lr-schedule=constant "${extra[@]}" \
        --out "$dir" "$@"
    done
  done
done
