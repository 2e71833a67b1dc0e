//! IKEv2 key material (RFC 7296 sections 2.13-2.17): the PRF and prf+, SKEYSEED and the IKE
//! SA keys, CHILD_SA KEYMAT, the pre-shared key AUTH value, NAT detection hashes, and the
//! Diffie-Hellman groups (X25519, RFC 8031; ECP-256/384, RFC 5903) through `ring::agreement`.
//!
//! Randomness is passed in (`&dyn SecureRandom`), like time: the core reads no device.

use crate::sa::{Cipher, KeyMaterial, SALT_LEN};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::hmac;
use ring::rand::SecureRandom;
use std::net::SocketAddr;
use zeroize::Zeroizing;

/// A pseudorandom function (transform type 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prf {
    /// PRF_HMAC_SHA2_256 (id 5, RFC 4868).
    HmacSha256,
    /// PRF_HMAC_SHA2_384 (id 6).
    HmacSha384,
    /// PRF_HMAC_SHA2_512 (id 7).
    HmacSha512,
}

impl Prf {
    /// Transform ID.
    pub fn id(self) -> u16 {
        match self {
            Prf::HmacSha256 => 5,
            Prf::HmacSha384 => 6,
            Prf::HmacSha512 => 7,
        }
    }

    /// From a transform ID.
    pub fn from_id(id: u16) -> Option<Prf> {
        [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512]
            .into_iter()
            .find(|p| p.id() == id)
    }

    /// Output (and preferred key) length.
    pub fn out_len(self) -> usize {
        match self {
            Prf::HmacSha256 => 32,
            Prf::HmacSha384 => 48,
            Prf::HmacSha512 => 64,
        }
    }

    fn alg(self) -> hmac::Algorithm {
        match self {
            Prf::HmacSha256 => hmac::HMAC_SHA256,
            Prf::HmacSha384 => hmac::HMAC_SHA384,
            Prf::HmacSha512 => hmac::HMAC_SHA512,
        }
    }

    /// prf(key, data...).
    pub fn prf(self, key: &[u8], data: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        let k = hmac::Key::new(self.alg(), key);
        let mut ctx = hmac::Context::with_key(&k);
        for d in data {
            ctx.update(d);
        }
        Zeroizing::new(ctx.sign().as_ref().to_vec())
    }

    /// prf+(key, seed) truncated to `len` bytes (section 2.13): T1 = prf(K, S | 0x01),
    /// Tn = prf(K, Tn-1 | S | n).
    pub fn prf_plus(self, key: &[u8], seed: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(len + self.out_len()));
        let mut t = Zeroizing::new(Vec::new());
        let mut n = 1u8;
        while out.len() < len {
            t = self.prf(key, &[&t, seed, &[n]]);
            out.extend_from_slice(&t);
            n = n.wrapping_add(1);
        }
        out.truncate(len);
        out
    }
}

/// A Diffie-Hellman group (transform type 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// 256-bit random ECP group (19, RFC 5903).
    Ecp256,
    /// 384-bit random ECP group (20).
    Ecp384,
    /// Curve25519 (31, RFC 8031).
    Curve25519,
}

impl Group {
    /// Transform ID.
    pub fn id(self) -> u16 {
        match self {
            Group::Ecp256 => 19,
            Group::Ecp384 => 20,
            Group::Curve25519 => 31,
        }
    }

    /// From a transform ID.
    pub fn from_id(id: u16) -> Option<Group> {
        [Group::Ecp256, Group::Ecp384, Group::Curve25519]
            .into_iter()
            .find(|g| g.id() == id)
    }

    fn alg(self) -> &'static agreement::Algorithm {
        match self {
            Group::Ecp256 => &agreement::ECDH_P256,
            Group::Ecp384 => &agreement::ECDH_P384,
            Group::Curve25519 => &agreement::X25519,
        }
    }

    /// Length of the KE payload's data.
    pub fn public_len(self) -> usize {
        match self {
            Group::Ecp256 => 64,
            Group::Ecp384 => 96,
            Group::Curve25519 => 32,
        }
    }
}

/// One side's half of a key exchange, used once.
pub struct KeyShare {
    group: Group,
    private: EphemeralPrivateKey,
    /// The KE payload data (RFC 5903 section 7: x || y without the point format byte).
    pub public: Vec<u8>,
}

impl std::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyShare({:?})", self.group)
    }
}

/// The peer's KE data is not a valid public value of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPublicValue;

impl KeyShare {
    /// A fresh private value.
    pub fn new(group: Group, rng: &dyn SecureRandom) -> Option<KeyShare> {
        let private = EphemeralPrivateKey::generate(group.alg(), rng).ok()?;
        let pk = private.compute_public_key().ok()?;
        let public = match group {
            Group::Curve25519 => pk.as_ref().to_vec(),
            // ring gives the uncompressed point 0x04 || x || y.
            _ => pk.as_ref()[1..].to_vec(),
        };
        Some(KeyShare {
            group,
            private,
            public,
        })
    }

    /// The group.
    pub fn group(&self) -> Group {
        self.group
    }

    /// g^ir from the peer's KE data (for the ECP groups: the x coordinate, RFC 5903 section 7).
    pub fn agree(self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, BadPublicValue> {
        if peer.len() != self.group.public_len() {
            return Err(BadPublicValue);
        }
        let raw = match self.group {
            Group::Curve25519 => peer.to_vec(),
            _ => {
                let mut v = vec![4u8];
                v.extend_from_slice(peer);
                v
            }
        };
        let pk = UnparsedPublicKey::new(self.group.alg(), raw);
        agreement::agree_ephemeral(self.private, &pk, |s| Zeroizing::new(s.to_vec()))
            .map_err(|_| BadPublicValue)
    }
}

/// The keys of an IKE SA (section 2.14).
#[derive(Clone)]
pub struct IkeKeys {
    /// The PRF.
    pub prf: Prf,
    /// SK_d: the key CHILD_SA keys (and a rekeyed IKE SA's SKEYSEED) derive from.
    pub sk_d: Zeroizing<Vec<u8>>,
    /// SK_ei: protects messages the original initiator sends.
    pub sk_ei: KeyMaterial,
    /// SK_er: protects messages the original responder sends.
    pub sk_er: KeyMaterial,
    /// SK_pi: in the initiator's AUTH.
    pub sk_pi: Zeroizing<Vec<u8>>,
    /// SK_pr: in the responder's AUTH.
    pub sk_pr: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for IkeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IkeKeys({:?}, <redacted>)", self.prf)
    }
}

/// `{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi |
/// SPIr)` with an AEAD (no SK_a; SK_e is key || salt, RFC 5282 section 7).
pub fn ike_keys(
    prf: Prf,
    cipher: Cipher,
    skeyseed: &[u8],
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> IkeKeys {
    let e = cipher.key_len() + SALT_LEN;
    let p = prf.out_len();
    let seed = [ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()].concat();
    let km = prf.prf_plus(skeyseed, &seed, 3 * p + 2 * e);
    let sk_ei = KeyMaterial::new(cipher, &km[p..p + e]).expect("length");
    let sk_er = KeyMaterial::new(cipher, &km[p + e..p + 2 * e]).expect("length");
    IkeKeys {
        prf,
        sk_d: Zeroizing::new(km[..p].to_vec()),
        sk_ei,
        sk_er,
        sk_pi: Zeroizing::new(km[p + 2 * e..2 * p + 2 * e].to_vec()),
        sk_pr: Zeroizing::new(km[2 * p + 2 * e..].to_vec()),
    }
}

/// SKEYSEED = prf(Ni | Nr, g^ir) for a new IKE SA; for a rekeyed one (section 2.18)
/// prf(SK_d (old), g^ir (new) | Ni | Nr).
pub fn skeyseed(
    prf: Prf,
    shared: &[u8],
    ni: &[u8],
    nr: &[u8],
    old_sk_d: Option<&[u8]>,
) -> Zeroizing<Vec<u8>> {
    match old_sk_d {
        None => prf.prf(&[ni, nr].concat(), &[shared]),
        Some(d) => prf.prf(d, &[shared, ni, nr]),
    }
}

/// KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (section 2.17), split into the ESP keys of the
/// SA the initiator sends on and the SA the responder sends on.
pub fn child_keys(
    prf: Prf,
    sk_d: &[u8],
    cipher: Cipher,
    shared: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
) -> (KeyMaterial, KeyMaterial) {
    let e = cipher.key_len() + SALT_LEN;
    let seed = [shared.unwrap_or(&[]), ni, nr].concat();
    let km = prf.prf_plus(sk_d, &seed, 2 * e);
    (
        KeyMaterial::new(cipher, &km[..e]).expect("length"),
        KeyMaterial::new(cipher, &km[e..]).expect("length"),
    )
}

/// AUTH with a pre-shared key (section 2.15): prf(prf(Shared Secret, "Key Pad for IKEv2"),
/// <message> | <peer's nonce> | prf(SK_p, <ID payload body>)).
pub fn psk_auth(
    prf: Prf,
    psk: &[u8],
    message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_body: &[u8],
) -> Zeroizing<Vec<u8>> {
    let maced_id = prf.prf(sk_p, &[id_body]);
    let pad = prf.prf(psk, &[b"Key Pad for IKEv2"]);
    prf.prf(&pad, &[message, peer_nonce, &maced_id])
}

/// NAT detection hash (section 2.23): SHA-1(SPIi | SPIr | IP | port).
pub fn nat_hash(spi_i: u64, spi_r: u64, addr: SocketAddr) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(&spi_i.to_be_bytes());
    ctx.update(&spi_r.to_be_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(a) => ctx.update(&a.octets()),
        std::net::IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&addr.port().to_be_bytes());
    ctx.finish().as_ref().to_vec()
}

/// Constant-time comparison of two MACs.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn prf_is_hmac_sha256_of_rfc_4231_case_2() {
        // RFC 4231 section 4.3: key "Jefe", data "what do ya want for nothing?".
        let out = Prf::HmacSha256.prf(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            &out[..],
            &hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")[..]
        );
    }

    #[test]
    fn prf_plus_chains_blocks_with_a_counter() {
        let k = b"key";
        let s = b"seed";
        let t1 = Prf::HmacSha256.prf(k, &[s, &[1]]);
        let t2 = Prf::HmacSha256.prf(k, &[&t1, s, &[2]]);
        let out = Prf::HmacSha256.prf_plus(k, s, 40);
        assert_eq!(&out[..32], &t1[..]);
        assert_eq!(&out[32..], &t2[..8]);
    }

    #[test]
    fn both_sides_of_each_group_agree() {
        let rng = ring::rand::SystemRandom::new();
        for g in [Group::Curve25519, Group::Ecp256, Group::Ecp384] {
            let a = KeyShare::new(g, &rng).unwrap();
            let b = KeyShare::new(g, &rng).unwrap();
            assert_eq!(a.public.len(), g.public_len());
            let (pa, pb) = (a.public.clone(), b.public.clone());
            assert_eq!(a.agree(&pb).unwrap(), b.agree(&pa).unwrap());
        }
        let a = KeyShare::new(Group::Ecp256, &rng).unwrap();
        assert_eq!(a.agree(&[0u8; 64]), Err(BadPublicValue));
    }

    #[test]
    #[allow(deprecated)] // ring's fixed-bytes generator is the one way to feed a known scalar
    fn rfc_8031_x25519_shared_secret() {
        // RFC 7748 section 6.1 (the values RFC 8031 refers to): Alice's and Bob's keys.
        let rng = ring::test::rand::FixedSliceRandom {
            bytes: &hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"),
        };
        let a = KeyShare::new(Group::Curve25519, &rng).unwrap();
        assert_eq!(
            a.public,
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let bob = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        assert_eq!(
            &a.agree(&bob).unwrap()[..],
            &hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")[..]
        );
    }
}
