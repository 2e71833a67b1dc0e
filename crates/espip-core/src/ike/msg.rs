//! IKEv2 messages (RFC 7296 section 3): the header, the payloads espip reads and writes, and
//! the Encrypted payload (SK, section 3.14) with an AEAD (RFC 5282: AES-GCM; RFC 7634:
//! ChaCha20-Poly1305).
//!
//! IKE is the control plane: a message is a few hundred bytes, a handful per minute, so the
//! payloads are parsed into owned values rather than viewed in place. Every length is checked
//! against what is left of the message; a payload of a type espip does not know is kept as
//! [`Payload::Other`] (its critical bit decides whether the message is refused).

use crate::sa::{Aead, KeyMaterial};
use std::net::IpAddr;

/// IKE header length.
pub const HDR_LEN: usize = 28;
/// Generic payload header length.
pub const GEN_LEN: usize = 4;
/// Largest message espip accepts or builds (RFC 7296 section 2: at least 1280 must work; no
/// IKE fragmentation here, so a message must fit one datagram).
pub const MAX_MSG: usize = 8192;
/// Explicit IV of the SK payload with AES-GCM and ChaCha20-Poly1305 (RFC 5282, RFC 7634).
pub const SK_IV_LEN: usize = 8;
/// ICV of the SK payload.
pub const SK_ICV_LEN: usize = 16;

/// Exchange types (section 3.1).
pub mod exchange {
    /// IKE_SA_INIT.
    pub const IKE_SA_INIT: u8 = 34;
    /// IKE_AUTH.
    pub const IKE_AUTH: u8 = 35;
    /// CREATE_CHILD_SA.
    pub const CREATE_CHILD_SA: u8 = 36;
    /// INFORMATIONAL.
    pub const INFORMATIONAL: u8 = 37;
}

/// Header flags (section 3.1).
pub mod flags {
    /// Sent by the original initiator of the IKE SA.
    pub const INITIATOR: u8 = 0x08;
    /// A response.
    pub const RESPONSE: u8 = 0x20;
}

/// Payload types (section 3.2).
pub mod kind {
    /// No next payload.
    pub const NONE: u8 = 0;
    /// Security Association.
    pub const SA: u8 = 33;
    /// Key Exchange.
    pub const KE: u8 = 34;
    /// Identification - Initiator.
    pub const IDI: u8 = 35;
    /// Identification - Responder.
    pub const IDR: u8 = 36;
    /// Authentication.
    pub const AUTH: u8 = 39;
    /// Nonce.
    pub const NONCE: u8 = 40;
    /// Notify.
    pub const NOTIFY: u8 = 41;
    /// Delete.
    pub const DELETE: u8 = 42;
    /// Vendor ID.
    pub const VENDOR: u8 = 43;
    /// Traffic Selector - Initiator.
    pub const TSI: u8 = 44;
    /// Traffic Selector - Responder.
    pub const TSR: u8 = 45;
    /// Encrypted and Authenticated.
    pub const SK: u8 = 46;
}

/// Notify message types (section 3.10.1) espip sends or acts on.
pub mod notify {
    /// Error: a critical payload of an unknown type.
    pub const UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
    /// Error: a message for an IKE SA this side does not have.
    pub const INVALID_IKE_SPI: u16 = 4;
    /// Error: the major version is not 2.
    pub const INVALID_MAJOR_VERSION: u16 = 5;
    /// Error: a malformed message.
    pub const INVALID_SYNTAX: u16 = 7;
    /// Error: no acceptable proposal.
    pub const NO_PROPOSAL_CHOSEN: u16 = 14;
    /// Error: the KE payload's group is not the one wanted (data: the wanted group).
    pub const INVALID_KE_PAYLOAD: u16 = 17;
    /// Error: the AUTH payload did not verify, or the identity is not allowed.
    pub const AUTHENTICATION_FAILED: u16 = 24;
    /// Error: the responder takes no more CHILD_SAs on this IKE SA.
    pub const NO_ADDITIONAL_SAS: u16 = 35;
    /// Error: the traffic selectors are not acceptable.
    pub const TS_UNACCEPTABLE: u16 = 38;
    /// Error: try again later (a rekey collision).
    pub const TEMPORARY_FAILURE: u16 = 43;
    /// Error: the CHILD_SA to rekey does not exist.
    pub const CHILD_SA_NOT_FOUND: u16 = 44;
    /// Status: the first IKE SA between these identities.
    pub const INITIAL_CONTACT: u16 = 16384;
    /// Status: hash of the sender's address and port.
    pub const NAT_DETECTION_SOURCE_IP: u16 = 16388;
    /// Status: hash of the receiver's address and port.
    pub const NAT_DETECTION_DESTINATION_IP: u16 = 16389;
    /// Status: a stateless cookie (section 2.6).
    pub const COOKIE: u16 = 16390;
    /// Status: transport mode requested (refused: espip is tunnel mode only).
    pub const USE_TRANSPORT_MODE: u16 = 16391;
    /// Status: the CHILD_SA being rekeyed.
    pub const REKEY_SA: u16 = 16393;
    /// Status: no TFC padding.
    pub const ESP_TFC_PADDING_NOT_SUPPORTED: u16 = 16394;
    /// Status: the sender supports MOBIKE (RFC 4555 section 3.1).
    pub const MOBIKE_SUPPORTED: u16 = 16396;
    /// Status: the sender has no other addresses (RFC 4555 section 3.6).
    pub const NO_ADDITIONAL_ADDRESSES: u16 = 16399;
    /// Status: move the IKE SA and its CHILD_SAs to this message's addresses (RFC 4555
    /// section 3.5).
    pub const UPDATE_SA_ADDRESSES: u16 = 16400;
    /// Status: a value the responder copies into its answer (RFC 4555 section 3.5, return
    /// routability).
    pub const COOKIE2: u16 = 16401;

    /// The RFC name of a notify type, for logs.
    pub fn name(t: u16) -> String {
        match t {
            UNSUPPORTED_CRITICAL_PAYLOAD => "UNSUPPORTED_CRITICAL_PAYLOAD".into(),
            INVALID_IKE_SPI => "INVALID_IKE_SPI".into(),
            INVALID_MAJOR_VERSION => "INVALID_MAJOR_VERSION".into(),
            INVALID_SYNTAX => "INVALID_SYNTAX".into(),
            9 => "INVALID_MESSAGE_ID".into(),
            11 => "INVALID_SPI".into(),
            NO_PROPOSAL_CHOSEN => "NO_PROPOSAL_CHOSEN".into(),
            INVALID_KE_PAYLOAD => "INVALID_KE_PAYLOAD".into(),
            AUTHENTICATION_FAILED => "AUTHENTICATION_FAILED".into(),
            34 => "SINGLE_PAIR_REQUIRED".into(),
            NO_ADDITIONAL_SAS => "NO_ADDITIONAL_SAS".into(),
            36 => "INTERNAL_ADDRESS_FAILURE".into(),
            37 => "FAILED_CP_REQUIRED".into(),
            TS_UNACCEPTABLE => "TS_UNACCEPTABLE".into(),
            39 => "INVALID_SELECTORS".into(),
            TEMPORARY_FAILURE => "TEMPORARY_FAILURE".into(),
            CHILD_SA_NOT_FOUND => "CHILD_SA_NOT_FOUND".into(),
            COOKIE => "COOKIE".into(),
            t => format!("notify type {t}"),
        }
    }
}

/// Security protocol identifiers (section 3.3.1).
pub mod proto {
    /// IKE.
    pub const IKE: u8 = 1;
    /// ESP.
    pub const ESP: u8 = 3;
}

/// The fixed IKE header (section 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// IKE SA Initiator's SPI.
    pub spi_i: u64,
    /// IKE SA Responder's SPI (0 in the first message).
    pub spi_r: u64,
    /// Type of the first payload.
    pub next: u8,
    /// Exchange type.
    pub exchange: u8,
    /// Flags ([`flags`]).
    pub flags: u8,
    /// Message ID.
    pub msg_id: u32,
    /// Length of the whole message.
    pub length: u32,
}

impl Header {
    /// A response?
    pub fn is_response(&self) -> bool {
        self.flags & flags::RESPONSE != 0
    }

    /// Sent by the original initiator?
    pub fn from_initiator(&self) -> bool {
        self.flags & flags::INITIATOR != 0
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next);
        out.push(0x20);
        out.push(self.exchange);
        out.push(self.flags);
        out.extend_from_slice(&self.msg_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// Why a message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// Shorter than its header or its lengths say, or a length field that does not fit.
    #[error("truncated or inconsistent lengths")]
    Truncated,
    /// Major version other than 2 (section 2.5).
    #[error("IKE major version is not 2")]
    Version,
    /// A payload's content does not parse.
    #[error("malformed payload (type {0})")]
    Payload(u8),
    /// A critical payload of an unknown type (section 2.5).
    #[error("unsupported critical payload (type {0})")]
    Critical(u8),
    /// The SK payload did not verify (bad ICV: wrong keys or a forgery).
    #[error("the Encrypted payload did not verify")]
    BadIcv,
    /// An SK payload was expected and is missing, or is not the last payload.
    #[error("missing or misplaced Encrypted payload")]
    NoSk,
    /// Larger than [`MAX_MSG`].
    #[error("message too large")]
    TooLarge,
}

/// Parse the header of `msg` and check its length field against the datagram.
pub fn parse_header(msg: &[u8]) -> Result<Header, MsgError> {
    if msg.len() < HDR_LEN {
        return Err(MsgError::Truncated);
    }
    if msg[17] >> 4 != 2 {
        return Err(MsgError::Version);
    }
    let h = Header {
        spi_i: u64::from_be_bytes(msg[0..8].try_into().expect("8")),
        spi_r: u64::from_be_bytes(msg[8..16].try_into().expect("8")),
        next: msg[16],
        exchange: msg[18],
        flags: msg[19],
        msg_id: u32::from_be_bytes(msg[20..24].try_into().expect("4")),
        length: u32::from_be_bytes(msg[24..28].try_into().expect("4")),
    };
    if h.length as usize != msg.len() {
        return Err(MsgError::Truncated);
    }
    Ok(h)
}

/// One transform of a proposal (section 3.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transform {
    /// Transform type (1 ENCR, 2 PRF, 3 INTEG, 4 DH, 5 ESN).
    pub kind: u8,
    /// Transform ID.
    pub id: u16,
    /// Key Length attribute (bits), if present.
    pub key_len: Option<u16>,
}

/// One proposal of an SA payload (section 3.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// Proposal number (1-based).
    pub num: u8,
    /// Protocol ([`proto`]).
    pub protocol: u8,
    /// SPI (empty in IKE_SA_INIT, 8 bytes for an IKE rekey, 4 for ESP).
    pub spi: Vec<u8>,
    /// Transforms.
    pub transforms: Vec<Transform>,
}

/// An identity (section 3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    /// ID type (1 IPv4, 2 FQDN, 3 RFC822, 5 IPv6, 11 KEY_ID).
    pub kind: u8,
    /// The identification data.
    pub data: Vec<u8>,
}

/// ID types.
pub mod id {
    /// ID_IPV4_ADDR.
    pub const IPV4: u8 = 1;
    /// ID_FQDN.
    pub const FQDN: u8 = 2;
    /// ID_RFC822_ADDR.
    pub const RFC822: u8 = 3;
    /// ID_IPV6_ADDR.
    pub const IPV6: u8 = 5;
}

impl Id {
    /// The identity in strongSwan's notation (an address, or the name).
    pub fn display(&self) -> String {
        match (self.kind, self.data.len()) {
            (id::IPV4, 4) => {
                IpAddr::from(<[u8; 4]>::try_from(&self.data[..]).expect("4")).to_string()
            }
            (id::IPV6, 16) => {
                IpAddr::from(<[u8; 16]>::try_from(&self.data[..]).expect("16")).to_string()
            }
            (id::FQDN | id::RFC822, _) => String::from_utf8_lossy(&self.data).into_owned(),
            (k, _) => format!("id type {k} ({} bytes)", self.data.len()),
        }
    }

    /// Parse an identity as written in a configuration: an address is ID_IPV4/6_ADDR, a name
    /// with `@` in it ID_RFC822_ADDR, anything else ID_FQDN (as strongSwan does).
    pub fn from_config(s: &str) -> Id {
        match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Id {
                kind: id::IPV4,
                data: a.octets().to_vec(),
            },
            Ok(IpAddr::V6(a)) => Id {
                kind: id::IPV6,
                data: a.octets().to_vec(),
            },
            Err(_) if s.contains('@') => Id {
                kind: id::RFC822,
                data: s.as_bytes().to_vec(),
            },
            Err(_) => Id {
                kind: id::FQDN,
                data: s.as_bytes().to_vec(),
            },
        }
    }

    /// ID Type, RESERVED and data: what AUTH covers (section 2.15, RestOfInitIDPayload).
    pub fn body(&self) -> Vec<u8> {
        let mut v = vec![self.kind, 0, 0, 0];
        v.extend_from_slice(&self.data);
        v
    }
}

/// A traffic selector (section 3.13.1), an address range and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ts {
    /// IP protocol (0: any).
    pub ip_proto: u8,
    /// First port.
    pub start_port: u16,
    /// Last port.
    pub end_port: u16,
    /// First address.
    pub start: IpAddr,
    /// Last address (same family as `start`).
    pub end: IpAddr,
}

/// A payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Security Association.
    Sa(Vec<Proposal>),
    /// Key Exchange: DH group and public value.
    Ke {
        /// Diffie-Hellman group number.
        group: u16,
        /// Public value.
        data: Vec<u8>,
    },
    /// Identification - Initiator.
    IdI(Id),
    /// Identification - Responder.
    IdR(Id),
    /// Authentication: method and data.
    Auth {
        /// Auth method (2: shared key MIC).
        method: u8,
        /// Data.
        data: Vec<u8>,
    },
    /// Nonce.
    Nonce(Vec<u8>),
    /// Notify.
    Notify {
        /// Protocol of the SPI (0 when none).
        protocol: u8,
        /// SPI (may be empty).
        spi: Vec<u8>,
        /// Notify message type.
        kind: u16,
        /// Notification data.
        data: Vec<u8>,
    },
    /// Delete: protocol and SPIs (none for IKE).
    Delete {
        /// Protocol.
        protocol: u8,
        /// SPIs.
        spis: Vec<Vec<u8>>,
    },
    /// Traffic Selector - Initiator.
    TsI(Vec<Ts>),
    /// Traffic Selector - Responder.
    TsR(Vec<Ts>),
    /// A payload espip does not interpret (Vendor ID, CERTREQ, CP, ...), kept as it came.
    Other {
        /// Payload type.
        kind: u8,
        /// Content.
        data: Vec<u8>,
    },
}

impl Payload {
    /// The payload type.
    pub fn kind(&self) -> u8 {
        match self {
            Payload::Sa(_) => kind::SA,
            Payload::Ke { .. } => kind::KE,
            Payload::IdI(_) => kind::IDI,
            Payload::IdR(_) => kind::IDR,
            Payload::Auth { .. } => kind::AUTH,
            Payload::Nonce(_) => kind::NONCE,
            Payload::Notify { .. } => kind::NOTIFY,
            Payload::Delete { .. } => kind::DELETE,
            Payload::TsI(_) => kind::TSI,
            Payload::TsR(_) => kind::TSR,
            Payload::Other { kind, .. } => *kind,
        }
    }

    /// A notify without SPI.
    pub fn notify(kind: u16, data: Vec<u8>) -> Payload {
        Payload::Notify {
            protocol: 0,
            spi: Vec::new(),
            kind,
            data,
        }
    }

    fn body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Sa(props) => {
                for (i, p) in props.iter().enumerate() {
                    let start = out.len();
                    out.push(if i + 1 == props.len() { 0 } else { 2 });
                    out.push(0);
                    out.extend_from_slice(&[0, 0]);
                    out.push(p.num);
                    out.push(p.protocol);
                    out.push(p.spi.len() as u8);
                    out.push(p.transforms.len() as u8);
                    out.extend_from_slice(&p.spi);
                    for (j, t) in p.transforms.iter().enumerate() {
                        out.push(if j + 1 == p.transforms.len() { 0 } else { 3 });
                        out.push(0);
                        let len: u16 = if t.key_len.is_some() { 12 } else { 8 };
                        out.extend_from_slice(&len.to_be_bytes());
                        out.push(t.kind);
                        out.push(0);
                        out.extend_from_slice(&t.id.to_be_bytes());
                        if let Some(k) = t.key_len {
                            // Attribute type 14 (Key Length), TV format (AF bit).
                            out.extend_from_slice(&0x800eu16.to_be_bytes());
                            out.extend_from_slice(&k.to_be_bytes());
                        }
                    }
                    let len = (out.len() - start) as u16;
                    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
                }
            }
            Payload::Ke { group, data } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(data);
            }
            Payload::IdI(id) | Payload::IdR(id) => out.extend_from_slice(&id.body()),
            Payload::Auth { method, data } => {
                out.extend_from_slice(&[*method, 0, 0, 0]);
                out.extend_from_slice(data);
            }
            Payload::Nonce(n) => out.extend_from_slice(n),
            Payload::Notify {
                protocol,
                spi,
                kind,
                data,
            } => {
                out.push(*protocol);
                out.push(spi.len() as u8);
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(spi);
                out.extend_from_slice(data);
            }
            Payload::Delete { protocol, spis } => {
                out.push(*protocol);
                out.push(spis.first().map_or(0, |s| s.len() as u8));
                out.extend_from_slice(&(spis.len() as u16).to_be_bytes());
                for s in spis {
                    out.extend_from_slice(s);
                }
            }
            Payload::TsI(tss) | Payload::TsR(tss) => {
                out.extend_from_slice(&[tss.len() as u8, 0, 0, 0]);
                for t in tss {
                    let v6 = t.start.is_ipv6();
                    out.push(if v6 { 8 } else { 7 });
                    out.push(t.ip_proto);
                    out.extend_from_slice(&(if v6 { 40u16 } else { 16 }).to_be_bytes());
                    out.extend_from_slice(&t.start_port.to_be_bytes());
                    out.extend_from_slice(&t.end_port.to_be_bytes());
                    for a in [t.start, t.end] {
                        match a {
                            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
                        }
                    }
                }
            }
            Payload::Other { data, .. } => out.extend_from_slice(data),
        }
    }
}

/// Append a chain of payloads; the caller writes `payloads[0].kind()` as the previous "next
/// payload". `tail`: the type of what follows the chain (0: nothing).
pub fn write_chain(payloads: &[Payload], tail: u8, out: &mut Vec<u8>) {
    for (i, p) in payloads.iter().enumerate() {
        let start = out.len();
        out.push(payloads.get(i + 1).map_or(tail, Payload::kind));
        out.push(0);
        out.extend_from_slice(&[0, 0]);
        p.body(out);
        let len = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

fn be16(b: &[u8], at: usize) -> Result<u16, MsgError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(MsgError::Truncated)
}

fn ip(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(b).expect("4")),
        _ => IpAddr::from(<[u8; 16]>::try_from(b).expect("16")),
    }
}

fn parse_sa(b: &[u8]) -> Result<Vec<Proposal>, MsgError> {
    let bad = MsgError::Payload(kind::SA);
    let mut props = Vec::new();
    let mut rest = b;
    loop {
        let len = be16(rest, 2)? as usize;
        if len < 8 || len > rest.len() {
            return Err(bad);
        }
        let (p, after) = rest.split_at(len);
        let spi_len = p[6] as usize;
        let count = p[7] as usize;
        let spi = p.get(8..8 + spi_len).ok_or(bad)?.to_vec();
        let mut transforms = Vec::new();
        let mut t = &p[8 + spi_len..];
        for _ in 0..count {
            let tl = be16(t, 2)? as usize;
            if tl < 8 || tl > t.len() {
                return Err(bad);
            }
            let mut key_len = None;
            let mut attrs = &t[8..tl];
            while !attrs.is_empty() {
                let at = be16(attrs, 0)?;
                if at & 0x8000 != 0 {
                    if at & 0x7fff == 14 {
                        key_len = Some(be16(attrs, 2)?);
                    }
                    attrs = &attrs[4.min(attrs.len())..];
                } else {
                    let al = be16(attrs, 2)? as usize;
                    attrs = attrs.get(4 + al..).ok_or(bad)?;
                }
            }
            transforms.push(Transform {
                kind: t[4],
                id: be16(t, 6)?,
                key_len,
            });
            t = &t[tl..];
        }
        props.push(Proposal {
            num: p[4],
            protocol: p[5],
            spi,
            transforms,
        });
        if p[0] == 0 {
            return if after.is_empty() {
                Ok(props)
            } else {
                Err(bad)
            };
        }
        rest = after;
    }
}

fn parse_ts(b: &[u8], k: u8) -> Result<Vec<Ts>, MsgError> {
    let bad = MsgError::Payload(k);
    let count = *b.first().ok_or(bad)? as usize;
    let mut rest = b.get(4..).ok_or(bad)?;
    let mut v = Vec::new();
    for _ in 0..count {
        let len = be16(rest, 2)? as usize;
        let alen = match rest[0] {
            7 => 4,
            8 => 16,
            _ => return Err(bad),
        };
        if len != 8 + 2 * alen || rest.len() < len {
            return Err(bad);
        }
        v.push(Ts {
            ip_proto: rest[1],
            start_port: be16(rest, 4)?,
            end_port: be16(rest, 6)?,
            start: ip(&rest[8..8 + alen]),
            end: ip(&rest[8 + alen..8 + 2 * alen]),
        });
        rest = &rest[len..];
    }
    Ok(v)
}

fn parse_one(k: u8, b: &[u8]) -> Result<Payload, MsgError> {
    let bad = MsgError::Payload(k);
    Ok(match k {
        kind::SA => Payload::Sa(parse_sa(b)?),
        kind::KE => Payload::Ke {
            group: be16(b, 0)?,
            data: b.get(4..).ok_or(bad)?.to_vec(),
        },
        kind::IDI | kind::IDR => {
            let id = Id {
                kind: *b.first().ok_or(bad)?,
                data: b.get(4..).ok_or(bad)?.to_vec(),
            };
            if k == kind::IDI {
                Payload::IdI(id)
            } else {
                Payload::IdR(id)
            }
        }
        kind::AUTH => Payload::Auth {
            method: *b.first().ok_or(bad)?,
            data: b.get(4..).ok_or(bad)?.to_vec(),
        },
        kind::NONCE => {
            // Section 3.9: 16 to 256 octets.
            if b.len() < 16 || b.len() > 256 {
                return Err(bad);
            }
            Payload::Nonce(b.to_vec())
        }
        kind::NOTIFY => {
            let spi_len = *b.get(1).ok_or(bad)? as usize;
            Payload::Notify {
                protocol: b[0],
                kind: be16(b, 2)?,
                spi: b.get(4..4 + spi_len).ok_or(bad)?.to_vec(),
                data: b[4 + spi_len..].to_vec(),
            }
        }
        kind::DELETE => {
            let spi_len = *b.get(1).ok_or(bad)? as usize;
            let n = be16(b, 2)? as usize;
            let body = b.get(4..).ok_or(bad)?;
            if body.len() != spi_len * n || (spi_len == 0 && n != 0) {
                return Err(bad);
            }
            Payload::Delete {
                protocol: b[0],
                spis: if spi_len == 0 {
                    Vec::new()
                } else {
                    body.chunks(spi_len).map(<[u8]>::to_vec).collect()
                },
            }
        }
        kind::TSI => Payload::TsI(parse_ts(b, k)?),
        kind::TSR => Payload::TsR(parse_ts(b, k)?),
        _ => Payload::Other {
            kind: k,
            data: b.to_vec(),
        },
    })
}

/// What [`parse_chain`] found: the payloads, and the SK payload if the chain ends in one.
pub struct Chain {
    /// Payloads before the SK payload (all of them when there is none).
    pub payloads: Vec<Payload>,
    /// Offset of the SK payload's generic header in the buffer, its "next payload" (the type
    /// of the first encrypted payload) and its end.
    pub sk: Option<(usize, u8, usize)>,
}

/// Parse the chain of payloads starting at `off` in `buf` (which ends where the chain ends),
/// first of type `first`. A known payload type that fails to parse, or an unknown one marked
/// critical, refuses the whole chain.
pub fn parse_chain(buf: &[u8], off: usize, first: u8) -> Result<Chain, MsgError> {
    let mut payloads = Vec::new();
    let mut next = first;
    let mut at = off;
    while next != kind::NONE {
        let h = buf.get(at..at + GEN_LEN).ok_or(MsgError::Truncated)?;
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        if len < GEN_LEN || at + len > buf.len() {
            return Err(MsgError::Truncated);
        }
        if next == kind::SK {
            // The SK payload is the last one (section 3.14).
            if at + len != buf.len() {
                return Err(MsgError::NoSk);
            }
            return Ok(Chain {
                payloads,
                sk: Some((at, h[0], at + len)),
            });
        }
        let critical = h[1] & 0x80 != 0;
        let known = matches!(next, 33..=45 | 47 | 48);
        if !known && critical {
            return Err(MsgError::Critical(next));
        }
        payloads.push(parse_one(next, &buf[at + GEN_LEN..at + len])?);
        at += len;
        next = h[0];
    }
    if at != buf.len() {
        return Err(MsgError::Truncated);
    }
    Ok(Chain { payloads, sk: None })
}

/// A plaintext message (IKE_SA_INIT).
pub fn encode_plain(mut h: Header, payloads: &[Payload]) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    h.next = payloads.first().map_or(kind::NONE, Payload::kind);
    h.write(&mut out);
    write_chain(payloads, kind::NONE, &mut out);
    let len = out.len() as u32;
    out[24..28].copy_from_slice(&len.to_be_bytes());
    out
}

/// A message whose payloads travel in an SK payload sealed with `key` (the sender's SK_e)
/// and the explicit IV `iv` (unique per key: the caller passes a counter). RFC 5282 section
/// 5.1: the associated data is the IKE header and the SK payload's generic header; no padding
/// is needed for an AEAD, so the Pad Length is 0.
pub fn encode_sk(mut h: Header, payloads: &[Payload], key: &KeyMaterial, iv: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    h.next = kind::SK;
    h.write(&mut out);
    let sk = out.len();
    out.push(payloads.first().map_or(kind::NONE, Payload::kind));
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&iv.to_be_bytes());
    write_chain(payloads, kind::NONE, &mut out);
    out.push(0); // Pad Length
    let total = out.len() + SK_ICV_LEN;
    out[24..28].copy_from_slice(&(total as u32).to_be_bytes());
    let sk_len = (total - sk) as u16;
    out[sk + 2..sk + 4].copy_from_slice(&sk_len.to_be_bytes());
    let (aad, rest) = out.split_at_mut(sk + GEN_LEN);
    let body = &mut rest[SK_IV_LEN..];
    let tag = Aead::new(key).seal(iv.to_be_bytes(), aad, body);
    out.extend_from_slice(&tag);
    out
}

/// Open the SK payload of `msg` (`sk` as [`Chain::sk`] gave it) with `key` (the peer's SK_e)
/// and parse the payloads inside.
pub fn open_sk(
    msg: &[u8],
    sk: (usize, u8, usize),
    key: &KeyMaterial,
) -> Result<Vec<Payload>, MsgError> {
    let (at, first, end) = sk;
    if end - at < GEN_LEN + SK_IV_LEN + SK_ICV_LEN + 1 {
        return Err(MsgError::Truncated);
    }
    let aad = &msg[..at + GEN_LEN];
    let iv: [u8; SK_IV_LEN] = msg[at + GEN_LEN..at + GEN_LEN + SK_IV_LEN]
        .try_into()
        .expect("8");
    let mut body = msg[at + GEN_LEN + SK_IV_LEN..end].to_vec();
    let n = Aead::new(key)
        .open(iv, aad, &mut body)
        .map_err(|_| MsgError::BadIcv)?;
    let pad = body[n - 1] as usize;
    if pad + 1 > n {
        return Err(MsgError::Payload(kind::SK));
    }
    let inner = &body[..n - 1 - pad];
    Ok(parse_chain(inner, 0, first)?.payloads)
}
