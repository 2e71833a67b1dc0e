//! Proposals in strongSwan's notation (`aes128gcm16-prfsha256-x25519` for IKE, `aes128gcm16`
//! or `aes128gcm16-x25519` (PFS) for ESP), their SA payload form (RFC 7296 section 3.3) and
//! the responder's choice (section 2.7: the first of the initiator's proposals, in its order,
//! that this side accepts).

use super::crypto::{Group, Prf};
use super::msg::{proto, Proposal, Transform};
use crate::sa::Cipher;

/// Default IKE proposal (strongSwan's notation): what a peer without `ike_proposals` offers
/// and accepts.
pub const DEFAULT_IKE_PROPOSAL: &str = "aes128gcm16-prfsha256-x25519";

/// Transform types.
pub mod ttype {
    /// Encryption algorithm.
    pub const ENCR: u8 = 1;
    /// Pseudorandom function.
    pub const PRF: u8 = 2;
    /// Integrity algorithm.
    pub const INTEG: u8 = 3;
    /// Diffie-Hellman group.
    pub const DH: u8 = 4;
    /// Extended sequence numbers.
    pub const ESN: u8 = 5;
}

/// ENCR_AES_GCM_16 (RFC 5282 / RFC 4106).
const ENCR_AES_GCM_16: u16 = 20;
/// ENCR_CHACHA20_POLY1305 (RFC 7634).
const ENCR_CHACHA20_POLY1305: u16 = 28;

fn encr(c: Cipher) -> Transform {
    match c {
        Cipher::Aes128Gcm => Transform {
            kind: ttype::ENCR,
            id: ENCR_AES_GCM_16,
            key_len: Some(128),
        },
        Cipher::Aes256Gcm => Transform {
            kind: ttype::ENCR,
            id: ENCR_AES_GCM_16,
            key_len: Some(256),
        },
        Cipher::ChaCha20Poly1305 => Transform {
            kind: ttype::ENCR,
            id: ENCR_CHACHA20_POLY1305,
            key_len: None,
        },
    }
}

fn cipher_of(t: &Transform) -> Option<Cipher> {
    match (t.id, t.key_len) {
        (ENCR_AES_GCM_16, Some(128)) => Some(Cipher::Aes128Gcm),
        (ENCR_AES_GCM_16, Some(256)) => Some(Cipher::Aes256Gcm),
        (ENCR_CHACHA20_POLY1305, None) => Some(Cipher::ChaCha20Poly1305),
        _ => None,
    }
}

fn cipher_token(s: &str) -> Option<Cipher> {
    match s {
        "aes128gcm16" | "aes128gcm128" | "aes128gcm" => Some(Cipher::Aes128Gcm),
        "aes256gcm16" | "aes256gcm128" | "aes256gcm" => Some(Cipher::Aes256Gcm),
        "chacha20poly1305" => Some(Cipher::ChaCha20Poly1305),
        _ => None,
    }
}

fn group_token(s: &str) -> Option<Group> {
    match s {
        "x25519" | "curve25519" => Some(Group::Curve25519),
        "ecp256" => Some(Group::Ecp256),
        "ecp384" => Some(Group::Ecp384),
        _ => None,
    }
}

fn cipher_token_name(c: Cipher) -> &'static str {
    match c {
        Cipher::Aes128Gcm => "aes128gcm16",
        Cipher::Aes256Gcm => "aes256gcm16",
        Cipher::ChaCha20Poly1305 => "chacha20poly1305",
    }
}

fn group_name(g: Group) -> &'static str {
    match g {
        Group::Curve25519 => "x25519",
        Group::Ecp256 => "ecp256",
        Group::Ecp384 => "ecp384",
    }
}

fn prf_name(p: Prf) -> &'static str {
    match p {
        Prf::HmacSha256 => "prfsha256",
        Prf::HmacSha384 => "prfsha384",
        Prf::HmacSha512 => "prfsha512",
    }
}

const SUPPORTED: &str = "ciphers aes128gcm16, aes256gcm16, chacha20poly1305; PRFs prfsha256, prfsha384, prfsha512; groups x25519, ecp256, ecp384";

/// An IKE proposal: one AEAD, one PRF, one or more groups (the first is the one whose key
/// share an initiator sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkeProposal {
    /// The SK payload's AEAD.
    pub cipher: Cipher,
    /// The PRF.
    pub prf: Prf,
    /// Diffie-Hellman groups in order of preference.
    pub groups: Vec<Group>,
}

/// Why a proposal string (strongSwan's notation) was refused; `kind` is "IKE" or "ESP".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    /// Two ciphers in one proposal.
    #[error("{kind} proposal {text:?} names two ciphers; list a second proposal instead")]
    TwoCiphers {
        /// IKE or ESP.
        kind: &'static str,
        /// The proposal.
        text: String,
    },
    /// Two PRFs in one IKE proposal.
    #[error("IKE proposal {0:?} names two PRFs")]
    TwoPrfs(String),
    /// A token espip does not know.
    #[error("{kind} proposal {text:?}: unknown or unsupported algorithm {token:?} (espip has {supported})")]
    Unknown {
        /// IKE or ESP.
        kind: &'static str,
        /// The proposal.
        text: String,
        /// The token.
        token: String,
        /// What espip supports.
        supported: &'static str,
    },
    /// No cipher.
    #[error("{kind} proposal {text:?} has no cipher (one of aes128gcm16, aes256gcm16, chacha20poly1305)")]
    NoCipher {
        /// IKE or ESP.
        kind: &'static str,
        /// The proposal.
        text: String,
    },
    /// No PRF in an IKE proposal.
    #[error("IKE proposal {0:?} has no PRF (prfsha256, prfsha384 or prfsha512; an AEAD needs an explicit PRF)")]
    NoPrf(String),
    /// No Diffie-Hellman group in an IKE proposal.
    #[error("IKE proposal {0:?} has no Diffie-Hellman group (x25519, ecp256 or ecp384)")]
    NoGroup(String),
}

/// What an ESP proposal may name.
const ESP_SUPPORTED: &str = "ciphers aes128gcm16, aes256gcm16, chacha20poly1305; PFS groups x25519, ecp256, ecp384; esn, noesn";

impl IkeProposal {
    /// Parse `aes128gcm16-prfsha256-x25519[-ecp256...]`.
    pub fn parse(s: &str) -> Result<IkeProposal, ProposalError> {
        let mut cipher = None;
        let mut prf = None;
        let mut groups = Vec::new();
        for tok in s.trim().split('-') {
            if let Some(c) = cipher_token(tok) {
                if cipher.replace(c).is_some() {
                    return Err(ProposalError::TwoCiphers {
                        kind: "IKE",
                        text: s.into(),
                    });
                }
            } else if let Some(p) = match tok {
                "prfsha256" => Some(Prf::HmacSha256),
                "prfsha384" => Some(Prf::HmacSha384),
                "prfsha512" => Some(Prf::HmacSha512),
                _ => None,
            } {
                if prf.replace(p).is_some() {
                    return Err(ProposalError::TwoPrfs(s.into()));
                }
            } else if let Some(g) = group_token(tok) {
                groups.push(g);
            } else {
                return Err(ProposalError::Unknown {
                    kind: "IKE",
                    text: s.into(),
                    token: tok.into(),
                    supported: SUPPORTED,
                });
            }
        }
        let cipher = cipher.ok_or_else(|| ProposalError::NoCipher {
            kind: "IKE",
            text: s.into(),
        })?;
        let prf = prf.ok_or_else(|| ProposalError::NoPrf(s.into()))?;
        if groups.is_empty() {
            return Err(ProposalError::NoGroup(s.into()));
        }
        Ok(IkeProposal {
            cipher,
            prf,
            groups,
        })
    }

    /// strongSwan's notation.
    pub fn name(&self) -> String {
        let mut s = format!("{}-{}", cipher_token_name(self.cipher), prf_name(self.prf));
        for g in &self.groups {
            s.push('-');
            s.push_str(group_name(*g));
        }
        s
    }

    /// The SA payload proposal (number `num`; `spi`: empty in IKE_SA_INIT, 8 bytes in a rekey).
    pub fn to_wire(&self, num: u8, spi: Vec<u8>) -> Proposal {
        let mut t = vec![
            encr(self.cipher),
            Transform {
                kind: ttype::PRF,
                id: self.prf.id(),
                key_len: None,
            },
        ];
        t.extend(self.groups.iter().map(|g| Transform {
            kind: ttype::DH,
            id: g.id(),
            key_len: None,
        }));
        Proposal {
            num,
            protocol: proto::IKE,
            spi,
            transforms: t,
        }
    }
}

/// An ESP proposal: one AEAD, optional PFS groups, ESN allowed or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspProposal {
    /// The AEAD.
    pub cipher: Cipher,
    /// Groups for PFS in CREATE_CHILD_SA (empty: no PFS).
    pub groups: Vec<Group>,
    /// ESN values offered or accepted, in order of preference.
    pub esn: Vec<bool>,
}

impl EspProposal {
    /// Parse `aes128gcm16[-x25519][-esn][-noesn]` as strongSwan does: without an ESN token
    /// the proposal means no ESN (`noesn`); `esn-noesn` offers and accepts both, ESN
    /// preferred.
    pub fn parse(s: &str) -> Result<EspProposal, ProposalError> {
        let mut cipher = None;
        let mut groups = Vec::new();
        let mut esn = Vec::new();
        for tok in s.trim().split('-') {
            if let Some(c) = cipher_token(tok) {
                if cipher.replace(c).is_some() {
                    return Err(ProposalError::TwoCiphers {
                        kind: "ESP",
                        text: s.into(),
                    });
                }
            } else if let Some(g) = group_token(tok) {
                groups.push(g);
            } else if tok == "esn" {
                esn.push(true);
            } else if tok == "noesn" {
                esn.push(false);
            } else {
                return Err(ProposalError::Unknown {
                    kind: "ESP",
                    text: s.into(),
                    token: tok.into(),
                    supported: ESP_SUPPORTED,
                });
            }
        }
        let cipher = cipher.ok_or_else(|| ProposalError::NoCipher {
            kind: "ESP",
            text: s.into(),
        })?;
        if esn.is_empty() {
            esn = vec![false];
        }
        esn.dedup();
        Ok(EspProposal {
            cipher,
            groups,
            esn,
        })
    }

    /// strongSwan's notation.
    pub fn name(&self) -> String {
        let mut s = cipher_token_name(self.cipher).to_string();
        for g in &self.groups {
            s.push('-');
            s.push_str(group_name(*g));
        }
        for e in &self.esn {
            s.push_str(if *e { "-esn" } else { "-noesn" });
        }
        s
    }

    /// The SA payload proposal; `pfs`: include the DH transforms (CREATE_CHILD_SA).
    pub fn to_wire(&self, num: u8, spi: u32, pfs: bool) -> Proposal {
        let mut t = vec![encr(self.cipher)];
        if pfs {
            t.extend(self.groups.iter().map(|g| Transform {
                kind: ttype::DH,
                id: g.id(),
                key_len: None,
            }));
        }
        t.extend(self.esn.iter().map(|e| Transform {
            kind: ttype::ESN,
            id: u16::from(*e),
            key_len: None,
        }));
        Proposal {
            num,
            protocol: proto::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms: t,
        }
    }
}

/// What the responder chose of an IKE SA payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IkeChoice {
    /// The proposal number chosen.
    pub num: u8,
    /// AEAD.
    pub cipher: Cipher,
    /// PRF.
    pub prf: Prf,
    /// Group.
    pub group: Group,
}

impl IkeChoice {
    /// strongSwan's notation of the choice.
    pub fn name(&self) -> String {
        format!(
            "{}-{}-{}",
            cipher_token_name(self.cipher),
            prf_name(self.prf),
            group_name(self.group)
        )
    }

    /// The one-proposal SA payload that answers (or, from the initiator, confirms) the choice.
    pub fn to_wire(&self, spi: Vec<u8>) -> Proposal {
        let mut p = IkeProposal {
            cipher: self.cipher,
            prf: self.prf,
            groups: vec![self.group],
        }
        .to_wire(self.num, spi);
        p.num = self.num;
        p
    }
}

/// What the responder chose of an ESP SA payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspChoice {
    /// The proposal number chosen.
    pub num: u8,
    /// The proposer's SPI (4 bytes: it receives with it).
    pub spi: u32,
    /// AEAD.
    pub cipher: Cipher,
    /// PFS group, when the proposal had one (and this side wants one).
    pub group: Option<Group>,
    /// Extended sequence numbers.
    pub esn: bool,
}

impl EspChoice {
    /// strongSwan's notation.
    pub fn name(&self) -> String {
        let mut s = cipher_token_name(self.cipher).to_string();
        if let Some(g) = self.group {
            s.push('-');
            s.push_str(group_name(g));
        }
        s.push_str(if self.esn { "-esn" } else { "-noesn" });
        s
    }

    /// The answering proposal, carrying `spi` (the chooser's own inbound SPI).
    pub fn to_wire(&self, spi: u32) -> Proposal {
        let mut t = vec![encr(self.cipher)];
        if let Some(g) = self.group {
            t.push(Transform {
                kind: ttype::DH,
                id: g.id(),
                key_len: None,
            });
        }
        t.push(Transform {
            kind: ttype::ESN,
            id: u16::from(self.esn),
            key_len: None,
        });
        Proposal {
            num: self.num,
            protocol: proto::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms: t,
        }
    }
}

fn of_kind(p: &Proposal, k: u8) -> impl Iterator<Item = &Transform> {
    p.transforms.iter().filter(move |t| t.kind == k)
}

/// Choose from the initiator's IKE proposals (`offered`, in its order) what `ours` accepts.
pub fn choose_ike(offered: &[Proposal], ours: &[IkeProposal]) -> Option<IkeChoice> {
    for p in offered.iter().filter(|p| p.protocol == proto::IKE) {
        // An AEAD leaves no room for an integrity algorithm (RFC 5282 section 8).
        if of_kind(p, ttype::INTEG).any(|t| t.id != 0) {
            continue;
        }
        for o in ours {
            let cipher = of_kind(p, ttype::ENCR)
                .filter_map(cipher_of)
                .find(|c| *c == o.cipher);
            let prf = of_kind(p, ttype::PRF)
                .filter_map(|t| Prf::from_id(t.id))
                .find(|x| *x == o.prf);
            let offered_groups: Vec<Group> = of_kind(p, ttype::DH)
                .filter_map(|t| Group::from_id(t.id))
                .collect();
            let group = o.groups.iter().find(|g| offered_groups.contains(g));
            if let (Some(cipher), Some(prf), Some(group)) = (cipher, prf, group) {
                return Some(IkeChoice {
                    num: p.num,
                    cipher,
                    prf,
                    group: *group,
                });
            }
        }
    }
    None
}

/// Check the responder's answer against what was offered: exactly one proposal, and each of
/// its transforms among the offered ones.
pub fn accept_ike(answer: &[Proposal], ours: &[IkeProposal]) -> Option<IkeChoice> {
    let [p] = answer else { return None };
    let c = choose_ike(std::slice::from_ref(p), ours)?;
    (of_kind(p, ttype::ENCR).count() == 1
        && of_kind(p, ttype::PRF).count() == 1
        && of_kind(p, ttype::DH).count() == 1)
        .then_some(c)
}

/// Choose from the initiator's ESP proposals what `ours` accepts; `pfs_group`: the group of
/// the KE payload that came with them (CREATE_CHILD_SA), `None` when there was none.
pub fn choose_esp(
    offered: &[Proposal],
    ours: &[EspProposal],
    pfs_group: Option<Group>,
) -> Option<EspChoice> {
    for p in offered.iter().filter(|p| p.protocol == proto::ESP) {
        let Ok(spi) = <[u8; 4]>::try_from(&p.spi[..]) else {
            continue;
        };
        if of_kind(p, ttype::INTEG).any(|t| t.id != 0) {
            continue;
        }
        for o in ours {
            let Some(cipher) = of_kind(p, ttype::ENCR)
                .filter_map(cipher_of)
                .find(|c| *c == o.cipher)
            else {
                continue;
            };
            let offered_esn: Vec<bool> = of_kind(p, ttype::ESN).map(|t| t.id == 1).collect();
            // No ESN transform at all means "no ESN" (section 3.3.3).
            let offered_esn = if offered_esn.is_empty() {
                vec![false]
            } else {
                offered_esn
            };
            let Some(esn) = o.esn.iter().find(|e| offered_esn.contains(e)) else {
                continue;
            };
            let groups: Vec<Group> = of_kind(p, ttype::DH)
                .filter(|t| t.id != 0)
                .filter_map(|t| Group::from_id(t.id))
                .collect();
            let group = match pfs_group {
                // PFS: the KE's group must be in the proposal and acceptable here.
                Some(g) => {
                    if !groups.contains(&g) || !o.groups.contains(&g) {
                        continue;
                    }
                    Some(g)
                }
                None => {
                    // A proposal that insists on PFS without a KE cannot be taken unless it
                    // also offers "none".
                    let none_ok = of_kind(p, ttype::DH).count() == 0
                        || of_kind(p, ttype::DH).any(|t| t.id == 0);
                    if !none_ok && pfs_group.is_none() && !groups.is_empty() && o.groups.is_empty()
                    {
                        continue;
                    }
                    None
                }
            };
            return Some(EspChoice {
                num: p.num,
                spi: u32::from_be_bytes(spi),
                cipher,
                group,
                esn: *esn,
            });
        }
    }
    None
}

/// Check the responder's ESP answer: one proposal, acceptable, with a 4-byte SPI.
pub fn accept_esp(
    answer: &[Proposal],
    ours: &[EspProposal],
    pfs_group: Option<Group>,
) -> Option<EspChoice> {
    let [p] = answer else { return None };
    let c = choose_esp(std::slice::from_ref(p), ours, pfs_group)?;
    (of_kind(p, ttype::ENCR).count() == 1 && of_kind(p, ttype::ESN).count() <= 1).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strongswan_notation_parses_and_prints_back() {
        for s in [
            "aes128gcm16-prfsha256-x25519",
            "aes256gcm16-prfsha384-ecp384",
            "chacha20poly1305-prfsha256-x25519-ecp256",
        ] {
            assert_eq!(IkeProposal::parse(s).unwrap().name(), s);
        }
        assert!(IkeProposal::parse("aes128-sha256-modp2048")
            .unwrap_err()
            .to_string()
            .contains("\"aes128\""));
        assert!(IkeProposal::parse("aes128gcm16-x25519")
            .unwrap_err()
            .to_string()
            .contains("no PRF"));
        // strongSwan's reading: no ESN keyword is no ESN (issue 28 item 15).
        assert_eq!(EspProposal::parse("aes128gcm16").unwrap().esn, [false]);
        assert_eq!(EspProposal::parse("aes128gcm16-esn").unwrap().esn, [true]);
        assert_eq!(
            EspProposal::parse("aes128gcm16-esn-noesn").unwrap().esn,
            [true, false]
        );
        for s in [
            "aes128gcm16-esn-noesn",
            "aes128gcm16-esn",
            "aes128gcm16-noesn",
        ] {
            assert_eq!(EspProposal::parse(s).unwrap().name(), s);
        }
        assert_eq!(
            EspProposal::parse("chacha20poly1305-x25519-noesn")
                .unwrap()
                .name(),
            "chacha20poly1305-x25519-noesn"
        );
    }

    #[test]
    fn the_responder_takes_the_first_offered_proposal_it_accepts() {
        let offered = vec![
            IkeProposal::parse("aes256gcm16-prfsha384-ecp384")
                .unwrap()
                .to_wire(1, vec![]),
            IkeProposal::parse("aes128gcm16-prfsha256-ecp256-x25519")
                .unwrap()
                .to_wire(2, vec![]),
        ];
        let ours = [IkeProposal::parse("aes128gcm16-prfsha256-x25519").unwrap()];
        let c = choose_ike(&offered, &ours).unwrap();
        assert_eq!((c.num, c.group), (2, Group::Curve25519));
        assert_eq!(accept_ike(&[c.to_wire(vec![])], &ours), Some(c));
        let none = [IkeProposal::parse("chacha20poly1305-prfsha256-x25519").unwrap()];
        assert_eq!(choose_ike(&offered, &none), None);
    }

    #[test]
    fn esp_choice_follows_esn_and_pfs() {
        let offer = [EspProposal::parse("aes128gcm16-noesn")
            .unwrap()
            .to_wire(1, 0xc0ffee01, false)];
        let ours = [EspProposal::parse("aes128gcm16").unwrap()];
        let c = choose_esp(&offer, &ours, None).unwrap();
        assert_eq!((c.spi, c.esn, c.group), (0xc0ffee01, false, None));
        let pfs = [EspProposal::parse("aes128gcm16-x25519")
            .unwrap()
            .to_wire(1, 7, true)];
        let ours_pfs = [EspProposal::parse("aes128gcm16-x25519").unwrap()];
        let c = choose_esp(&pfs, &ours_pfs, Some(Group::Curve25519)).unwrap();
        assert_eq!(c.group, Some(Group::Curve25519));
        assert_eq!(choose_esp(&pfs, &ours_pfs, Some(Group::Ecp256)), None);
    }
}
