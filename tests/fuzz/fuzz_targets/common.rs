//! Shared fixtures of the fuzz targets: one ESP peer and one IP-in-IP peer with fixed keys.

#![allow(dead_code)]

use espip::datapath::{self, EncapSpec, Inbound, Outbound, PeerSpec, TunnelSpec};
use espip::multipath::{MultipathSpec, PathSpec, PeerPaths};
use espip::nat::NatTable;
use espip::sa::{Cipher, KeyMaterial};
use std::net::IpAddr;

pub const ESP_PEER: &str = "192.0.2.2";
pub const IPIP_PEER: &str = "192.0.2.3";
/// A peer whose ESP travels in UDP (RFC 3948).
pub const UDP_PEER: &str = "192.0.2.4";
/// The UDP peer's second path.
pub const UDP_PEER_PATH2: &str = "192.0.2.14";
pub const SPI_IN_UDP: u32 = 0x2002;
pub const SPI_OUT: u32 = 0x1001;
pub const SPI_IN: u32 = 0x1002;
pub const KEY_OUT: [u8; 20] = [0x11; 20];
pub const KEY_IN: [u8; 20] = [0x22; 20];

pub fn key(bytes: &[u8]) -> KeyMaterial {
    KeyMaterial::new(Cipher::Aes128Gcm, bytes).expect("20 bytes")
}

pub fn peers(esn: bool) -> Vec<PeerSpec> {
    vec![
        PeerSpec {
            name: "esp".into(),
            endpoint: Some(ESP_PEER.parse().unwrap()),
            allowed_ips: vec!["10.4.2.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
            encap: EncapSpec::Esp {
                cipher: Cipher::Aes128Gcm,
                spi_out: SPI_OUT,
                key_out: key(&KEY_OUT),
                spi_in: SPI_IN,
                key_in: key(&KEY_IN),
                replay_window: 64,
                esn,
                lifetime: Default::default(),
                udp_port: None,
            },
            route: true,
            multipath: None,
            negotiated: None,
        },
        PeerSpec {
            name: "esp-udp".into(),
            endpoint: Some(UDP_PEER.parse().unwrap()),
            allowed_ips: vec!["10.6.0.0/16".parse().unwrap()],
            encap: EncapSpec::Esp {
                cipher: Cipher::Aes128Gcm,
                spi_out: 0x2001,
                key_out: key(&KEY_OUT),
                spi_in: SPI_IN_UDP,
                key_in: key(&KEY_IN),
                replay_window: 64,
                esn,
                lifetime: Default::default(),
                udp_port: Some(4500),
            },
            route: true,
            // Two paths (the second never sends here): probes, echoes and the reorder stage
            // are reached through this peer.
            multipath: Some(PeerPaths {
                spec: MultipathSpec::default(),
                paths: [UDP_PEER, UDP_PEER_PATH2]
                    .iter()
                    .enumerate()
                    .map(|(i, a)| PathSpec::routed(&format!("p{i}"), a.parse().unwrap(), 4500))
                    .collect(),
            }),
            negotiated: None,
        },
        PeerSpec {
            name: "ipip".into(),
            endpoint: Some(IPIP_PEER.parse().unwrap()),
            allowed_ips: vec!["10.5.0.0/16".parse().unwrap()],
            encap: EncapSpec::IpIp,
            route: true,
            multipath: None,
            negotiated: None,
        },
    ]
}

pub fn build(esn: bool) -> (Outbound, Inbound) {
    let tunnel = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    let (out, inb, _) = datapath::build(&peers(esn), tunnel, NatTable::default()).unwrap();
    out.set_limit(0, u64::MAX);
    (out, inb)
}

/// The inner source of a delivered packet.
pub fn inner_src(p: &[u8]) -> Option<IpAddr> {
    espip::wire::ip::InnerPacket::parse(p).ok().map(|i| i.src)
}

/// Split fuzz input into records: [tag u8][len u16 LE][len bytes], the rest ignored.
pub fn records(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut v = Vec::new();
    while data.len() >= 3 && v.len() < 64 {
        let tag = data[0];
        let len = u16::from_le_bytes([data[1], data[2]]) as usize;
        let end = (3 + len).min(data.len());
        v.push((tag, &data[3..end]));
        data = &data[end..];
    }
    v
}
