//! The few raw syscalls the netstack needs: opening a TUN device and configuring it. Every
//! `unsafe` block in this crate is here.
// C ABI constants (address families, interface flags) are small and fit the narrower C types
// the kernel declares for them.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs and a
    // pointer); all-zero is a valid value for every member.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `/dev/net/tun` and attaches it to a new TUN interface `name` (IP packets, no packet
/// information header), non-blocking and close-on-exec.
pub fn open_tun(name: &str) -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq; `req` is a valid, initialised ifreq for the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    Ok(fd)
}

/// An ioctl request number as `ioctl(2)` takes it: `c_ulong` in glibc, `c_int` in musl (the
/// static guest-init of the VM). Every request used here fits in 31 bits.
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
fn request(r: libc::c_ulong) -> libc::Ioctl {
    r as libc::Ioctl
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) on Linux, and every bit
    // pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` the address `addr/prefix`, MTU and transmit queue length (each when
/// given), and brings it up.
pub fn configure(
    name: &str,
    addr: Option<(Ipv4Addr, u8)>,
    mtu: Option<u32>,
    txqueuelen: Option<u32>,
) -> io::Result<()> {
    let sock = inet_socket()?;
    let fd = sock.as_raw_fd();
    if let Some((addr, prefix)) = addr {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        // SAFETY: SIOCSIFADDR reads an ifreq holding a sockaddr_in; `req` is valid.
        check(unsafe { libc::ioctl(fd, request(libc::SIOCSIFADDR), &mut req) })?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix.min(32)))
        };
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
        // SAFETY: SIOCSIFNETMASK reads an ifreq holding a sockaddr_in; `req` is valid.
        check(unsafe { libc::ioctl(fd, request(libc::SIOCSIFNETMASK), &mut req) })?;
    }
    if let Some(mtu) = mtu {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu).map_err(io::Error::other)?;
        // SAFETY: SIOCSIFMTU reads an ifreq holding an int; `req` is valid.
        check(unsafe { libc::ioctl(fd, request(libc::SIOCSIFMTU), &mut req) })?;
    }
    if let Some(qlen) = txqueuelen {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_metric = libc::c_int::try_from(qlen).map_err(io::Error::other)?;
        // SAFETY: SIOCSIFTXQLEN reads an ifreq holding an int (ifr_qlen shares the union
        // with ifru_metric); `req` is valid.
        // Best effort: some kernels refuse it inside a user namespace.
        if let Err(e) = check(unsafe { libc::ioctl(fd, request(libc::SIOCSIFTXQLEN), &mut req) }) {
            tracing::debug!(error = %e, "cannot lengthen the TUN queue");
        }
    }
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes the flags into `req`, a valid ifreq.
    check(unsafe { libc::ioctl(fd, request(libc::SIOCGIFFLAGS), &mut req) })?;
    // SAFETY: the kernel just initialised ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the flags from `req`, a valid ifreq.
    check(unsafe { libc::ioctl(fd, request(libc::SIOCSIFFLAGS), &mut req) })
}

/// Reads one packet into `buf`; `Ok(None)` when none is waiting.
pub fn read_packet(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(n.unsigned_abs()))
}

/// Writes one packet; a full queue drops it (TCP retransmits), as a NIC would.
pub fn write_packet(fd: &OwnedFd, packet: &[u8]) -> io::Result<()> {
    // SAFETY: `packet` is valid for reads of `packet.len()` bytes for the duration of the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects an AF_VSOCK stream to `cid:port` (blocking connect). Guest-only: see
/// [`crate::transport::VsockTransport`].
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<std::os::unix::net::UnixStream> {
    let (fd, addr) = vsock_socket(cid, port)?;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the duration of the call.
    check(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })?;
    Ok(std::os::unix::net::UnixStream::from(fd))
}

/// A new AF_VSOCK stream socket (close-on-exec) and the address `cid`:`port`.
fn vsock_socket(cid: u32, port: u32) -> io::Result<(OwnedFd, libc::sockaddr_vm)> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid before we fill it in.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    Ok((fd, addr))
}

/// A listening AF_VSOCK stream socket on `port` of this guest (any CID). Only ever called
/// inside a VM: on a host, AF_VSOCK leads to the machine's own hypervisor.
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Binds `port` and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        let (fd, addr) = vsock_socket(libc::VMADDR_CID_ANY, port)?;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the duration of the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })?;
        // SAFETY: integer arguments on a socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(Self(fd))
    }

    /// Accepts one connection (close-on-exec). The peer's address is not asked for: on a
    /// vsock listener of the guest, every peer is the host.
    pub fn accept(&self) -> io::Result<std::os::unix::net::UnixStream> {
        // SAFETY: null address and length pointers are allowed by accept4(2).
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by accept4(2) and is owned by nobody else.
        Ok(std::os::unix::net::UnixStream::from(unsafe {
            OwnedFd::from_raw_fd(fd)
        }))
    }
}

/// `struct rtentry` as the kernel defines it (linux/route.h).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds the default route through `gateway` on interface `dev`.
pub fn add_default_route(dev: &str, gateway: Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let dev = CString::new(dev).map_err(io::Error::other)?;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_ptr().cast_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads an rtentry; `rt` is valid and `dev` (which rt_dev points to)
    // outlives the call; the kernel does not write through rt_dev.
    check(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            request(libc::SIOCADDRT),
            std::ptr::addr_of_mut!(rt),
        )
    })
}
