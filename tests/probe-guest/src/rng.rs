//! virtio-rng: ask for 64 bytes and check they arrived and are not all zero.

use core::fmt::Write;

use crate::io::Serial;
use crate::virtio::{self, Vq, r8};

const BUF: u64 = 0x30_0000;

pub fn test(out: &mut Serial, slot: u64, base: u64) -> Result<(), &'static str> {
    virtio::init(slot, base, 1)?;
    let mut vq = Vq::new(slot, 0);
    vq.set_desc(0, BUF, 64, 2);
    vq.publish(0);
    let len = virtio::kick_and_wait(base, &mut vq, 0)?;
    let nonzero = (0..64).any(|i| r8(BUF + i) != 0);
    let _ = writeln!(out, "probe: rng got {len} bytes nonzero {nonzero}");
    Ok(())
}
