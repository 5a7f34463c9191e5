#!/bin/bash
# One run, side by side: diffusers + PEFT (torch) and peft (Rust) on the same UNets and inputs.
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo; nproc; uptime
PY=/tmp/pyenv/bin/python
RS=${SD_BENCH:-target/release/examples/sd_bench}
for u in "crates/peft/tests/fixtures/sd/sd2/unet 64 5" "crates/peft/tests/fixtures/sd/sd1/unet 64 5" "/tmp/sd2_unet 64 1"; do
  set -- $u
  echo "== $1 latent $2, $3 steps"
  /usr/bin/time -f "peak_rss_kb %M wall %e" $PY tools/bench_sd.py $1 $2 $3 4 2>&1 | grep -v Warn
  /usr/bin/time -f "peak_rss_kb %M wall %e" $RS $1 $2 $3 4 2>&1
done
uptime
