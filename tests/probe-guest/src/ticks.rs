//! `probe.ticks=N`: a guest whose state changes over time, for snapshot tests. Every tick
//! (about 0.1 s of TSC) it folds the tick number into a running sum kept in a register or on
//! the stack, asks the rng device (when there is one) for 64 bytes, and prints both. A
//! snapshot taken between ticks and restored in another VMM must go on counting from where it
//! was, with the same sum the host computes, and the rng queue still answering.

use core::fmt::Write;

use crate::io::{Serial, rdtsc};
use crate::virtio::{self, QSIZE, Vq, r8};

const TICK_CYCLES: u64 = 200_000_000;
const BUF: u64 = 0x30_0000;

pub fn run(out: &mut Serial, n: u64, rng: Option<(u64, u64)>) -> Result<(), &'static str> {
    let mut vq = match rng {
        Some((slot, base)) => {
            virtio::init(slot, base, 1)?;
            Some((Vq::new(slot, 0), base))
        }
        None => None,
    };
    let mut sum: u64 = 0;
    for i in 1..=n {
        let start = rdtsc();
        while rdtsc().wrapping_sub(start) < TICK_CYCLES {
            core::hint::spin_loop();
        }
        let mut got = 0;
        if let Some((vq, base)) = vq.as_mut() {
            let head = (i % u64::from(QSIZE)) as u16;
            vq.set_desc(head, BUF + 64 * u64::from(head), 64, 2);
            vq.publish(head);
            got = virtio::kick_and_wait(*base, vq, 0)?;
            if !(0..64).any(|b| r8(BUF + 64 * u64::from(head) + b) != 0) {
                return Err("rng handed out zeros");
            }
        }
        sum = sum.wrapping_mul(31).wrapping_add(i);
        let _ = writeln!(out, "probe: tick {i} sum {sum:#x} rng {got}");
    }
    let _ = writeln!(out, "probe: ticks done sum {sum:#x}");
    Ok(())
}
