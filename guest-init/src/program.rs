//! Which program opened a connection: guest-init's answer to the netstack's question at every
//! SYN ([`moat_netstack::ProgramLookup`]), carried to the egress proxy in the flow header as
//! the guest's claim.
//!
//! ```text
//!  SYN agent:port -> dst
//!    -> /proc/thread-self/net/tcp (and tcp6, for v4-mapped sockets): the socket's inode
//!    -> /proc/<pid>/fd/*, newest process first: the first holding socket:[inode]
//!       (at most MAX_FDS descriptor links)
//!    -> /proc/<pid>/exe: path (symlinks resolved) and, opened, the file's SHA-256
//!       (cached by device, inode, mtime and size; files above MAX_HASHED are not hashed)
//! ```
//!
//! It runs on the netstack's thread, which lives in the agent's network namespace (where the
//! TUN device is), so `thread-self/net` is the agent's socket table; `/proc` is the workspace's
//! own (its PID namespace: the agent's processes, nothing of the host's).
//!
//! Fail closed: anything that cannot be told (no socket, the process gone, a path the header
//! cannot carry, too many descriptors to look through) is no program, and a rule with
//! `programs` then refuses the flow. The newest process is asked first because the one
//! connecting is usually the tool just started (a whole scan per SYN cost 20 to 60 ms among
//! 150 host processes); a socket held by several processes (inherited, or passed on) is
//! therefore named by its newest holder, which says no more than an `exec` after `connect`
//! would. Bounded per SYN: one read of the socket table (at most [`MAX_TABLE`] bytes), at most
//! [`MAX_FDS`] descriptor links, and at most one hash of at most [`MAX_HASHED`] bytes, which is
//! cached ([`MAX_CACHED`] files), so a flood of connections from one program hashes it once.
//!
//! What this is worth: the owner's executable file, as the kernel names it. It does not say
//! what code that process runs (`LD_PRELOAD`, an interpreter's `-c`, a debugger) nor who
//! asked it to connect; see docs/threat-model.md.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use moat_flow_header::{Program, ProgramPath, SHA256_LEN};
use sha2::{Digest, Sha256};

/// Largest executable hashed; a larger one is named by its path alone (a rule that names a
/// digest for it then refuses it). Large enough for a statically linked toolchain or runtime.
pub const MAX_HASHED: u64 = 256 * 1024 * 1024;
/// Descriptor links examined per lookup; beyond it the owner is unknown.
pub const MAX_FDS: usize = 64 * 1024;
/// Files whose digest is kept; the cache is emptied when full.
pub const MAX_CACHED: usize = 256;
/// Bytes of one socket table read per lookup (about 150 bytes a socket).
pub const MAX_TABLE: u64 = 4 * 1024 * 1024;

/// What identifies one version of one file: a new build at the same path (new inode, or
/// rewritten in place: new mtime or size) is hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.size(),
        }
    }
}

/// The lookup through `/proc`.
#[derive(Debug)]
pub struct ProcPrograms {
    /// The workspace's proc (`/proc`).
    proc: PathBuf,
    /// The socket tables of the calling thread's network namespace.
    net: PathBuf,
    digests: HashMap<FileKey, Option<[u8; SHA256_LEN]>>,
    /// Files hashed so far (a measure of work, for tests and benches).
    hashed: u64,
}

impl Default for ProcPrograms {
    fn default() -> Self {
        Self::new(Path::new("/proc"))
    }
}

impl ProcPrograms {
    /// A lookup through the proc file system mounted at `proc`.
    pub fn new(proc: &Path) -> Self {
        ProcPrograms {
            proc: proc.to_owned(),
            net: proc.join("thread-self/net"),
            digests: HashMap::new(),
            hashed: 0,
        }
    }

    /// Files hashed so far (cache misses).
    pub fn hashed(&self) -> u64 {
        self.hashed
    }

    /// The program of the process that holds the socket `agent -> destination`.
    pub fn lookup(&mut self, agent: SocketAddrV4, destination: SocketAddrV4) -> Option<Program> {
        let inode = self.socket_inode(agent, destination)?;
        let pid = self.owner(inode)?;
        self.program(pid)
    }

    /// The inode of the socket with this local and remote address, from the socket tables.
    fn socket_inode(&self, local: SocketAddrV4, remote: SocketAddrV4) -> Option<u64> {
        ["tcp", "tcp6"].iter().find_map(|table| {
            let text = read_bounded(&self.net.join(table), MAX_TABLE)?;
            find_inode(&text, local, remote)
        })
    }

    /// The process holding socket `inode`, the newest first; none if nobody does.
    fn owner(&self, inode: u64) -> Option<u32> {
        let wanted = format!("socket:[{inode}]");
        let mut pids: Vec<u32> = std::fs::read_dir(&self.proc)
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        pids.sort_unstable_by(|a, b| b.cmp(a));
        let mut seen = 0usize;
        for pid in pids {
            let Ok(fds) = std::fs::read_dir(self.proc.join(pid.to_string()).join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                seen += 1;
                if seen > MAX_FDS {
                    return None;
                }
                if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()) {
                    return Some(pid);
                }
            }
        }
        None
    }

    /// The executable of `pid`: its path, and its digest when it could be hashed.
    fn program(&mut self, pid: u32) -> Option<Program> {
        let exe = self.proc.join(pid.to_string()).join("exe");
        let path = std::fs::read_link(&exe).ok()?;
        let path = ProgramPath::new(path.to_str()?).ok()?;
        // Opened through the magic link: the very file the process runs, wherever its mount
        // namespace put it (even deleted or replaced since).
        let digest = File::open(&exe).ok().and_then(|file| self.digest(file));
        Some(Program::new(pid, path, digest))
    }

    fn digest(&mut self, mut file: File) -> Option<[u8; SHA256_LEN]> {
        let key = FileKey::of(&file.metadata().ok()?);
        if let Some(known) = self.digests.get(&key) {
            return *known;
        }
        let digest = if key.size > MAX_HASHED {
            None
        } else {
            self.hashed += 1;
            hash(&mut file)
        };
        if self.digests.len() >= MAX_CACHED {
            self.digests.clear();
        }
        self.digests.insert(key, digest);
        digest
    }
}

impl moat_netstack::ProgramLookup for ProcPrograms {
    fn program_of(&mut self, agent: SocketAddrV4, destination: SocketAddrV4) -> Option<Program> {
        self.lookup(agent, destination)
    }
}

/// SHA-256 of at most [`MAX_HASHED`] bytes of `file`; none if it is longer (it grew since its
/// size was read) or cannot be read.
fn hash(file: &mut File) -> Option<[u8; SHA256_LEN]> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_HASHED {
            return None;
        }
        sha.update(&buf[..n]);
    }
    Some(sha.finalize().into())
}

/// Reads at most `max` bytes of `path` as text.
fn read_bounded(path: &Path, max: u64) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(max)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The inode of the socket `local -> remote` in a `/proc/net/tcp` or `tcp6` table (a socket
/// of either family: an IPv6 socket connecting to an IPv4 address shows it v4-mapped).
fn find_inode(table: &str, local: SocketAddrV4, remote: SocketAddrV4) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        if parse_endpoint(l)? != local || parse_endpoint(r)? != remote {
            return None;
        }
        // 0: a socket no process holds any more (TIME_WAIT, or closed while connecting).
        inode.parse::<u64>().ok().filter(|&i| i != 0)
    })
}

/// One `ADDR:PORT` of a socket table: the address as the kernel's 32-bit words in host byte
/// order, hex (8 digits for IPv4, 32 for IPv6, IPv4-mapped only), the port hex.
fn parse_endpoint(text: &str) -> Option<SocketAddrV4> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => Ipv4Addr::from(word(addr)?),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            std::net::Ipv6Addr::from(bytes).to_ipv4_mapped()?
        }
        _ => return None,
    };
    Some(SocketAddrV4::new(ip, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn socket_tables_are_read_in_host_byte_order() {
        let ip = u32::from_ne_bytes([10, 200, 0, 2]);
        let line = format!("{ip:08X}:9C40");
        assert_eq!(
            parse_endpoint(&line),
            Some("10.200.0.2:40000".parse().unwrap())
        );
        let mapped = [0u32, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip];
        let line: String = mapped.iter().map(|w| format!("{w:08X}")).collect();
        assert_eq!(
            parse_endpoint(&format!("{line}:01BB")),
            Some("10.200.0.2:443".parse().unwrap())
        );
        // A real IPv6 address is never a workspace flow (the TUN device carries IPv4 only).
        assert_eq!(parse_endpoint(&format!("{:032X}:01BB", 1)), None);
        assert_eq!(parse_endpoint("zz:01BB"), None);
    }

    #[test]
    fn the_inode_is_taken_from_the_line_naming_both_ends_and_never_zero() {
        let ep = |a: [u8; 4], p: u16| format!("{:08X}:{p:04X}", u32::from_ne_bytes(a));
        let (agent, dst) = ([10, 200, 0, 2], [198, 18, 0, 7]);
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {} {} 06 00000000:00000000 03:00000000 00000000 0 0 0 1 0\n\
             1: {} {} 02 00000000:00000000 01:00000000 00000000 1000 0 4242 1 0\n\
             2: {} {} 02 00000000:00000000 01:00000000 00000000 1000 0 777 1 0\n",
            ep(agent, 40000),
            ep(dst, 443),
            ep(agent, 40001),
            ep(dst, 443),
            ep(agent, 40001),
            ep([198, 18, 0, 8], 443),
        );
        let local = |p| SocketAddrV4::new(agent.into(), p);
        let remote = SocketAddrV4::new(dst.into(), 443);
        assert_eq!(find_inode(&table, local(40001), remote), Some(4242));
        assert_eq!(find_inode(&table, local(40000), remote), None);
        assert_eq!(find_inode(&table, local(40002), remote), None);
    }
}
