//! The TUN device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`): one inner IP packet per read/write.
//!
//! The device is not persistent: it disappears, with its addresses and routes, when the last
//! file descriptor closes, so a stopped or killed daemon leaves no interface behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)` from `<linux/if_tun.h>`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `IFF_VNET_HDR`: every packet is prefixed by a `struct virtio_net_hdr`.
const IFF_VNET_HDR: libc::c_int = 0x4000;
/// `IFF_MULTI_QUEUE`: each open of the device is one of its queues.
const IFF_MULTI_QUEUE: libc::c_int = 0x0100;
/// `IFF_TUN_EXCL`: fail with `EBUSY` if the device exists (so the first queue is ours).
const IFF_TUN_EXCL: libc::c_int = 0x8000;
/// `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`: the kernel may hand over TCP packets of up to 64 KB
/// with a partial checksum (espip segments them, `espip_core::gso`).
const TUN_OFFLOADS: libc::c_uint = 0x01 | 0x02 | 0x04;
/// `TUN_F_USO4 | TUN_F_USO6` (Linux 6.2+, only together): UDP GSO packets as well.
const TUN_USO: libc::c_uint = 0x20 | 0x40;

/// Why the TUN device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// `/dev/net/tun` missing or not openable.
    #[error("cannot open /dev/net/tun ({0}); load the tun module (`modprobe tun`) and run as root or with CAP_NET_ADMIN")]
    Open(io::Error),
    /// The name is held by another process.
    #[error("interface {0} is already in use by another process (is another espip running with this interface name? stop it or choose another [interface] name)")]
    Busy(String),
    /// A non-TUN interface has the name.
    #[error("an interface named {0} already exists and is not a TUN device; choose another [interface] name or delete it (`ip link del {0}`)")]
    Exists(String),
    /// Not allowed.
    #[error("not permitted to create TUN device {0}: run as root or with CAP_NET_ADMIN")]
    Permission(String),
    /// Anything else.
    #[error("TUNSETIFF {0}: {1}")]
    Other(String, io::Error),
}

/// An open TUN device.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    vnet: bool,
    uso: bool,
}

impl Tun {
    /// Create (or attach to) the TUN device `name`, non-blocking; with `offload`, with
    /// `IFF_VNET_HDR` and TSO/checksum offload (see [`Tun::vnet`]).
    pub fn create(name: &str, offload: bool) -> Result<Tun, TunError> {
        Tun::open_queue(name, offload, 0)
    }

    /// Create the TUN device `name` with `queues` queues (`IFF_MULTI_QUEUE` when more than
    /// one): the kernel spreads the packets it sends into the device over the queues by flow,
    /// and sends a flow to the queue its packets last came back on. The first queue is
    /// created exclusively (`IFF_TUN_EXCL`): an existing device is an error, never joined.
    pub fn create_queues(name: &str, offload: bool, queues: usize) -> Result<Vec<Tun>, TunError> {
        if queues <= 1 {
            return Ok(vec![Tun::create(name, offload)?]);
        }
        let mut all = vec![Tun::open_queue(
            name,
            offload,
            IFF_MULTI_QUEUE | IFF_TUN_EXCL,
        )?];
        for _ in 1..queues {
            all.push(Tun::open_queue(name, offload, IFF_MULTI_QUEUE)?);
        }
        Ok(all)
    }

    fn open_queue(name: &str, offload: bool, extra: libc::c_int) -> Result<Tun, TunError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TunError::Open)?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | extra;
        if offload {
            flags |= IFF_VNET_HDR;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, and the fd is
        // an open /dev/net/tun descriptor.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TunError::Busy(name.into()),
                Some(libc::EINVAL) if interface_exists(name) => TunError::Exists(name.into()),
                Some(libc::EPERM) => TunError::Permission(name.into()),
                _ => TunError::Other(name.into(), e),
            });
        }
        let mut uso = false;
        if offload {
            let size: libc::c_int = espip_core::gso::VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int; TUNSETOFFLOAD takes the flags by value.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) };
            if rc < 0 {
                return Err(TunError::Other(name.into(), io::Error::last_os_error()));
            }
            // SAFETY: as above. USO first; a kernel without it (before 6.2) refuses the flags
            // with EINVAL and gets TSO and checksum offload only.
            let set = |flags: libc::c_uint| unsafe {
                libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, flags as libc::c_ulong)
            };
            uso = set(TUN_OFFLOADS | TUN_USO) >= 0;
            if !uso && set(TUN_OFFLOADS) < 0 {
                return Err(TunError::Other(name.into(), io::Error::last_os_error()));
            }
        }
        Ok(Tun {
            file,
            name: name.to_string(),
            vnet: offload,
            uso,
        })
    }

    /// Whether the kernel took UDP segmentation offload (Linux 6.2+): it may read UDP GSO
    /// packets from us and writes them to us.
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Whether packets carry a `virtio_net_hdr` (read: may be TSO packets; write: must have one).
    pub fn vnet(&self) -> bool {
        self.vnet
    }

    /// Write the packet in `buf`, behind a `virtio_net_hdr` (no GSO, `flags`) put in its
    /// headroom when the device has them.
    pub fn write_packet(&self, buf: &mut espip_core::buf::PacketBuf, flags: u8) -> io::Result<()> {
        if !self.vnet {
            return self.send(buf.as_slice());
        }
        let Some(h) = buf.push_front(espip_core::gso::VNET_HDR_LEN) else {
            return Err(io::Error::other("no headroom for the virtio_net_hdr"));
        };
        espip_core::gso::VnetHdr {
            flags,
            ..Default::default()
        }
        .emit(h);
        let r = self.send(buf.as_slice());
        let _ = buf.pull_front(espip_core::gso::VNET_HDR_LEN);
        r
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one packet; `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Write one packet gathered from `parts` (with `IFF_VNET_HDR`, the first part starts with
    /// the `virtio_net_hdr`).
    pub fn send_vectored(&self, parts: &[io::IoSlice<'_>]) -> io::Result<()> {
        // SAFETY: IoSlice is ABI-compatible with struct iovec; each points at live memory.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                parts.as_ptr().cast(),
                parts.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Write one packet.
    pub fn send(&self, pkt: &[u8]) -> io::Result<()> {
        // SAFETY: pkt is a valid readable region of pkt.len() bytes.
        let n = unsafe { libc::write(self.file.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// True if a network interface called `name` exists in this namespace.
pub fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}
