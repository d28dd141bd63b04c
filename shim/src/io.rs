//! A process's standard streams: the FIFOs containerd made for it (`ctr`'s, the CRI's log
//! pipes), or nothing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;

/// Where containerd wants a process's streams (empty: none).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
}

/// The three streams for `Command`.
#[derive(Debug)]
pub struct Streams {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl StdioPaths {
    /// Opens the FIFOs. stdin is opened without waiting for a writer (containerd's side may
    /// come later) and then made blocking again, as the process expects; stdout and stderr
    /// read-write, so that opening never waits for containerd's reader either.
    pub fn open(&self) -> std::io::Result<Streams> {
        let stdin = if self.stdin.is_empty() {
            Stdio::null()
        } else {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.stdin)?;
            blocking(&file)?;
            Stdio::from(file)
        };
        let output = |path: &str| -> std::io::Result<Stdio> {
            if path.is_empty() {
                return Ok(Stdio::null());
            }
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            Ok(Stdio::from(file))
        };
        Ok(Streams {
            stdin,
            stdout: output(&self.stdout)?,
            stderr: output(&self.stderr)?,
        })
    }
}

/// Clears O_NONBLOCK on `file`.
fn blocking(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}
