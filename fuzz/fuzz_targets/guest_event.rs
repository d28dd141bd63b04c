//! The host's parser of guest-init's process events never panics, and whatever it accepts
//! becomes a record without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_egress::audit::Audit;
use moat_egress::guest_audit::GuestEvent;

fuzz_target!(|data: &[u8]| {
    if let Some(event) = GuestEvent::parse(data) {
        let audit = Audit::to_writer(Box::new(std::io::sink()), "fuzz");
        let _ = audit.process_record(&event);
    }
});
