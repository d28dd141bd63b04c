#!/bin/sh
# Issue 20's measurements (docs/benchmarks.md, "VM templates and forks"), run by hand inside
# one L1 (`cargo xtask l1 --rw target/tmp -- sh -c 'docs/bench/snapshot-bench.sh'`) until it
# is a `cargo xtask bench` row. Needs MOAT (the moat binary, moat-vmm beside it) and
# MOAT_IMAGES (a directory whose current.toml names kernel, initramfs and rootfs).
set -u
MOAT=${MOAT:?set MOAT to the moat binary}
VMM=$(dirname "$MOAT")/moat-vmm
: "${MOAT_IMAGES:?set MOAT_IMAGES}"
export MOAT_IMAGES MOAT_LOG=error
W=/tmp/snapbench; rm -rf $W; mkdir -p $W
now() { date +%s%N; }
run() { # label, args...
  label=$1; shift
  rm -f $W/out; s=$(now)
  "$@" > $W/out 2>$W/err &
  pid=$!; first=""
  while kill -0 $pid 2>/dev/null; do
    if [ -z "$first" ] && grep -q '^up' $W/out 2>/dev/null; then first=$(now); fi
    sleep 0.01
  done
  wait $pid; rc=$?; e=$(now)
  [ -z "$first" ] && grep -q '^up' $W/out && first=$e
  echo "$label first_line_ms=$(( (${first:-$e} - s) / 1000000 )) exit_ms=$(( (e - s) / 1000000 )) rc=$rc"
}
for i in 1 2 3; do run cold_boot $MOAT run --backend vm --mem 512 -- sh -c 'echo up'; done
s=$(now); $MOAT run --backend vm --mem 512 --snapshot-to $W/tpl >/dev/null 2>$W/tplerr; echo "template_ms=$(( ($(now) - s) / 1000000 )) rc=$?"
echo "memory_apparent_kib=$(( $(stat -c %s $W/tpl/memory) / 1024 )) memory_allocated_kib=$(du -k $W/tpl/memory | cut -f1) state_bytes=$(stat -c %s $W/tpl/state)"
for i in 1 2 3; do run restore $MOAT run --backend vm --from-snapshot $W/tpl -- sh -c 'echo up'; done
# moat-vmm alone: main() to the first vCPU entry (--stats), restore (paused) vs boot.
truncate -s 64M $W/home.img
ROOTFS=$(grep '^rootfs' $MOAT_IMAGES/current.toml | cut -d'"' -f2)
KERNEL=$(grep '^kernel' $MOAT_IMAGES/current.toml | cut -d'"' -f2)
for i in 1 2 3; do
  $VMM --restore $W/tpl --mem 512 --vsock-uds $W/v$i --block-ro $ROOTFS --block $W/home.img --rng --start-paused --api-sock $W/api$i --serial-out $W/s$i --timeout 2 --stats 2>$W/stats$i >/dev/null
  echo "vmm_restore $(grep -o 'main_to_first_kvm_run_us":[0-9-]*' $W/stats$i) $(grep -o 'rss_kib":[0-9]*' $W/stats$i | head -1)"
  $VMM --kernel $KERNEL --mem 512 --vsock-uds $W/b$i --block-ro $ROOTFS --block $W/home.img --rng --serial-out $W/bs$i --timeout 2 --stats 2>$W/bstats$i >/dev/null
  echo "vmm_boot $(grep -o 'main_to_first_kvm_run_us":[0-9-]*' $W/bstats$i) $(grep -o 'rss_kib":[0-9]*' $W/bstats$i | head -1)"
done
# Private memory of forks against a booted VM (smaps_rollup of every moat-vmm).
$MOAT run --backend vm --mem 512 --snapshot-to $W/tpl2 >/dev/null 2>$W/tpl2.err || { echo template failed; tail $W/tpl2.err; exit 1; }
echo "template memory file: apparent $(( $(stat -c %s $W/tpl2/memory) / 1024 )) KiB, allocated $(du -k $W/tpl2/memory | cut -f1) KiB"
for i in 1 2 3; do
  $MOAT run --backend vm --from-snapshot $W/tpl2 -- sh -c 'echo up; sleep 40' > $W/f$i.out 2>$W/f$i.err &
done
# Wait until every fork's agent is up.
for n in $(seq 1 120); do
  c=$(cat $W/f1.out $W/f2.out $W/f3.out 2>/dev/null | grep -c '^up')
  [ "$c" -ge 3 ] && break; sleep 1
done
echo "forks up: $c after ${n}s"
sleep 3
for p in $(pgrep -f 'moat-vmm.*--restore'); do
  awk -v p=$p '/^Rss:|^Pss:|^Private_Dirty:|^Private_Clean:|^Shared_Clean:/ {printf "%s %s=%s ", (NR==2?"pid " p:""), $1, $2} END {print ""}' /proc/$p/smaps_rollup
done
# A booted VM for comparison.
$MOAT run --backend vm --mem 512 -- sh -c 'echo up; sleep 25' > $W/cold.out 2>$W/cold.err &
for n in $(seq 1 120); do grep -q '^up' $W/cold.out 2>/dev/null && break; sleep 1; done
sleep 3
for p in $(pgrep -f 'moat-vmm.*--kernel'); do
  awk -v p=$p '/^Rss:|^Pss:|^Private_Dirty:/ {printf "%s %s=%s ", "cold", $1, $2} END {print ""}' /proc/$p/smaps_rollup
done
wait
