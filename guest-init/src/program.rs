//! Which program opened a connection: guest-init's answer to the netstack's question at every
//! SYN ([`moat_netstack::ProgramLookup`]), carried to the egress proxy in the flow header as
//! the guest's claim.
//!
//! ```text
//!  SYN agent:port -> dst
//!    -> the socket's inode: sock_diag (netlink, an exact lookup by the four addresses), or
//!       where the kernel has none (the VM's: CONFIG_INET_DIAG is off) the socket tables
//!       /proc/thread-self/net/tcp and tcp6 (for v4-mapped sockets)
//!    -> /proc/<pid>/fd/*, newest process first: the first holding socket:[inode]
//!       (at most MAX_FDS descriptor links)
//!    -> /proc/<pid>/exe: path (symlinks resolved) and, opened, the file's SHA-256
//!       (cached by device, inode, mtime and size; files above MAX_HASHED are not hashed)
//! ```
//!
//! It runs on the netstack's lookup thread, which the netstack thread starts and which so
//! lives in the agent's network namespace (where the TUN device is): its netlink socket and
//! `thread-self/net` see the agent's sockets; `/proc` is the workspace's own (its PID
//! namespace: the agent's processes, nothing of the host's). The netstack holds the SYN
//! unanswered meanwhile, and moves the bytes of open flows without waiting for it.
//!
//! Fail closed: anything that cannot be told (no socket, the process gone, a path the header
//! cannot carry, too many descriptors to look through) is no program, and a rule with
//! `programs` then refuses the flow. Bounded per SYN: one sock_diag question per address
//! family, or one read of each socket table (at most [`MAX_TABLE`] bytes; reading one walks the
//! kernel's whole TCP hash, 10 to 20 ms on a large host, which is why sock_diag comes first),
//! at most [`MAX_FDS`] descriptor links, and at most one hash of at most [`MAX_HASHED`] bytes,
//! which is cached ([`MAX_CACHED`] files), so a flood of connections from one program hashes it
//! once. The newest process is asked first, because the one connecting is usually the tool
//! just started; a socket held by several processes (inherited, or passed on) is therefore
//! named by its newest holder, which says no more than an `exec` after `connect` would.
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
    /// What sock_diag has shown of itself.
    diag: Diag,
}

/// Whether the kernel's sock_diag answers for TCP sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diag {
    /// Not yet known: it has found no socket, and the tables none it missed.
    Unknown,
    /// It found a socket: its misses are real.
    Works,
    /// It missed a socket the tables hold (no inet_diag in this kernel): tables only.
    Absent,
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
            diag: Diag::Unknown,
        }
    }

    /// A lookup that reads the socket tables only, as on a kernel without sock_diag for TCP
    /// (the VM's), whatever this kernel has.
    pub fn tables_only(proc: &Path) -> Self {
        ProcPrograms {
            diag: Diag::Absent,
            ..Self::new(proc)
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

    /// The inode of the socket with this local and remote address: sock_diag's answer, or
    /// where it cannot answer, the socket tables'. A kernel without TCP's sock_diag answers
    /// "no such socket" (ENOENT) as it does for a socket that is gone, so its misses are
    /// trusted only once it has found one; until then a miss is asked of the tables too, and
    /// if they find the socket, sock_diag is not asked again.
    fn socket_inode(&mut self, local: SocketAddrV4, remote: SocketAddrV4) -> Option<u64> {
        if self.diag != Diag::Absent {
            match diag::inode(local, remote) {
                Ok(Some(inode)) => {
                    self.diag = Diag::Works;
                    return Some(inode);
                }
                Ok(None) if self.diag == Diag::Works => return None,
                Ok(None) | Err(()) => {}
            }
        }
        let found = ["tcp", "tcp6"].iter().find_map(|table| {
            let text = read_bounded(&self.net.join(table), MAX_TABLE)?;
            find_inode(&text, local, remote)
        });
        if found.is_some() {
            self.diag = Diag::Absent;
        }
        found
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

/// The kernel's sock_diag (`NETLINK_SOCK_DIAG`, linux/inet_diag.h): asked for one TCP socket by
/// its four addresses, it looks it up in its hash directly, however many sockets there are.
mod diag {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const IPPROTO_TCP: u8 = 6;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    /// nlmsghdr, then inet_diag_req_v2 (family, protocol, ext, pad, states, inet_diag_sockid).
    const REQUEST_LEN: u32 = 16 + 8 + 48;
    /// Where inet_diag_msg's fields sit in a reply (after the 16-byte nlmsghdr).
    const MSG_ID: usize = 16 + 4;
    const MSG_INODE: usize = MSG_ID + 48 + 16;

    /// The sock_diag request for the TCP socket `local -> remote`, as an IPv4 socket or an
    /// IPv6 one holding v4-mapped addresses.
    fn request(family: u8, local: SocketAddrV4, remote: SocketAddrV4) -> [u8; 72] {
        let addr = |ip: &Ipv4Addr| -> [u8; 16] {
            if family == AF_INET {
                let mut out = [0u8; 16];
                out[..4].copy_from_slice(&ip.octets());
                out
            } else {
                ip.to_ipv6_mapped().octets()
            }
        };
        let mut r = [0u8; 72];
        r[0..4].copy_from_slice(&REQUEST_LEN.to_ne_bytes());
        r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        r[16] = family;
        r[17] = IPPROTO_TCP;
        // Every state: SYN_SENT while the handshake runs, ESTABLISHED after.
        r[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        r[24..26].copy_from_slice(&local.port().to_be_bytes());
        r[26..28].copy_from_slice(&remote.port().to_be_bytes());
        r[28..44].copy_from_slice(&addr(local.ip()));
        r[44..60].copy_from_slice(&addr(remote.ip()));
        // idiag_if 0; idiag_cookie INET_DIAG_NOCOOKIE (no cookie to check).
        r[64..72].copy_from_slice(&[0xff; 8]);
        r
    }

    /// The inode of the TCP socket `local -> remote`: `Ok(None)` when the kernel has no such
    /// socket (or one no process holds), `Err(())` when it cannot be asked (no sock_diag).
    pub(super) fn inode(local: SocketAddrV4, remote: SocketAddrV4) -> Result<Option<u64>, ()> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .map_err(|_| ())?;
        let kernel = NetlinkAddr::new(0, 0);
        let mut answered = false;
        for family in [AF_INET, AF_INET6] {
            let req = request(family, local, remote);
            if sendto(fd.as_raw_fd(), &req, &kernel, MsgFlags::empty()).is_err() {
                continue;
            }
            let mut buf = [0u8; 512];
            let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                continue;
            };
            match reply(&buf[..n], remote.port()) {
                Reply::Inode(inode) => return Ok(Some(inode).filter(|&i| i != 0)),
                Reply::NoSuchSocket => answered = true,
                Reply::Unusable => {}
            }
        }
        if answered { Ok(None) } else { Err(()) }
    }

    enum Reply {
        Inode(u64),
        NoSuchSocket,
        Unusable,
    }

    fn reply(buf: &[u8], remote_port: u16) -> Reply {
        let u16_at = |at: usize| {
            buf.get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            buf.get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        match u16_at(4) {
            Some(SOCK_DIAG_BY_FAMILY) => {
                // The socket found must be the connection asked for, not a listener.
                let dport = buf
                    .get(MSG_ID + 2..MSG_ID + 4)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]));
                match (dport, u32_at(MSG_INODE)) {
                    (Some(p), Some(inode)) if p == remote_port => Reply::Inode(u64::from(inode)),
                    _ => Reply::NoSuchSocket,
                }
            }
            // -ENOENT: no such socket; anything else (no sock_diag for TCP): cannot tell.
            Some(NLMSG_ERROR)
                if u32_at(16) == Some(libc::ENOENT.wrapping_neg().cast_unsigned()) =>
            {
                Reply::NoSuchSocket
            }
            _ => Reply::Unusable,
        }
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
