//! Receiving IP-in-IP packets that the kernel's GRO merged (see [`super::bpf`] for why): an
//! `AF_PACKET` socket for IPv4 or IPv6 on every interface, with `PACKET_VNET_HDR` so that
//! each packet comes with its `virtio_net_hdr` (`gso_size`, `gso_type`), and a filter that
//! takes only merged IP-in-IP packets. The raw IP-in-IP sockets drop those
//! ([`super::bpf::merged_ipip`]), so each packet reaches espip once.
//!
//! An `AF_PACKET` socket sees a packet before IP input decides it is for this host, so the
//! RX thread checks the outer destination itself ([`LocalCheck`]). It also sees it before
//! netfilter's INPUT hook: a firewall rule that drops IP-in-IP on INPUT no longer stops the
//! merged ones (docs/architecture.md).

use espip_core::buf::PacketBuf;
use espip_core::gso::{VnetHdr, VNET_HDR_LEN};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `sll_hatype` values (linux/if_arp.h) and their link header lengths.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_NONE: u16 = 0xfffe;
/// `sll_pkttype`: for this host.
const PACKET_HOST: u8 = 0;

/// The `AF_PACKET` socket for merged IP-in-IP packets over IPv4 or over IPv6.
pub struct GroSocket {
    fd: OwnedFd,
    v6: bool,
}

/// A merged packet's `virtio_net_hdr`: its GSO type and segment size.
#[derive(Debug, Clone, Copy)]
pub struct Merged {
    pub vnet: VnetHdr,
}

impl GroSocket {
    /// Open the socket (needs `CAP_NET_RAW`), filter attached before it is bound, so that no
    /// unfiltered packet is ever queued.
    pub fn open(v6: bool) -> io::Result<GroSocket> {
        let fd = super::packet::af_packet(libc::SO_RCVBUFFORCE)?;
        super::set_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        super::bpf::merged_ipip(&fd, v6, true)?;
        // Every interface.
        super::packet::bind(&fd, 0, if v6 { ETH_P_IPV6 } else { ETH_P_IP })?;
        Ok(GroSocket { fd, v6 })
    }

    /// Whether this socket takes IPv6 outer packets.
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    /// Receive one packet into `buf`: afterwards `buf` holds the outer IP packet (the
    /// `virtio_net_hdr` and the link header removed). `Ok(None)`: a packet this path does not
    /// take (not for this host, an unknown link type, no room), already consumed.
    /// `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut PacketBuf) -> io::Result<Option<Merged>> {
        buf.reset_to_front();
        let area = buf.read_area();
        // SAFETY: sockaddr_ll is plain old data; zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sll_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom writes at most area.len() bytes into `area` and at most sll_len
        // bytes into `sll`.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                area.as_mut_ptr().cast(),
                area.len(),
                libc::MSG_TRUNC,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut sll_len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > area.len() || sll.sll_pkttype != PACKET_HOST {
            return Ok(None);
        }
        let link = match sll.sll_hatype {
            ARPHRD_ETHER | ARPHRD_LOOPBACK => 14,
            ARPHRD_NONE | ARPHRD_RAWIP => 0,
            _ => return Ok(None),
        };
        buf.set_len(n);
        let Some(vnet) = VnetHdr::parse(buf.as_slice()) else {
            return Ok(None);
        };
        if buf.pull_front(VNET_HDR_LEN + link).is_none() {
            return Ok(None);
        }
        Ok(Some(Merged { vnet }))
    }
}

impl AsFd for GroSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether an outer destination is an address of this host, cached for a second (an
/// `AF_PACKET` socket also sees packets this host would forward).
#[derive(Default)]
pub struct LocalCheck {
    cache: Vec<(IpAddr, bool, u64)>,
}

/// How long an answer is kept, in nanoseconds.
const LOCAL_TTL_NS: u64 = 1_000_000_000;

impl LocalCheck {
    /// Is `dst` one of this host's addresses (at `now`, nanoseconds)? A bind to it succeeds
    /// only then.
    pub fn is_local(&mut self, dst: IpAddr, now: u64) -> bool {
        if let Some(&(_, local, _)) = self
            .cache
            .iter()
            .find(|(a, _, at)| *a == dst && now.saturating_sub(*at) < LOCAL_TTL_NS)
        {
            return local;
        }
        let local = std::net::UdpSocket::bind(std::net::SocketAddr::new(dst, 0)).is_ok();
        self.cache
            .retain(|(a, _, at)| *a != dst && now.saturating_sub(*at) < LOCAL_TTL_NS);
        if self.cache.len() < 64 {
            self.cache.push((dst, local, now));
        }
        local
    }
}
