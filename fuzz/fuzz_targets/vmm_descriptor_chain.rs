//! moat-vmm: descriptor chain from arbitrary guest bytes (see moat_vmm::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moat_vmm::fuzzing::descriptor_chain(data);
});
