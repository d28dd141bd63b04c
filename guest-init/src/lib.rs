//! moat-guest-init: PID 1 in the guest and in the namespace backend (issue 4).
//!
//! Not implemented yet: it will mount the guest's filesystems, start the netstack, install the
//! workspace CA and launch the agent through `moat-guest-sandbox`.
