//! virtio-blk: read the capacity, read sector 0, write sector 1 and read it back.

use core::fmt::Write;

use crate::io::Serial;
use crate::virtio::{self, Vq, r8, r32, reg, w8, w32, w64};

const HDR: u64 = 0x31_0000;
const DATA: u64 = 0x31_1000;
const STATUS: u64 = 0x31_2000;
const MARK: &[u8] = b"written by the moat probe";

fn request(
    base: u64,
    vq: &mut Vq,
    type_: u32,
    sector: u64,
    write_data: bool,
) -> Result<u8, &'static str> {
    w32(HDR, type_);
    w32(HDR + 4, 0);
    w64(HDR + 8, sector);
    w8(STATUS, 0xff);
    vq.set_desc(0, HDR, 16, 1);
    vq.set_desc(1, DATA, 512, 1 | if write_data { 0 } else { 2 });
    vq.set_desc(2, STATUS, 1, 2);
    // Chain 0 -> 1 -> 2.
    crate::virtio::w16(vq.desc + 14, 1);
    crate::virtio::w16(vq.desc + 16 + 14, 2);
    vq.publish(0);
    virtio::kick_and_wait(base, vq, 0)?;
    Ok(r8(STATUS))
}

pub fn test(out: &mut Serial, nth: usize, slot: u64, base: u64) -> Result<(), &'static str> {
    virtio::init(slot, base, 1)?;
    let sectors =
        u64::from(r32(base + reg::CONFIG)) | (u64::from(r32(base + reg::CONFIG + 4)) << 32);
    let mut vq = Vq::new(slot, 0);
    let st = request(base, &mut vq, 0, 0, false)?;
    let mut sum = 0u32;
    for i in 0..512 {
        sum = sum.wrapping_mul(31).wrapping_add(u32::from(r8(DATA + i)));
    }
    let _ = writeln!(
        out,
        "probe: block{nth} sectors {sectors} read0 status {st} sum {sum:#010x}"
    );
    for i in 0..512u64 {
        let b = MARK.get(i as usize).copied().unwrap_or(0);
        w8(DATA + i, b);
    }
    let st = request(base, &mut vq, 1, 1, true)?;
    let _ = writeln!(out, "probe: block{nth} write1 status {st}");
    for i in 0..512u64 {
        w8(DATA + i, 0);
    }
    let st = request(base, &mut vq, 0, 1, false)?;
    let same = (0..MARK.len()).all(|i| r8(DATA + i as u64) == MARK[i]);
    let _ = writeln!(out, "probe: block{nth} read1 status {st} has_mark {same}");
    let st = request(base, &mut vq, 0, sectors, false)?;
    let _ = writeln!(out, "probe: block{nth} read past end status {st}");
    Ok(())
}
