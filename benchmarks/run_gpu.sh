#!/usr/bin/env bash
# The GPU benchmarks on the device machine, from the project root:
#
#   bash benchmarks/run_gpu.sh STAGE [STAGE ...]   (no stage: usage, exit 2; each stage fits one 10-minute
#                                                   device command, so run one stage per call, in this order)
#   tests          the GPU-contract tests, on the GPU where they have a CUDA case (first thing on a new GPU) (~2 min)
#   step           bench_step.py: r50-224 and r18-32, reference fp32 vs ours fp32 / bf16+CL / +compile  (~3-4 min)
#   e2e-cifar      bench_e2e.py on cifar10-full, aug cpu and gpu                                         (~3-4 min)
#   e2e-imagenet   bench_e2e.py on 20,000 generated 400x350 JPEGs, ResNet-50, aug cpu and gpu           (~4-5 min)
#   e2e            e2e-cifar (the short one; e2e-imagenet is its own call)
#   stream         bench_stream.py: Ray Data view throughput without the model                          (~2-3 min)
#   all            tests step e2e-cifar e2e-imagenet stream in one go: longer than one device command
#                  (~15 min); only for a shell without the limit. With the device tool: one call per stage.
#   tta-start      bench_time_to_accuracy.py detached (setsid nohup), progress in data/bench-out/tta/
#   tta-status [S] follow that progress for S seconds (default 0), copy it into $OUT
#
# Setup on this machine first (the device tool carries the repo tree plus at most 8 named ignored paths, 64 MiB
# in all; .gpu-kit is 43 MB and the CIFAR archive 20 MB):
#   ../shared/tools/build-gpu-kit .gpu-kit                # Ray + MLflow for the device's Python
#   mkdir -p data && cp ../shared/data/cifar10-full.tgz data/   # data/ is git-ignored, so it can be carried
#   device run: carry [".gpu-kit", "data/cifar10-full.tgz"], command "bash benchmarks/run_gpu.sh e2e-cifar"
# The archive may also sit at .bench-data/cifar10-full.tgz or $CIFAR_TGZ. Without it, CIFAR stages fall back to
# cifar10-mini if ../shared is there, else fail with a message.
#
# BENCH_ARGS="--max-steps 30 ..." adds arguments to the stage's benchmark (the last value of an option wins).
# Results go to $OUT (set by the device tool; default data/bench-out) as they come: <stage>.json (bench_step rewrites
# it after every variant), <stage>.log (tee'd line by line), tests.xml, the MLflow store, and results_snippet.md
# (the rows to paste into benchmarks/RESULTS.md). Without .gpu-kit/install.sh every stage fails at once (exit 1). Datasets, shards and checkpoints go to
# data/bench (git-ignored, so they survive between calls while the machine stays warm).
set -eo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/data/bench-out}
WORK=$ROOT/data/bench
TTA=$ROOT/data/bench-out/tta
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"

STAGES="tests, step, e2e, e2e-cifar, e2e-imagenet, stream, all, tta-start, tta-status [SECONDS]"
if [[ $# -eq 0 ]]; then
  echo "run_gpu: name a stage (one per device command): $STAGES" >&2
  exit 2
fi
if [[ ! -f .gpu-kit/install.sh ]]; then
  echo "run_gpu: .gpu-kit/install.sh missing: build it with ../shared/tools/build-gpu-kit .gpu-kit and carry .gpu-kit" >&2
  exit 1
fi
if [[ -f .gpu-kit/install.sh ]]; then
  set +e  # the installer is written for interactive shells: its own checks report failure by status
  # shellcheck disable=SC1091
  source .gpu-kit/install.sh
  kit=$?
  set -e
  if ((kit != 0)); then echo "run_gpu: the GPU kit did not install (see above)" >&2; exit 1; fi
fi
# Dependencies come from the image and the kit, so the package is used from the tree (Ray's workers inherit this).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export MOCO_RAY_STORAGE_PATH=$WORK/ray-runs
set -u

unpack_cifar() {
  [[ -d data/cifar10-full/train ]] && return 0
  local tgz
  for tgz in "${CIFAR_TGZ:-}" data/cifar10-full.tgz .bench-data/cifar10-full.tgz ../shared/data/cifar10-full.tgz; do
    if [[ -n $tgz && -f $tgz ]]; then
      echo "run_gpu: unpacking $tgz into data/" >&2
      tar -xzf "$tgz" -C data
      return 0
    fi
  done
  echo "run_gpu: cifar10-full.tgz not found (carry data/cifar10-full.tgz); using cifar10-mini if present" >&2
}

snippet() {  # the RESULTS.md row a benchmark printed, appended to $OUT/results_snippet.md
  grep -h '^RESULTS.md: ' "$1" | sed 's/^RESULTS.md: //' >> "$OUT/results_snippet.md" || true
}

run_stage() {
  local stage=$1 rc=0
  local cmd=()
  echo "run_gpu: stage $stage ($(date -u +%H:%M:%S))" >&2
  case $stage in
    tests)
      "$PY" -m pytest -q -p no:cacheprovider --junitxml "$OUT/tests.xml" tests/train/test_gpu_contract_syncs.py \
        tests/train/test_gpu_contract_restore.py tests/core/test_gpu_contract_formats.py \
        tests/train/test_gpu_contract_collectives.py tests/data/test_gpu_augment.py 2>&1 | tee "$OUT/tests.log" || rc=$?
      return $rc ;;
    stream)
      cmd=(benchmarks/bench_stream.py --workdir "$WORK/stream") ;;  # its table and RESULTS.md row: stream.log
    step)
      cmd=(benchmarks/bench_step.py --out "$OUT/step.json") ;;
    e2e-cifar)
      unpack_cifar
      cmd=(benchmarks/bench_e2e.py --datasets cifar --workdir "$WORK" --out-dir "$OUT" --out "$OUT/e2e-cifar.json") ;;
    e2e-imagenet)
      cmd=(benchmarks/bench_e2e.py --datasets imagenet --workdir "$WORK" --out-dir "$OUT")
      cmd+=(--out "$OUT/e2e-imagenet.json") ;;
    tta-start)
      unpack_cifar
      mkdir -p "$TTA"
      setsid nohup "$PY" benchmarks/bench_time_to_accuracy.py --workdir "$WORK" --out-dir "$TTA" \
        > "$TTA/run.log" 2>&1 < /dev/null &
      echo "run_gpu: time-to-accuracy started (pid $!); follow with: bash benchmarks/run_gpu.sh tta-status 590" >&2
      return 0 ;;
    tta-status)  # the machine is released when idle: a long wait here also keeps it (and the run) alive
      local deadline=$((SECONDS + ${2:-0}))
      while :; do
        tail -n 3 "$TTA/progress.txt" 2>/dev/null || true
        [[ -f $TTA/time_to_accuracy.json || $SECONDS -ge $deadline ]] && break
        sleep 30
      done
      cp -r "$TTA" "$OUT/" 2>/dev/null || true
      if [[ -f $TTA/run.log ]]; then snippet "$TTA/run.log"; fi
      return 0 ;;
    *)
      echo "run_gpu: unknown stage '$stage' ($STAGES)" >&2
      return 2 ;;
  esac
  # shellcheck disable=SC2086  # BENCH_ARGS: extra arguments for the benchmark, split on spaces
  "$PY" "${cmd[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$stage.log" || rc=$?
  snippet "$OUT/$stage.log"
  return $rc
}

if [[ $1 == tta-status ]]; then run_stage tta-status "${2:-0}"; exit; fi
stages=()
for stage in "$@"; do
  case $stage in
    all) stages+=(tests step e2e-cifar e2e-imagenet stream) ;;
    e2e) stages+=(e2e-cifar) ;;
    *) stages+=("$stage") ;;
  esac
done
set -- "${stages[@]}"
status=0
for stage in "$@"; do run_stage "$stage" || status=$?; done
echo "run_gpu: done (exit $status); rows for benchmarks/RESULTS.md in $OUT/results_snippet.md" >&2
exit $status
