//! moat-vmm: PCI configuration cycles and BAR accesses from arbitrary guest bytes, against the
//! fake VFIO device (see moat_vmm::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moat_vmm::fuzzing::pci_accesses(data);
});
