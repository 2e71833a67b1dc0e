//! A packet socket that carries whole Ethernet frames of one interface, every protocol, in
//! promiscuous mode, without its own sends: the lab's emulated links (`espip lab-tool relay`)
//! copy frames between two of them.

use super::set_int;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An `AF_PACKET` socket bound to one interface (see the module header).
pub struct LinkSocket(OwnedFd);

impl LinkSocket {
    /// Open and bind it to `iface`, all protocols, not seeing its own sends.
    pub fn open(iface: &str) -> io::Result<LinkSocket> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let index = nix::net::if_::if_nametoindex(iface)
            .map_err(|e| io::Error::other(format!("interface {iface}: {e}")))?;
        // SAFETY: sockaddr_ll is plain old data; zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        set_int(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
        // A large receive buffer: the relay holds frames, the kernel should not drop them first
        // (best effort: FORCE needs CAP_NET_ADMIN).
        let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20);
        // And a large send buffer: frames written wait in the link's `tbf` (50 ms of queue), and
        // each counts against this buffer until it leaves. The default (208 KB, about 90 frames)
        // was the smaller limit: 10 ms at 100 Mbit/s, so link 1 refused frames at a fifth of the
        // queue the lab configures.
        let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 32 << 20);
        // Each frame comes and goes with its virtio-net header: a frame whose checksum the
        // sender left to offload (CHECKSUM_PARTIAL, as the veth's TCP and UDP are) keeps that
        // state on the way out instead of arriving with a wrong checksum.
        set_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        // Frames for other hosts' MAC addresses must reach the socket.
        // SAFETY: packet_mreq is plain old data.
        let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mr.mr_ifindex = index as i32;
        mr.mr_type = libc::PACKET_MR_PROMISC as u16;
        // SAFETY: setsockopt with a packet_mreq of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&mr as *const libc::packet_mreq).cast(),
                std::mem::size_of::<libc::packet_mreq>() as u32,
            );
        }
        Ok(LinkSocket(fd))
    }

    /// One waiting frame into `buf` (with its virtio-net header); `None` when none waits.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: recv writes at most `buf.len()` bytes into our buffer; non-blocking.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n > 0).then_some(n as usize)
    }

    /// Send one frame (with its virtio-net header); false when the interface refused it (its
    /// queue full).
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: send reads `frame.len()` bytes of a slice we hold; non-blocking.
        let rc = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        rc >= 0
    }
}

impl AsFd for LinkSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
