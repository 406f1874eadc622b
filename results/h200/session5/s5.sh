# Fifth session's device driver (four-GPU host). Work runs as detached chains (one per GPU) that outlive a
# call; every call waits for them until its budget ends, then ships what exists so far.
# usage: BUDGET=<s> bash .site/s5.sh <git commit> <call label>
C=$1; CALL=$2; T0=$(date +%s); END=$((T0 + ${BUDGET:-560}))
mkdir -p /tmp/site && (test -d /tmp/site/fla || tar xJf .site/site.tar.xz -C /tmp/site)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GIT_COMMIT=$C
L=$OUT/$CALL; R=/tmp/repro/s5; B=/tmp/bg; mkdir -p $L $R $B
nvidia-smi > $L/nvidia-smi.txt 2>&1
left() { echo $(( END - $(date +%s) )); }
stamp() { echo "$(date +%s) $(( $(date +%s) - T0 ))s $*" >> $L/timeline.txt; }
# bg NAME GPUS HOME DIR 'cmd; cmd': detached (setsid) in DIR; /tmp/bg/NAME.rc when done, .t has start/end
bg() { local name=$1 gpus=$2 home=$3 dir=$4; shift 4; mkdir -p $home; stamp "bg $name start gpus=$gpus"
  (cd $dir && CUDA_VISIBLE_DEVICES=$gpus HOME=$home TORCHINDUCTOR_CACHE_DIR=$home/inductor setsid -f nohup bash -c \
    "echo start \$(date +%s) > $B/$name.t; $*; echo \$? > $B/$name.rc; echo end \$(date +%s) >> $B/$name.t" \
    > $B/$name.log 2>&1 < /dev/null); }
wait_bg() { while [ $(left) -gt 5 ]; do local n=0; for j in $*; do [ -f $B/$j.rc ] && n=$((n+1)); done
  [ $n -eq $# ] && break; sleep 5; done; for j in $*; do stamp "bg $j: $(cat $B/$j.t 2>/dev/null | tr '\n' ' ') rc=$(cat $B/$j.rc 2>/dev/null)"; done; }
# t NAME cmd...: one timed step inside a chain (its own log and start/end/rc line)
T='t() { local n=$1; shift; echo "$n start $(date +%s)" >> /tmp/bg/steps.txt; "$@" > /tmp/bg/$n.log 2>&1; echo "$n end $(date +%s) rc=$?" >> /tmp/bg/steps.txt; }'
NEW=$PWD; OLD=$PWD/.site/old
CHAINS="g0 g1 g2 g3"
if [ "$CALL" = d1 ]; then
  # GPU 0: decoding at this commit: latency (all contexts, three modes), then the decode profiles
  bg g0 0 /tmp/h0 $NEW "$T; t latency python3 bench.py latency --out=$R/full;
     t profile_decode python3 bench.py profile --modes=decode,decode_compiled --out=$R/profile_decode"
  # GPU 1: training at this commit: throughput (all shapes), then the training profile of the delta models
  bg g1 1 /tmp/h1 $NEW "$T; t throughput python3 bench.py throughput --out=$R/full;
     t profile_train python3 bench.py profile --modes=train --models=delta,delta_product --out=$R/profile_train"
  # GPU 2: the previous commit (eafa2e9) at the same time, for before/after: decode at 1024, training at 64 x 256,
  # its compiled-step profile; then the memory grid at this commit
  bg g2 2 /tmp/h2 $OLD "$T; t old_latency python3 bench.py latency --contexts=[1024] --out=$R/old_latency;
     t old_throughput python3 bench.py throughput --shapes='[(64,256)]' --out=$R/old_throughput;
     t old_profile_decode python3 bench.py profile --modes=decode_compiled --out=$R/old_profile_decode;
     cd $NEW; t memory python3 bench.py memory --out=$R/full"
  # GPU 3: the CUDA tests of what changed
  bg g3 3 /tmp/h3 $NEW "$T; t test_delta python3 -m pytest -q -rA tests/test_delta.py -m cuda;
     t test_model python3 -m pytest -q -rA tests/test_model.py -m cuda;
     t test_dp python3 -m pytest -q -rA tests/test_delta_product.py -m cuda;
     t test_train python3 -m pytest -q -rA tests/test_train.py -m cuda"
elif [ "$CALL" = e1 ]; then  # after the fused projections/convs: the final measurements and the CUDA tests
  bg g0 0 /tmp/h0 $NEW "$T; t latency python3 bench.py latency --out=$R/e1/full"
  bg g1 1 /tmp/h1 $NEW "$T; t test_model python3 -m pytest -q -rA tests/test_model.py -m cuda;
     t throughput python3 bench.py throughput --shapes='[(64,256)]' --out=$R/e1/throughput_64x256"
  bg g2 2 /tmp/h2 $NEW "$T; t test_delta python3 -m pytest -q -rA tests/test_delta.py -m cuda;
     t profile_decode python3 bench.py profile --modes=decode_compiled --models=delta,delta_product --out=$R/e1/profile_decode"
  bg g3 3 /tmp/h3 $NEW "$T; t test_dp python3 -m pytest -q -rA tests/test_delta_product.py -m cuda;
     t latency_delta python3 bench.py latency --models=delta,delta_product --contexts=[1024,8192,32768] --out=$R/e1/latency_delta"
fi
wait_bg $CHAINS
stamp "call done"; cp $B/steps.txt $L/ 2>/dev/null
tar czf $OUT/$CALL.tgz --exclude='*.pt' -C $OUT $CALL -C /tmp repro bg 2>/dev/null; rm -rf $L
ls -la $OUT
