//! The kernel edges: the TUN device, raw IP sockets, rtnetlink, files. The only crate of
//! espip with `unsafe` code (the daemon's crate forbids it); each block says why it is sound,
//! and clippy's `undocumented_unsafe_blocks` keeps it so. The pure core (`espip-core`) cannot
//! import this crate: it is below it.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bpf;
pub mod capture;
pub mod fdpass;
pub mod grorx;
pub mod hooks;
pub mod ikesock;
pub mod iptables;
pub mod kstats;
pub mod link;
mod mmsg;
pub mod netlink;
pub mod packet;
pub mod privdrop;
pub mod proc;
pub mod raw;
pub mod safefs;
pub mod seqstore;
pub mod sysctl;
pub mod tun;
pub mod udp;
pub mod xsk;

use espip_core::sa::{Cipher, KeyMaterial};
use std::os::fd::AsRawFd;

/// Socket buffer size the raw and UDP sockets request with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`.
/// Tuning constant: a 4 MiB queue absorbs about 3000 full-size packets, a few milliseconds at
/// 10 Gbit/s.
pub(crate) const SOCKET_BUFFER: usize = 4 << 20;

/// `setsockopt` of one `int`.
/// Path MTU discovery off on a socket of IPv6 (`v6`) or IPv4: an outer packet above the path
/// MTU is fragmented (over IPv6 by this host, the sender) instead of refused. Best effort.
pub(crate) fn fragment_rather_than_refuse(sock: &impl AsRawFd, v6: bool) {
    let _ = if v6 {
        set_int(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )
    } else {
        set_int(
            sock,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )
    };
}

pub(crate) fn set_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads sizeof(int) bytes from a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Fresh random key material (key || salt) from the kernel's CSPRNG (getrandom, via ring).
pub fn random_key(cipher: Cipher) -> std::io::Result<KeyMaterial> {
    use ring::rand::SecureRandom;
    let mut raw = zeroize::Zeroizing::new(vec![0u8; cipher.key_len() + espip_core::sa::SALT_LEN]);
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| std::io::Error::other("the system random number generator failed"))?;
    KeyMaterial::new(cipher, &raw).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Whether `ip` is an address of this host (in this network namespace): a UDP socket can be
/// bound to it. `interface.local` must be one; otherwise every send would fail later with a
/// misleading error.
pub fn is_local_address(ip: std::net::IpAddr) -> bool {
    match std::net::UdpSocket::bind(std::net::SocketAddr::new(ip, 0)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::EADDRNOTAVAIL),
    }
}

/// The error for an `interface.local` that is not an address of this host.
pub fn not_local_message(ip: std::net::IpAddr) -> String {
    format!("interface.local {ip} is not an address of this host (in this network namespace); use an address `ip addr` lists, or leave local out to let routing choose")
}

/// `interface.local` if it is of `dst`'s family (it is the source of those peers only).
pub fn local_for(
    dst: std::net::IpAddr,
    local: Option<std::net::IpAddr>,
) -> Option<std::net::IpAddr> {
    local.filter(|l| l.is_ipv6() == dst.is_ipv6())
}

/// The source address the kernel picks for packets to `dst` (a connected UDP socket's local
/// address; nothing is sent), or `local` when one of `dst`'s family is configured.
pub fn source_for(
    dst: std::net::IpAddr,
    local: Option<std::net::IpAddr>,
) -> std::io::Result<std::net::IpAddr> {
    if let Some(l) = local_for(dst, local) {
        return Ok(l);
    }
    let sock = std::net::UdpSocket::bind(match dst {
        std::net::IpAddr::V4(_) => "0.0.0.0:0",
        std::net::IpAddr::V6(_) => "[::]:0",
    })?;
    sock.connect(std::net::SocketAddr::new(dst, 9))?;
    Ok(sock.local_addr()?.ip())
}

/// Path MTU towards `dst` as the kernel's routing sees it (the route's or the device's MTU),
/// read with a connected UDP socket and `IP_MTU`; nothing is sent.
pub fn path_mtu(dst: std::net::IpAddr, local: Option<std::net::IpAddr>) -> std::io::Result<u32> {
    let sock = std::net::UdpSocket::bind(match (local_for(dst, local), dst) {
        (Some(l), _) => std::net::SocketAddr::new(l, 0),
        (None, std::net::IpAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
        (None, std::net::IpAddr::V6(_)) => "[::]:0".parse().expect("literal"),
    })?;
    sock.connect(std::net::SocketAddr::new(dst, 9))?;
    let (level, name) = match dst {
        std::net::IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        std::net::IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: getsockopt writes at most `len` bytes into the live c_int `mtu`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mtu as u32)
}

/// The index of the interface named `name` (`None`: no such interface in this namespace).
pub fn interface_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok().filter(|&i| i != 0)
}

/// The name of the interface that holds address `ip` (`None`: no interface does).
pub fn interface_holding(ip: std::net::IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let a = ifa.address?;
        let held: std::net::IpAddr = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => v4.ip().into(),
            (_, Some(v6)) => v6.ip().into(),
            _ => return None,
        };
        (held == ip).then_some(ifa.interface_name)
    })
}
