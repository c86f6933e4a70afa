#!/usr/bin/env bash
# Ctrl-C at random moments of real train.py runs: each must exit 130 with one line on stderr (no traceback,
# no "Exception ignored"), wherever the signal lands once training has started: the first optimizer steps
# (which import torch._dynamo), the epochs, validation, saving. The figures in docs/BENCHMARKS.md, "Script
# start-up".
#
#     bash bench/ctrl_c.sh [RUNS] [MAX_S]     # default: 24 runs, each sent SIGINT a random 0 to 2 s after
#                                             # train.py printed its first line (the model and the data)
#
# Trains a U-Net of width 8 at 64x64 on the CPU, on 4 phantoms of 64x64x16 voxels made in a temporary folder,
# or on DATA (a preprocessed folder with splits.json). Prints one line per run and a summary; exits 1 if any run
# did not stop as it should. PYTHON (.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-24}; hi=${2:-2}
py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1  # train.py's first line reaches the file at once
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data=${DATA:-$tmp/proc}
if [ -z "${DATA:-}" ]; then
  $py -m data.synthetic --out "$tmp/syn" --patients 4 --seed 0 --shape 64 64 16 > /dev/null
  $py -m data.preprocess --src "$tmp/syn" --out "$data" --size 64 > /dev/null
  $py -m data.split_data --data "$data" --val 0.25 --test 0.25 --seed 0 > /dev/null
fi

bad=0
for i in $(seq 1 "$runs"); do
  rm -rf "$tmp/out" "$tmp/stdout" "$tmp/stderr"  # before the start: the wait below reads stdout
  delay=$($py -c "import random; print(round(random.uniform(0, $hi), 2))")
  # `trap - INT`: a background job of a script starts with SIGINT ignored, as a Ctrl-C'd terminal's would not
  ( trap - INT; exec $py train.py --data "$data" --out "$tmp/out" --width 8 --size 64 --batch-size 4 \
      --epochs 50 --device cpu --no-progress ) > "$tmp/stdout" 2> "$tmp/stderr" &
  pid=$!
  until [ -s "$tmp/stdout" ] || ! kill -0 "$pid" 2> /dev/null; do sleep 0.05; done
  sleep "$delay"
  kill -INT "$pid"
  wait "$pid"; rc=$?
  lines=$(wc -l < "$tmp/stderr")
  noise=$(grep -c -e Traceback -e "Exception ignored" "$tmp/stderr")
  ok=$([ "$rc" = 130 ] && [ "$lines" = 1 ] && [ "$noise" = 0 ] && echo ok || echo FAILED)
  if [ "$ok" != ok ]; then bad=$((bad + 1)); sed "s/^/    /" "$tmp/stderr"; fi
  echo "run $i: SIGINT ${delay} s after the first line: exit $rc, $lines line(s) on stderr: $(head -c 100 "$tmp/stderr" | head -1) [$ok]"
done
echo "$((runs - bad)) of $runs runs stopped with exit 130 and one line"
[ "$bad" = 0 ]
