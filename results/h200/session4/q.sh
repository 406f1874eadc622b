# One device call on the 4-GPU machine: lanes of work, resumable across calls on a warm machine.
# usage: bash .site/q.sh <git commit> <call label>
C=$1; CALL=$2; T0=$(date +%s); END=$((T0 + ${BUDGET:-570}))
mkdir -p /tmp/site && (test -d /tmp/site/fla || tar xJf .site/site.tar.xz -C /tmp/site)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GIT_COMMIT=$C
L=$OUT/$CALL; mkdir -p $L /tmp/claim /tmp/repro/x3_1gpu /tmp/repro/timed_1gpu /tmp/repro/timed_2gpu /tmp/bg /tmp/repro/full /tmp/repro/gpus2 /tmp/repro/selfcheck_cold /tmp/repro/eager /tmp/repro/profile_train
mkdir -p results/h200/issue6 results/h200/issue3 results/h200/issue5
# outputs live in /tmp/repro (kept between calls on a warm machine); records sent from here are moved in first
link_out() { if [ -d "$1" ] && [ ! -L "$1" ]; then cp -a "$1"/. "$2"/; rm -rf "$1"; fi; ln -sfn "$2" "$1"; }
if [ "$CALL" != c7 ]; then  # c7 finds c6's jobs still writing: leave every path as it is
link_out results/full /tmp/repro/full; link_out results/h200/issue6/sweep_gpus2 /tmp/repro/gpus2
link_out results/h200/issue3/selfcheck_cold /tmp/repro/selfcheck_cold
link_out results/h200/issue3/eager_throughput /tmp/repro/eager
link_out results/h200/issue5/profile_train /tmp/repro/profile_train
for d in x3_1gpu timed_1gpu timed_2gpu; do link_out results/h200/issue6/sweep_$d /tmp/repro/$d; done
fi
for n in $SKIP; do mkdir -p /tmp/claim/$n; done  # done in an earlier call
nvidia-smi > $L/nvidia-smi.txt 2>&1
left() { echo $(( END - $(date +%s) )); }
stamp() { echo "$(date +%s) $(( $(date +%s) - T0 ))s $*" >> $L/timeline.txt; }
# task NAME EST CAP GPUS HOME cmd...: run once (claimed in /tmp/claim; released if killed by the limit);
# not started with less than EST seconds left
task() {
  local name=$1 est=$2 cap=$3 gpus=$4 home=$5; shift 5
  [ -d /tmp/claim/$name ] && return 0
  local t=$(left); [ $t -gt $cap ] && t=$cap
  [ $t -lt $est ] && { stamp "$name not started ($t s left, needs ~$est)"; return 1; }
  mkdir /tmp/claim/$name 2>/dev/null || return 0
  mkdir -p $home; stamp "$name start gpus=$gpus limit=${t}s"
  ( export CUDA_VISIBLE_DEVICES=$gpus HOME=$home TORCHINDUCTOR_CACHE_DIR=$home/inductor; timeout $t "$@" ) > $L/$name.log 2>&1
  local rc=$?; stamp "$name end rc=$rc"
  [ $rc -eq 124 ] && rmdir /tmp/claim/$name
  echo "rc=$rc" >> $L/$name.log; return 0
}
QUEUE="memory latency throughput test_delta vs_nanogpt eager test_model test_dp test_nsa profile"
run_q() {  # single-GPU tasks, in priority order, on GPU $1
  local g=$1 h=/tmp/hb
  for q in $QUEUE; do case $q in
    memory) task memory 300 420 $g $h python3 bench.py memory --out=results/full ;;
    latency) task latency 200 420 $g $h python3 bench.py latency --out=results/full ;;
    throughput) task throughput 450 560 $g $h python3 bench.py throughput --out=results/full ;;
    test_delta) task test_delta 200 400 $g $h python3 -m pytest -q -rA tests/test_delta.py -m cuda ;;
    vs_nanogpt) task vs_nanogpt 150 300 $g $h python3 bench.py vs_nanogpt --out=results/full ;;
    eager) task eager 100 300 $g $h python3 bench.py throughput --shapes="[(64,256)]" --compile=False --cuda_graphs=False --out=results/h200/issue3/eager_throughput ;;
    test_model) task test_model 200 400 $g $h python3 -m pytest -q -rA tests/test_model.py -m cuda ;;
    test_dp) task test_dp 200 400 $g $h python3 -m pytest -q -rA tests/test_delta_product.py -m cuda ;;
    test_nsa) task test_nsa 120 300 $g $h python3 -m pytest -q -rA tests/test_nsa.py -m cuda ;;
    profile) task profile 200 400 $g $h python3 bench.py profile --modes=train --out=results/h200/issue5/profile_train ;;
  esac; done
}
SW="python3 train_runner.py --bench=False"
# bg NAME GPUS HOME 'cmd; cmd': detached (setsid), so it may outlive this call; /tmp/bg/NAME.rc when done
bg() { local name=$1 gpus=$2 home=$3; shift 3; mkdir -p $home; stamp "bg $name start gpus=$gpus"
  CUDA_VISIBLE_DEVICES=$gpus HOME=$home TORCHINDUCTOR_CACHE_DIR=$home/inductor setsid -f nohup bash -c \
    "echo start \$(date +%s) > /tmp/bg/$name.t; $*; echo \$? > /tmp/bg/$name.rc; echo end \$(date +%s) >> /tmp/bg/$name.t" \
    > /tmp/bg/$name.log 2>&1 < /dev/null; }
wait_bg() { while [ $(left) -gt 5 ]; do local n=0; for j in $*; do [ -f /tmp/bg/$j.rc ] && n=$((n+1)); done
  [ $n -eq $# ] && break; sleep 5; done; for j in $*; do stamp "bg $j: $(cat /tmp/bg/$j.t 2>/dev/null | tr '\n' ' ') rc=$(cat /tmp/bg/$j.rc 2>/dev/null)"; done; }
BG="gpu0 sweep1 sweep2"
if [ "$CALL" = c6 ]; then  # fourth session, call 2: everything detached; c7 (the next call, on the warm machine) waits
  B=/tmp/bg
  bg gpu0 0 /tmp/hb "python3 bench.py latency --out=/tmp/repro/full > $B/latency.log 2>&1; python3 -m pytest -q -rA tests/test_model.py -m cuda > $B/test_model.log 2>&1; python3 bench.py profile --modes=train --models=delta_product,nsa --out=/tmp/repro/profile_train > $B/profile.log 2>&1"
  bg sweep1 3 /tmp/hs1 "$SW --results_dir=/tmp/repro/timed_1gpu"
  bg sweep2 1,2 /tmp/hs2 "$SW --gpus=2 --results_dir=/tmp/repro/timed_2gpu"
  wait_bg $BG
elif [ "$CALL" = c7 ]; then
  wait_bg $BG
elif [ "$CALL" = c5 ]; then  # fourth session, call 1: latency, the CUDA tests, the 1-GPU sweep with 3 runs per GPU (cold)
  QUEUE="test_model test_nsa profile"
  task latency 200 560 0 /tmp/hb python3 bench.py latency --out=results/full &
  ( task test_delta 100 300 1 /tmp/hb python3 -m pytest -q -rA tests/test_delta.py -m cuda
    task test_dp 100 300 1 /tmp/hb python3 -m pytest -q -rA tests/test_delta_product.py -m cuda ) &
  run_q 2 &
  task sweep_x3_1gpu 30 560 3 /tmp/hx31 $SW --runs_per_gpu=3 --results_dir=results/h200/issue6/sweep_x3_1gpu &
elif [ "$CALL" = c4 ]; then  # next session (x4): what the third session left unmeasured
  QUEUE="test_model test_delta test_dp profile test_nsa"
  ( task latency 200 420 0 /tmp/hb python3 bench.py latency --out=results/full; run_q 0 ) &
  run_q 1 & run_q 2 & run_q 3 &
elif [ "$CALL" = c3 ]; then  # a fresh machine: finish both sweeps (resumable), the CUDA tests
  QUEUE="test_delta test_model test_dp test_nsa profile"
  ( task sweep1 30 600 0 /tmp/h0 python3 train_runner.py --bench=False; run_q 0 ) &
  ( task sweep2 30 600 1 /tmp/h12 python3 train_runner.py --bench=False --results_dir=results/h200/issue6/sweep_gpus2
    task test_train 250 500 1,2 /tmp/hb python3 -m pytest -q -rA tests/test_train.py -m cuda; run_q 1 ) &
  run_q 2 & run_q 3 &
else
# lane A, GPU 0: the reproduction's sweep on one GPU (own caches: a cold start, like a user's), then the queue
( task sweep1 30 600 0 /tmp/h0 python3 train_runner.py --bench=False; run_q 0 ) &
# lane B, GPUs 1+2: the same sweep with --gpus=2 (own caches), DDP scaling, the two-GPU tests, then the queue
( task sweep2 30 600 1,2 /tmp/h12 python3 train_runner.py --bench=False --gpus=2 --results_dir=results/h200/issue6/sweep_gpus2
  [ "$CALL" = c1 ] && { run_q 1 & run_q 2; wait; }
  task scaling 350 560 1,2 /tmp/hb python3 bench.py scaling --out=results/full
  task test_train 250 500 1,2 /tmp/hb python3 -m pytest -q -rA tests/test_train.py -m cuda
  run_q 1 & run_q 2; wait ) &
# lane C, GPU 3: the self-check from cold caches, then again warm, then the queue
( task selfcheck_cold 30 300 3 /tmp/hcold python3 bench.py selfcheck --out=results/h200/issue3/selfcheck_cold
  task selfcheck_warm 30 150 3 /tmp/hcold python3 bench.py selfcheck --out=results/full
  run_q 3 ) &
fi
wait; stamp all done
ls /tmp/claim > $L/claimed.txt
tar czf $OUT/$CALL.tgz --exclude='*.pt' -C $OUT $CALL -C /tmp repro bg 2>/dev/null; rm -rf $L
ls -la $OUT
