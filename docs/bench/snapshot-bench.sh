#!/bin/sh
# Issue 20's measurements (docs/benchmarks.md, "VM templates, forks and the warm pool"), in
# one environment where KVM is real: `cargo xtask bench snapshot` runs it inside one L1 and
# reads its `sample NAME VALUE` lines (medians and ratios: xtask/src/bench/snapshot.rs).
# Needs MOAT (the moat binary, moat-vmm beside it) and MOAT_IMAGES (a directory whose
# current.toml names kernel, initramfs and rootfs). RUNS sets the samples per row (default 3).
set -u
MOAT=${MOAT:?set MOAT to the moat binary}
VMM=$(dirname "$MOAT")/moat-vmm
: "${MOAT_IMAGES:?set MOAT_IMAGES}"
RUNS=${RUNS:-3}
export MOAT_IMAGES MOAT_LOG=error
W=/tmp/snapbench; rm -rf $W; mkdir -p $W
now() { date +%s%N; }
sample() { echo "sample $1 $2"; }
FIRST_LINE="$(dirname "$0")/first-line.py"
# label, args...: the time to the agent's first line ("up"), from the spawn and from moat's
# main() (its first debug line), and to the command's exit: first-line.py reads the output
# as it comes (a poll loop of short processes here would take the CPU the VM needs).
run() {
  label=$1; shift
  MOAT_LOG=error,moat::run_cmd=debug python3 "$FIRST_LINE" "$label" $W/err "$@" || tail -5 $W/err
}
# smaps_rollup of each pid that runs a VM: Pss and Private_Dirty in KiB, as samples named
# LABEL_pss_kib... (a jailed moat-vmm is two processes: the one with the vCPU thread holds
# the guest's memory; its parent only waits).
memory_of() {
  label=$1; shift
  for p in "$@"; do
    grep -qsx vcpu0 /proc/$p/task/*/comm || continue
    sample "${label}_pss_kib" "$(awk '/^Pss:/ {print $2}' /proc/$p/smaps_rollup)"
    sample "${label}_private_dirty_kib" "$(awk '/^Private_Dirty:/ {print $2}' /proc/$p/smaps_rollup)"
  done
}

i=0; while [ $i -lt "$RUNS" ]; do i=$((i + 1)); run cold_boot $MOAT run --backend vm --mem 512 -- sh -c 'echo up'; done

s=$(now); $MOAT run --backend vm --mem 512 --snapshot-to $W/tpl >/dev/null 2>$W/tplerr || { echo "failed template"; tail $W/tplerr; exit 1; }
sample template_ms $(( ($(now) - s) / 1000000 ))
sample template_memory_apparent_kib $(( $(stat -c %s $W/tpl/memory) / 1024 ))
sample template_memory_allocated_kib "$(du -k $W/tpl/memory | cut -f1)"
sample template_state_bytes "$(stat -c %s $W/tpl/state)"

i=0; while [ $i -lt "$RUNS" ]; do i=$((i + 1)); run restore $MOAT run --backend vm --from-snapshot $W/tpl -- sh -c 'echo up'; done

# The warm pool: RUNS machines made ready, then claimed one after another (each claim's
# machine replaced meanwhile, in the background).
s=$(now)
MOAT_LOG=info $MOAT pool --template $W/tpl --size "$RUNS" --socket $W/pool.sock 2>$W/pool.log &
pool=$!
n=0; while [ "$(grep -c 'pool machine ready' $W/pool.log 2>/dev/null)" -lt "$RUNS" ]; do
  n=$((n + 1)); [ $n -gt 6000 ] && { echo "failed pool_ready"; tail $W/pool.log; break; }
  kill -0 $pool 2>/dev/null || { echo "failed pool"; tail $W/pool.log; break; }
  sleep 0.1
done
sample pool_ready_ms $(( ($(now) - s) / 1000000 ))
# The memory of a ready (paused, prepared) machine, before any claim.
memory_of pooled $(pgrep -f "moat-vmm.*--restore $W/tpl")
# Each claim on a machine otherwise idle, as the cold boots were: the pool's refill of the
# last claim's place (2 s after it, then a restore) done first.
i=0; while [ $i -lt "$RUNS" ]; do i=$((i + 1)); sleep 6; run claim $MOAT run --backend vm --pool $W/pool.sock -- sh -c 'echo up'; done
# Where a claim's time goes: the cost of starting the moat binary at all, and one more claim
# with moat's debug log (its timestamps).
python3 - "$MOAT" "$RUNS" <<'PY'
import subprocess, sys, time
for _ in range(int(sys.argv[2])):
    t = time.monotonic()
    subprocess.run([sys.argv[1], "--version"], stdout=subprocess.DEVNULL, check=True)
    print(f"sample moat_exec_ms {round((time.monotonic() - t) * 1000)}")
PY
MOAT_LOG=debug $MOAT run --backend vm --pool $W/pool.sock -- sh -c 'echo up' 2>&1 | sed 's/^/trace /'
# And where a claim's time goes in the guest: guest-init's step times (`--boot-log`), and
# when it said the workspace came.

i=0; while [ $i -lt "$RUNS" ]; do i=$((i + 1))
  sleep 6
  run claim_steps $MOAT run --backend vm --pool $W/pool.sock --boot-log -- sh -c 'echo up'
done
kill $pool; wait $pool

# moat-vmm alone: main() to the first vCPU entry (--stats), restore (paused) vs boot.
truncate -s 64M $W/home.img
ROOTFS=$(grep '^rootfs = ' $MOAT_IMAGES/current.toml | cut -d'"' -f2)
KERNEL=$(grep '^kernel = ' $MOAT_IMAGES/current.toml | cut -d'"' -f2)
i=0; while [ $i -lt "$RUNS" ]; do i=$((i + 1))
  $VMM --restore $W/tpl --mem 512 --vsock-uds $W/v$i --block-ro $ROOTFS --block $W/home.img --rng --start-paused --api-sock $W/api$i --serial-out $W/s$i --timeout 2 --stats 2>$W/stats$i >/dev/null
  v=$(grep -o 'main_to_first_kvm_run_us":[0-9]*' $W/stats$i | cut -d: -f2)
  if [ -n "$v" ]; then sample vmm_restore_to_kvm_run_us "$v"; else echo "failed vmm_restore: $(tail -3 $W/stats$i)"; fi
  $VMM --kernel $KERNEL --mem 512 --vsock-uds $W/b$i --block-ro $ROOTFS --block $W/home.img --rng --serial-out $W/bs$i --timeout 2 --stats 2>$W/bstats$i >/dev/null
  v=$(grep -o 'main_to_first_kvm_run_us":[0-9]*' $W/bstats$i | cut -d: -f2)
  if [ -n "$v" ]; then sample vmm_boot_to_kvm_run_us "$v"; else echo "failed vmm_boot: $(tail -3 $W/bstats$i)"; fi
done

# Private memory of running forks against a booted VM (smaps_rollup of every moat-vmm).
i=0; while [ $i -lt "$RUNS" ]; do i=$((i + 1))
  $MOAT run --backend vm --from-snapshot $W/tpl -- sh -c 'echo up; sleep 40' > $W/f$i.out 2>$W/f$i.err &
done
n=0; while [ $n -lt 120 ]; do
  c=$(cat $W/f*.out 2>/dev/null | grep -c '^up'); [ "$c" -ge "$RUNS" ] && break; n=$((n + 1)); sleep 1
done

memory_of fork $(pgrep -f "moat-vmm.*--restore $W/tpl")
$MOAT run --backend vm --mem 512 -- sh -c 'echo up; sleep 25' > $W/cold.out 2>$W/cold.err &
n=0; while [ $n -lt 120 ]; do grep -q '^up' $W/cold.out 2>/dev/null && break; n=$((n + 1)); sleep 1; done

memory_of cold $(pgrep -f 'moat-vmm.*--kernel')
wait
echo "done"
