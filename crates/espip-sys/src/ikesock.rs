//! The IKE socket (UDP port 500) with packet info: a responder answers from the address the
//! request landed on (RFC 7296 section 2.11), which need not be the routed source on a host
//! with several addresses (a server reached at an address on its loopback or a second
//! address of its interface).

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

/// Ask the kernel to tell each datagram's destination address ([`recv_landing`]).
pub fn ask_landing(sock: &impl AsFd, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(sock, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

/// One datagram without waiting: its length, its source, and the local address it landed on
/// (if the kernel said).
pub fn recv_landing(
    sock: &impl AsFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let fd = sock.as_fd();
    let m = recvmsg::<SockaddrStorage>(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let mut here = None;
    for c in m.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(p) => {
                here = Some(IpAddr::from(std::net::Ipv4Addr::from(u32::from_be(
                    p.ipi_addr.s_addr,
                ))));
            }
            ControlMessageOwned::Ipv6PacketInfo(p) => {
                here = Some(IpAddr::from(std::net::Ipv6Addr::from(p.ipi6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    let from = m
        .address
        .as_ref()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::from(std::net::SocketAddrV4::from(*s)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|s| SocketAddr::from(std::net::SocketAddrV6::from(*s)))
                })
        })
        .ok_or_else(|| io::Error::other("a datagram without a source address"))?;
    Ok((m.bytes, from, here))
}

/// Send `msg` to `to` from `src` (`None`: the routed source), without waiting.
pub fn send_from(
    sock: &impl AsFd,
    msg: &[u8],
    to: SocketAddr,
    src: Option<IpAddr>,
) -> io::Result<usize> {
    let iov = [IoSlice::new(msg)];
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock.as_fd());
    let flags = MsgFlags::MSG_DONTWAIT;
    let n = match (to, src) {
        (SocketAddr::V4(t), Some(IpAddr::V4(s))) => {
            let pi = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(s).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv4PacketInfo(&pi)],
                flags,
                Some(&SockaddrIn::from(t)),
            )?
        }
        (SocketAddr::V6(t), Some(IpAddr::V6(s))) => {
            let pi = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: s.octets(),
                },
                ipi6_ifindex: 0,
            };
            sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv6PacketInfo(&pi)],
                flags,
                Some(&SockaddrIn6::from(t)),
            )?
        }
        (SocketAddr::V4(t), _) => sendmsg(fd, &iov, &[], flags, Some(&SockaddrIn::from(t)))?,
        (SocketAddr::V6(t), _) => sendmsg(fd, &iov, &[], flags, Some(&SockaddrIn6::from(t)))?,
    };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over loopback: the landing address is reported, and a reply from it arrives from it.
    #[test]
    fn landing_and_source_round_trip_on_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        ask_landing(&b, false).unwrap();
        let b_port = b.local_addr().unwrap().port();
        a.send_to(b"hello", ("127.0.0.2", b_port)).unwrap();
        let mut buf = [0u8; 64];
        let mut got = None;
        for _ in 0..100 {
            match recv_landing(&b, &mut buf) {
                Ok(x) => {
                    got = Some(x);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        let (n, from, here) = got.expect("a datagram");
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, a.local_addr().unwrap());
        assert_eq!(here, Some("127.0.0.2".parse().unwrap()));
        send_from(&b, b"back", from, here).unwrap();
        let (n, src) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
        assert_eq!(src.ip().to_string(), "127.0.0.2");
    }
}
