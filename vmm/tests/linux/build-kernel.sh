#!/usr/bin/env bash
# Builds the vmlinux that tests/linux_boot.rs boots through moat-vmm (set MOAT_LINUX_KERNEL to
# the path printed at the end). Debian's linux-source-6.12, tinyconfig + fragment.config, and a
# one-line patch that skips int3_selftest() (int3 at guest CPL0 fails emulation on nested PVM).
# About 8 minutes on 2 cores. Usage: build-kernel.sh [WORKDIR] (default /tmp/moat-guest-kernel).
# With SMP=1 in the environment the kernel is built with CONFIG_SMP (for MOAT_LINUX_SMP_KERNEL).
# With BZIMAGE=1 it also builds an LZ4-compressed bzImage (for MOAT_LINUX_BZIMAGE; LZ4 because
# the decompressor runs in emulated guest kernel mode on nested PVM: 36 s with LZ4 here).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/moat-guest-kernel}"
if ! dpkg -s linux-source-6.12 flex bison libelf-dev bc lz4 >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-source-6.12 flex bison libelf-dev xz-utils bc lz4
fi
mkdir -p "$work"
cd "$work"
if [ ! -d linux-source-6.12 ]; then
  tar xf /usr/src/linux-source-6.12.tar.xz
fi
cd linux-source-6.12
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$here/fragment.config" >/dev/null
if [ "${SMP:-0}" = 1 ]; then
  printf 'CONFIG_SMP=y\nCONFIG_NR_CPUS=8\n' > smp.config
  scripts/kconfig/merge_config.sh -m .config smp.config >/dev/null
fi
if [ "${BZIMAGE:-0}" = 1 ]; then
  printf '# CONFIG_KERNEL_XZ is not set\n# CONFIG_KERNEL_GZIP is not set\nCONFIG_KERNEL_LZ4=y\n' > lz4.config
  scripts/kconfig/merge_config.sh -m .config lz4.config >/dev/null
fi
make -s olddefconfig
if ! grep -q "moat: int3" arch/x86/kernel/alternative.c; then
  python3 - <<'PY'
p = 'arch/x86/kernel/alternative.c'
s = open(p).read()
i = s.index('static noinline void __init int3_selftest(void)')
j = s.index('{', i)
s = s[:j + 1] + '\n\treturn; /* moat: int3 fails under nested PVM */' + s[j + 1:]
open(p, 'w').write(s)
PY
fi
make -s -j"$(nproc)" vmlinux
echo "$work/linux-source-6.12/vmlinux"
if [ "${BZIMAGE:-0}" = 1 ]; then
  make -s -j"$(nproc)" bzImage
  echo "$work/linux-source-6.12/arch/x86/boot/bzImage"
fi
