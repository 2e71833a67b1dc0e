//! The UDP socket of ESP in UDP (RFC 3948), with the kernel's UDP segmentation offload both
//! ways.
//!
//! Sending: consecutive datagrams of one size to one destination (the ESP packets made of one
//! TSO read from the TUN, or a run of equal small packets) go as ONE `sendmsg` with a
//! `UDP_SEGMENT` control message (Linux 4.18): the kernel builds one large socket buffer, routes
//! and filters it once, and splits it only where it must (in the NIC, or in software on the way
//! out; a veth passes it whole). Receiving: with `UDP_GRO` (Linux 5.0) the kernel hands over such
//! a train of datagrams as one buffer and tells the segment size in a control message.
//!
//! Raw protocol-50 sockets have no equivalent: each ESP packet there is its own trip through
//! the stack, which is what limits [`crate::raw`] at high rates.

use super::mmsg::{empty_slot, read_sockaddr, write_sockaddr, Cmsg, SockAddrSlot, CMSG_ROOM};
use espip_core::buf::PacketBuf;
use espip_core::datapath::{Landing, Via};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use super::{set_int, SOCKET_BUFFER};

/// Most segments in one UDP GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 before Linux 6.9
/// and 128 after; the smaller one works everywhere).
pub const MAX_SEGMENTS: usize = 64;

/// Most payload bytes in one UDP GSO send: an IPv4 datagram's 65535 minus the IPv4 and UDP
/// headers.
pub const MAX_GSO_BYTES: usize = 65535 - 20 - 8;

/// Most messages per `sendmmsg` / `recvmmsg` call.
const MAX_MSGS: usize = 64;

/// Most datagrams per [`UdpEncapSocket::send_datagrams`] call.
pub const MAX_DATAGRAMS: usize = 256;

/// A run of consecutive datagrams sent as one message: `count` datagrams from `start`, each
/// `segment` bytes long except a shorter last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Run {
    /// Index of the first datagram.
    pub start: usize,
    /// Number of datagrams.
    pub count: usize,
    /// Size of every datagram but the last.
    pub segment: usize,
}

/// Group datagrams `(length, destination)` into runs the kernel's UDP GSO accepts: one
/// destination (and way out), every datagram `segment` bytes except a shorter last one, at
/// most [`MAX_SEGMENTS`] datagrams and [`MAX_GSO_BYTES`] bytes. Returns the number of runs
/// written into `runs` (which must be as long as `items`).
pub fn plan_runs<D: PartialEq + Copy>(items: &[(usize, D)], runs: &mut [Run]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < items.len() {
        let (seg, dst) = items[i];
        let mut total = seg;
        let mut j = i + 1;
        while j < items.len() && j - i < MAX_SEGMENTS && seg > 0 {
            let (len, d) = items[j];
            if d != dst || len > seg || len == 0 || total + len > MAX_GSO_BYTES {
                break;
            }
            total += len;
            j += 1;
            if len < seg {
                // A shorter datagram can only end a run.
                break;
            }
        }
        runs[n] = Run {
            start: i,
            count: j - i,
            segment: seg,
        };
        n += 1;
        i = j;
    }
    n
}

/// What [`UdpEncapSocket::send_datagrams`] did.
#[derive(Debug)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub datagrams: usize,
    /// Of the messages sent, those carrying several datagrams (UDP GSO).
    pub trains: usize,
    /// The last error, if any.
    pub error: Option<io::Error>,
}

/// What [`UdpEncapSocket::recv_batch`] learned about one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The sender.
    pub from: SocketAddr,
    /// Where it landed (destination address and interface).
    pub landing: Landing,
    /// The size of each datagram the kernel coalesced into this message (the last may be
    /// shorter); the whole length when it is one datagram.
    pub segment: usize,
    /// The kernel cut the message to the buffer (it is returned empty).
    pub truncated: bool,
}

/// An ESP-in-UDP socket, over IPv4 or over IPv6 (one of each when peers of both families are
/// configured).
pub struct UdpEncapSocket {
    sock: Socket,
    port: u16,
    gso: bool,
    v6: bool,
}

impl UdpEncapSocket {
    /// Open a non-blocking UDP socket over IPv6 (`v6`, IPv6 only) or IPv4, bound to
    /// `local:port` (any address of the family when `None`), with `UDP_GRO` on and
    /// `UDP_SEGMENT` probed.
    pub fn open(v6: bool, local: Option<IpAddr>, port: u16) -> io::Result<UdpEncapSocket> {
        let sock = Socket::new(
            if v6 { Domain::IPV6 } else { Domain::IPV4 },
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        if v6 {
            // The IPv4 peers have their own socket on the same port.
            sock.set_only_v6(true)?;
        }
        sock.set_nonblocking(true)?;
        sock.set_cloexec(true)?;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // Best effort: without CAP_NET_ADMIN the kernel default stays.
            let _ = set_int(&sock, libc::SOL_SOCKET, opt, SOCKET_BUFFER as libc::c_int);
        }
        // As for raw sockets: a lowered path MTU costs fragmentation, not a black hole.
        super::fragment_rather_than_refuse(&sock, v6);
        // Receive trains of datagrams as one buffer; a kernel without it delivers them singly.
        let _ = set_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 1);
        // Each datagram's destination and interface: which of a multipath peer's paths that
        // share its address it came by.
        super::mmsg::ask_landing(&sock, v6);
        // Probe segmentation offload with a socket-wide setting of 0 (off): the option exists
        // exactly when per-message segment sizes are understood.
        let gso = set_int(&sock, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok();
        let any = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        sock.bind(&SocketAddr::new(local.unwrap_or(any), port).into())?;
        Ok(UdpEncapSocket {
            sock,
            port,
            gso,
            v6,
        })
    }

    /// Whether this socket is the IPv6 one.
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    /// The local UDP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether sends use UDP segmentation offload.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Receive up to `bufs.len()` messages in one `recvmmsg` call, each into a buffer from its
    /// headroom, with its sender and segment size in `meta`. Returns how many were filled
    /// (`WouldBlock` if none). A message the kernel truncated is returned empty and marked.
    pub fn recv_batch(&self, bufs: &mut [PacketBuf], meta: &mut [Received]) -> io::Result<usize> {
        let mut iovs: [MaybeUninit<libc::iovec>; MAX_MSGS] =
            [const { MaybeUninit::uninit() }; MAX_MSGS];
        let mut names = [empty_slot(); MAX_MSGS];
        // SAFETY: mmsghdr is plain old data; zero is valid.
        let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { std::mem::zeroed() };
        let mut ctrl = [Cmsg::EMPTY; MAX_MSGS];
        let m = meta.len().min(MAX_MSGS);
        let n = super::mmsg::point_at_read_areas(bufs, &mut iovs[..m], &mut hdrs);
        for i in 0..n {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut SockAddrSlot).cast();
            h.msg_namelen = std::mem::size_of::<SockAddrSlot>() as u32;
            h.msg_control = ctrl[i].0.as_mut_ptr().cast();
            h.msg_controllen = CMSG_ROOM as _;
        }
        // SAFETY: hdrs[..n] point at initialised iovecs over live, exclusively borrowed buffer
        // areas, at socket address slots and at control buffers of the lengths given.
        let got = unsafe { super::mmsg::recvmmsg(self.sock.as_raw_fd(), &mut hdrs[..n])? };
        for i in 0..got {
            let h = &hdrs[i].msg_hdr;
            let truncated = h.msg_flags & libc::MSG_TRUNC != 0;
            let len = if truncated {
                0
            } else {
                hdrs[i].msg_len as usize
            };
            bufs[i].set_len(len);
            let from = read_sockaddr(&names[i])
                .unwrap_or_else(|| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
            meta[i] = Received {
                from,
                landing: super::mmsg::landing(h),
                segment: gro_segment(h).filter(|&s| s > 0).unwrap_or(len),
                truncated,
            };
        }
        Ok(got)
    }

    /// Send datagrams `(payload, destination)` in order: runs of one size to one destination
    /// as one GSO message each, all messages with as few `sendmmsg` calls as the kernel allows.
    /// At most [`MAX_DATAGRAMS`] per call.
    pub fn send_datagrams(
        &self,
        items: &[(&[u8], SocketAddr, Via)],
        mut refused: impl FnMut(SocketAddr, Via, usize, &io::Error),
    ) -> Sent {
        let items = &items[..items.len().min(MAX_DATAGRAMS)];
        let none = (
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            Via::ROUTED,
        );
        let mut shape = [(0usize, none); MAX_DATAGRAMS];
        for (s, (p, d, via)) in shape.iter_mut().zip(items) {
            *s = (p.len(), (*d, *via));
        }
        let mut runs = [Run::default(); MAX_DATAGRAMS];
        let nruns = if self.gso {
            plan_runs(&shape[..items.len()], &mut runs)
        } else {
            for (i, r) in runs.iter_mut().enumerate().take(items.len()) {
                *r = Run {
                    start: i,
                    count: 1,
                    segment: items[i].0.len(),
                };
            }
            items.len()
        };
        let mut sent = 0;
        let mut trains = 0;
        let mut last_err = None;
        let mut k = 0;
        while k < nruns {
            let end = (k + MAX_MSGS).min(nruns);
            match self.send_runs(items, &runs[k..end]) {
                Ok(m) if m > 0 => {
                    for r in &runs[k..k + m] {
                        sent += r.count;
                        trains += usize::from(r.count > 1);
                    }
                    k += m;
                }
                Ok(_) => {
                    let r = runs[k];
                    refused(
                        items[r.start].1,
                        items[r.start].2,
                        r.count,
                        &io::Error::from(io::ErrorKind::WouldBlock),
                    );
                    k += 1;
                }
                Err(err) => {
                    // A run has one destination: what it refused is that destination's.
                    let r = runs[k];
                    let (took, err) = if r.count > 1
                        && matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EIO))
                    {
                        // The kernel refused to segment (a segment above the route's MTU, a
                        // device without checksum offload): send this run's datagrams singly.
                        let single: [Run; MAX_SEGMENTS] = std::array::from_fn(|j| Run {
                            start: r.start + j,
                            count: 1,
                            segment: items.get(r.start + j).map_or(0, |x| x.0.len()),
                        });
                        match self.send_runs(items, &single[..r.count]) {
                            Ok(m) => (m, err),
                            Err(e) => (0, e),
                        }
                    } else {
                        (0, err)
                    };
                    sent += took;
                    if took < r.count {
                        refused(items[r.start].1, items[r.start].2, r.count - took, &err);
                        last_err = Some(err);
                    }
                    k += 1;
                }
            }
        }
        Sent {
            datagrams: sent,
            trains,
            error: last_err,
        }
    }

    /// One `sendmmsg` of `runs` (at most [`MAX_MSGS`]); returns how many messages went.
    fn send_runs(&self, items: &[(&[u8], SocketAddr, Via)], runs: &[Run]) -> io::Result<usize> {
        let mut iovs: [MaybeUninit<libc::iovec>; MAX_DATAGRAMS] =
            [const { MaybeUninit::uninit() }; MAX_DATAGRAMS];
        let mut names = [empty_slot(); MAX_MSGS];
        // SAFETY: mmsghdr is plain old data; zero is valid.
        let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { std::mem::zeroed() };
        let mut ctrl = [Cmsg::EMPTY; MAX_MSGS];
        let mut iov_at = 0;
        for (m, r) in runs.iter().enumerate() {
            for (slot, (p, _, _)) in iovs[iov_at..]
                .iter_mut()
                .zip(&items[r.start..r.start + r.count])
            {
                slot.write(libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                });
            }
            let namelen = write_sockaddr(&mut names[m], items[r.start].1);
            let h = &mut hdrs[m].msg_hdr;
            h.msg_iov = iovs[iov_at..].as_mut_ptr().cast();
            h.msg_iovlen = r.count as _;
            h.msg_name = (&mut names[m] as *mut SockAddrSlot).cast();
            h.msg_namelen = namelen;
            let mut used = 0;
            if r.count > 1 {
                let seg = (r.segment as u16).to_ne_bytes();
                ctrl[m].push(&mut used, libc::SOL_UDP, libc::UDP_SEGMENT, &seg);
            }
            ctrl[m].push_via(&mut used, items[r.start].2, self.v6);
            if used > 0 {
                h.msg_control = ctrl[m].0.as_mut_ptr().cast();
                h.msg_controllen = used as _;
            }
            iov_at += r.count;
        }
        // SAFETY: hdrs[..runs.len()] point at initialised iovecs over live payload slices (only
        // read by the kernel), at initialised socket addresses and control messages.
        let rc = unsafe {
            libc::sendmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                runs.len() as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

/// The `UDP_GRO` segment size in a received message's control data.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
    // inside it and the data of a UDP_GRO message is one int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

impl AsRawFd for UdpEncapSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for UdpEncapSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(192, 0, 2, 2).into(), port)
    }

    fn plan(items: &[(usize, SocketAddr)]) -> Vec<(usize, usize, usize)> {
        let mut runs = vec![Run::default(); items.len()];
        let n = plan_runs(items, &mut runs);
        runs[..n]
            .iter()
            .map(|r| (r.start, r.count, r.segment))
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_peer_form_one_run_ended_by_a_shorter_one() {
        let mut items = vec![(1436, to(4500)); 10];
        items.push((700, to(4500)));
        items.push((1436, to(4500)));
        assert_eq!(plan(&items), vec![(0, 11, 1436), (11, 1, 1436)]);
    }

    #[test]
    fn a_larger_datagram_or_another_destination_starts_a_new_run() {
        let items = [
            (100, to(4500)),
            (100, to(4500)),
            (200, to(4500)),
            (200, to(4501)),
            (200, to(4501)),
        ];
        assert_eq!(plan(&items), vec![(0, 2, 100), (2, 1, 200), (3, 2, 200)]);
    }

    #[test]
    fn runs_respect_the_kernel_limits() {
        let items = vec![(64, to(4500)); MAX_SEGMENTS * 2 + 1];
        assert_eq!(plan(&items), vec![(0, 64, 64), (64, 64, 64), (128, 1, 64)]);
        // 46 x 1436 = 66056 > 65507: 45 fit.
        let items = vec![(1436, to(4500)); 46];
        assert_eq!(plan(&items), vec![(0, 45, 1436), (45, 1, 1436)]);
        assert_eq!(plan(&[]), vec![]);
    }

    #[test]
    fn another_way_out_starts_a_new_run() {
        let via = Via {
            src: Some(Ipv4Addr::new(192, 0, 2, 9).into()),
            ifindex: 3,
        };
        let items = [
            (100, (to(4500), Via::ROUTED)),
            (100, (to(4500), via)),
            (100, (to(4500), via)),
        ];
        let mut runs = vec![Run::default(); items.len()];
        let n = plan_runs(&items, &mut runs);
        let got: Vec<_> = runs[..n].iter().map(|r| (r.start, r.count)).collect();
        assert_eq!(got, vec![(0, 1), (1, 2)]);
    }

    /// A datagram sent with a `Via` leaves from its source address (127.0.0.2 instead of the
    /// routed 127.0.0.1) and out of its interface; the receiver learns where it landed.
    #[test]
    fn a_via_sets_the_source_and_the_receiver_sees_the_landing() {
        let lo = Ipv4Addr::LOCALHOST;
        let rx = UdpEncapSocket::open(false, Some(lo.into()), 0).unwrap();
        let port = rx.sock.local_addr().unwrap().as_socket().unwrap().port();
        let tx = UdpEncapSocket::open(false, None, 0).unwrap();
        let dst = SocketAddr::new(lo.into(), port);
        let via = Via {
            src: Some(Ipv4Addr::new(127, 0, 0, 2).into()),
            ifindex: 1,
        };
        let pkts = [b"ab".as_slice(), b"cd".as_slice(), b"ef".as_slice()];
        let items: Vec<_> = pkts.iter().map(|p| (*p, dst, via)).collect();
        let sent = tx.send_datagrams(&items, |d, _, _, e| panic!("{d}: {e}"));
        assert_eq!(sent.datagrams, 3);
        let sent = tx.send_datagrams(&[(b"gh", dst, Via::ROUTED)], |d, _, _, e| {
            panic!("{d}: {e}")
        });
        assert_eq!(sent.datagrams, 1);
        let mut bufs: Vec<PacketBuf> = (0..8)
            .map(|_| PacketBuf::new(espip_core::buf::MAX_PACKET))
            .collect();
        let blank = Received {
            from: dst,
            landing: Landing::UNKNOWN,
            segment: 0,
            truncated: false,
        };
        let mut meta = [blank; 8];
        let mut got = Vec::new();
        for _ in 0..100 {
            if let Ok(n) = rx.recv_batch(&mut bufs, &mut meta) {
                for m in &meta[..n] {
                    got.push((m.from.ip(), m.landing));
                }
            }
            if got.len() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let landed = Landing {
            dst: Some(lo.into()),
            ifindex: 1,
        };
        // The three equal datagrams may arrive as one GRO train.
        assert_eq!(got.first(), Some(&(IpAddr::from([127, 0, 0, 2]), landed)));
        assert_eq!(got.last(), Some(&(IpAddr::from([127, 0, 0, 1]), landed)));
    }
}
