//! `keep_memory_private`, which `moat run`, `moat proxy` and `moat-broker` call first: after it,
//! the process cannot be dumped or read through /proc by its own uid, and no core limit can be
//! raised again. A test binary of its own, since it changes the whole process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn the_process_becomes_non_dumpable_with_no_core_limit() {
    assert!(
        nix::sys::prctl::get_dumpable().unwrap(),
        "test process starts dumpable"
    );
    moat_broker_client::keep_memory_private().unwrap();
    assert!(!nix::sys::prctl::get_dumpable().unwrap());
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap();
    assert_eq!((soft, hard), (0, 0));
}
