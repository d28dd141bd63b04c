//! The kernel's Landlock ABI version, asked once here for the agent's sandbox
//! (moat-guest-sandbox), the VMM's jail and `moat doctor`. The landlock crate deliberately
//! does not expose it; the sandbox needs it to refuse a kernel below its minimum, and doctor to
//! report it.

/// `LANDLOCK_CREATE_RULESET_VERSION`.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;

/// The Landlock ABI version of the running kernel; 0 when Landlock is not built in or not
/// enabled.
pub fn landlock_abi() -> u32 {
    // SAFETY: with a null attribute, a zero size and the VERSION flag the kernel only returns
    // the ABI version and reads nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0 as libc::size_t,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(rc).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_abi_is_a_small_number() {
        // 0 where Landlock is off; the newest kernels are in the tens at most.
        assert!(super::landlock_abi() < 100);
    }
}
