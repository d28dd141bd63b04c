//! Step 1: resource limits.
//!
//! Limits only ever go down: a requested value above the current hard limit is clamped to it,
//! so the step never needs `CAP_SYS_RESOURCE` and never loosens what the caller inherited.
//! Soft and hard limits are both set, so the agent cannot raise the soft limit back.

use crate::error::SandboxError;
use crate::sys;

/// Resource limits for the agent. `None` leaves a limit as inherited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`: open file descriptors.
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC`: processes and threads of the agent's real uid (a fork-bomb bound).
    pub nproc: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file the agent may write, in bytes.
    pub fsize: Option<u64>,
    /// `RLIMIT_CORE`: core dump size; 0 so that no memory image (and no secret in it) is dumped.
    pub core: Option<u64>,
    /// `RLIMIT_MEMLOCK`: bytes of locked memory.
    pub memlock: Option<u64>,
    /// `RLIMIT_MSGQUEUE`: bytes in POSIX message queues.
    pub msgqueue: Option<u64>,
    /// `RLIMIT_AS`: address space. Off by default: JIT runtimes reserve large virtual ranges.
    pub address_space: Option<u64>,
    /// `RLIMIT_STACK`: main thread stack.
    pub stack: Option<u64>,
}

impl Default for Rlimits {
    /// Limits that a coding agent (shells, compilers, node, python, git) does not hit.
    fn default() -> Self {
        Self {
            nofile: Some(65_536),
            nproc: Some(4_096),
            fsize: Some(16 << 30),
            core: Some(0),
            memlock: Some(8 << 20),
            msgqueue: Some(800 << 10),
            address_space: None,
            stack: None,
        }
    }
}

/// One limit to apply, resolved before `fork`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limit {
    pub(crate) name: &'static str,
    pub(crate) resource: sys::Resource,
    pub(crate) value: u64,
}

impl Rlimits {
    /// The limits to apply, in a fixed-size array so that applying them does not allocate.
    pub(crate) fn resolve(&self) -> [Option<Limit>; 8] {
        let entry = |name, resource, value: Option<u64>| {
            value.map(|value| Limit {
                name,
                resource,
                value,
            })
        };
        [
            entry("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, self.nofile),
            entry("RLIMIT_NPROC", libc::RLIMIT_NPROC, self.nproc),
            entry("RLIMIT_FSIZE", libc::RLIMIT_FSIZE, self.fsize),
            entry("RLIMIT_CORE", libc::RLIMIT_CORE, self.core),
            entry("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK, self.memlock),
            entry("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE, self.msgqueue),
            entry("RLIMIT_AS", libc::RLIMIT_AS, self.address_space),
            entry("RLIMIT_STACK", libc::RLIMIT_STACK, self.stack),
        ]
    }
}

/// Applies the limits; returns how many were set.
pub(crate) fn apply(limits: &[Option<Limit>]) -> Result<u32, SandboxError> {
    let mut applied = 0;
    for limit in limits.iter().flatten() {
        let (_, hard) =
            sys::getrlimit(limit.resource).map_err(|e| SandboxError::Rlimit(limit.name, e))?;
        let value = limit.value.min(hard);
        sys::setrlimit(limit.resource, value, value)
            .map_err(|e| SandboxError::Rlimit(limit.name, e))?;
        applied += 1;
    }
    Ok(applied)
}
