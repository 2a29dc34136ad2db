#!/bin/bash
# Runs one perf_analyzer row (the README test's: classifier, system shared memory, concurrency 16, 48 requests)
# N times over HTTP and gRPC against a served repository; a run still going after 60 s is taken as hung, its
# threads dumped with gdb into $OUT, and killed. From the checkout root, with a server up (make serve):
#   OUT=build/hang N=100 HTTP=127.0.0.1:8000 GRPC=127.0.0.1:8001 bash perf/results/cpu-perf-analyzer-hang/repeat_row.sh
set -u
OUT=${OUT:-build/hang}; N=${N:-100}; HTTP=${HTTP:-127.0.0.1:8000}; GRPC=${GRPC:-127.0.0.1:8001}
MODEL=${MODEL:-swin_tiny_patch4_window7_224_classifier}
PA=${PA:-.venv/bin/perf_analyzer}
mkdir -p "$OUT"
LD_LIBRARY_PATH=$(.venv/bin/python -c "import nvidia.cuda_runtime as c; print(list(c.__path__)[0] + '/lib')"):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
for i in $(seq 1 "$N"); do
  for proto in http grpc; do
    url=$HTTP; [ "$proto" = grpc ] && url=$GRPC
    rm -f "$OUT/r.csv" "$OUT/r.profile.json"
    "$PA" -m "$MODEL" -i $proto -u "$url" -b 1 --concurrency-range 16:16 --measurement-interval 2000 -s 10 -r 10 \
      --shared-memory system --output-shared-memory-size 1048576 -f "$OUT/r.csv" --verbose-csv --input-data random \
      --request-count 48 --profile-export-file "$OUT/r.profile.json" > "$OUT/pa.out" 2>&1 &
    pid=$!
    for _ in $(seq 1 60); do kill -0 $pid 2>/dev/null || break; sleep 1; done
    if kill -0 $pid 2>/dev/null; then
      echo "run $i $proto: hung"
      gdb -p $pid -batch -ex "thread apply all bt" > "$OUT/stacks-$i-$proto.txt" 2>&1
      kill -9 $pid
    fi
    wait $pid 2>/dev/null
  done
done
echo "$N runs per protocol done"
