//! `mode` and `endpoint` of a peer or path: the words every peer table shares (peer, paths and
//! IKEv2 settings all take them from here).

use super::{invalid, ConfigError};
use std::net::IpAddr;

/// `mode`: how a peer's packets travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// ESP tunnel mode as IP protocol 50 (RFC 4303).
    Esp,
    /// ESP in UDP datagrams (RFC 3948).
    EspUdp,
    /// IP-in-IP (RFC 2003 / 4213), unprotected.
    IpIp,
}

impl Mode {
    /// The configuration's word for it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Esp => "esp",
            Mode::EspUdp => "esp-udp",
            Mode::IpIp => "ipip",
        }
    }

    pub(super) fn parse(key: String, s: &str) -> Result<Mode, ConfigError> {
        [Mode::Esp, Mode::EspUdp, Mode::IpIp]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                invalid(
                    key,
                    format!("{s:?}"),
                    "\"esp\", \"esp-udp\" (ESP in UDP, RFC 3948) or \"ipip\"",
                )
            })
    }
}

/// `endpoint` (named `key` in errors): an IPv4 or IPv6 unicast address, with a port only for
/// ESP in UDP (`"[2001:db8::2]:4500"` for IPv6).
pub(super) fn endpoint(
    raw: &str,
    mode: Mode,
    key: &str,
) -> Result<(IpAddr, Option<u16>), ConfigError> {
    let shown = format!("{raw:?}");
    let (endpoint, port): (IpAddr, Option<u16>) = match raw.trim().parse::<std::net::SocketAddr>()
    {
        Ok(sa) => (sa.ip(), Some(sa.port())),
        Err(_) => (
            raw.trim().parse().map_err(|_| {
                invalid(
                    key,
                    &shown,
                    "the peer's outer IPv4 or IPv6 address, e.g. \"192.0.2.2\" or \"2001:db8::2\" (with mode = \"esp-udp\" optionally a port: \"192.0.2.2:4500\", \"[2001:db8::2]:4500\")",
                )
            })?,
            None,
        ),
    };
    if port.is_some() && mode != Mode::EspUdp {
        return Err(invalid(
            key,
            &shown,
            "an address without a port: only mode = \"esp-udp\" (ESP in UDP) sends to a port",
        ));
    }
    if port == Some(0) {
        return Err(invalid(
            key,
            &shown,
            "a UDP port from 1 to 65535 (4500 if left out)",
        ));
    }
    let mapped = matches!(endpoint, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    if mapped {
        return Err(invalid(
            key,
            endpoint,
            "the IPv4 address itself, not its IPv4-mapped IPv6 form",
        ));
    }
    if endpoint.is_unspecified() || endpoint.is_multicast() {
        return Err(invalid(key, endpoint, "a unicast address"));
    }
    Ok((endpoint, port))
}
