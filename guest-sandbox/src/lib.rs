//! moat-guest-sandbox: confines one agent process (issue 4).
//!
//! Not implemented yet: namespaces, Landlock, seccomp, no_new_privs and rlimits.
