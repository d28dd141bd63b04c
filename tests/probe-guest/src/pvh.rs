//! Reading the PVH `hvm_start_info` the VMM wrote (xen/include/public/arch-x86/hvm/start_info.h).

const MAGIC: u32 = 0x336e_c578;

fn rd32(addr: u64) -> u32 {
    // SAFETY: identity-mapped guest RAM; addresses come from the VMM's boot structures, which
    // the probe is here to check, and are read with volatile loads.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub struct StartInfo {
    pub version: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
}

pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct Module {
    pub paddr: u64,
    pub size: u64,
}

impl StartInfo {
    pub fn read(at: u64) -> Result<Self, &'static str> {
        if at == 0 {
            return Err("no start_info pointer in ebx");
        }
        if rd32(at) != MAGIC {
            return Err("bad start_info magic");
        }
        Ok(Self {
            version: rd32(at + 4),
            nr_modules: rd32(at + 12),
            modlist_paddr: rd64(at + 16),
            cmdline_paddr: rd64(at + 24),
            memmap_paddr: rd64(at + 40),
            memmap_entries: rd32(at + 48),
        })
    }

    pub fn cmdline(&self) -> &'static str {
        if self.cmdline_paddr == 0 {
            return "";
        }
        let mut len = 0u64;
        while len < 4096 && rd8(self.cmdline_paddr + len) != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes of identity-mapped RAM before a NUL, checked above.
        let bytes =
            unsafe { core::slice::from_raw_parts(self.cmdline_paddr as *const u8, len as usize) };
        core::str::from_utf8(bytes).unwrap_or("<not utf-8>")
    }

    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        (0..u64::from(self.memmap_entries)).map(|i| {
            let e = self.memmap_paddr + i * 24;
            MemmapEntry {
                addr: rd64(e),
                size: rd64(e + 8),
                kind: rd32(e + 16),
            }
        })
    }

    pub fn modules(&self) -> impl Iterator<Item = Module> + '_ {
        (0..u64::from(self.nr_modules)).map(|i| {
            let m = self.modlist_paddr + i * 32;
            Module {
                paddr: rd64(m),
                size: rd64(m + 8),
            }
        })
    }
}

/// A 32-bit FNV-1a over guest memory, so the host can check the initramfs arrived intact.
pub fn checksum(addr: u64, len: u64) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for i in 0..len {
        h ^= u32::from(rd8(addr + i));
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}
