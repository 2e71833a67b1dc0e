//! A peer's key share checked before any Diffie-Hellman work (RFC 7296 section 2.6 asks a
//! responder to spend nothing on a request it may refuse): an ECP value must be a point of
//! its curve (RFC 5903 section 7; SP 800-56A's full public-key validation minus the order
//! check, which holds for these prime-order curves), an X25519 value must not be one of the
//! small-order points whose shared secret is zero (RFC 7748 section 6.1).
//!
//! The arithmetic is plain schoolbook over 64-bit limbs with shift-and-subtract reduction:
//! a few microseconds per check, against the hundreds a key generation costs. It handles
//! public values only (no secret enters it), so it need not run in constant time.

use super::crypto::Group;

/// Little-endian 64-bit limbs, enough for 384-bit numbers and their products.
type Limbs = [u64; 12];

fn from_be(bytes: &[u8]) -> Limbs {
    let mut out = [0u64; 12];
    for (i, chunk) in bytes.rchunks(8).enumerate() {
        let mut b = [0u8; 8];
        b[8 - chunk.len()..].copy_from_slice(chunk);
        out[i] = u64::from_be_bytes(b);
    }
    out
}

fn cmp(a: &Limbs, b: &Limbs) -> std::cmp::Ordering {
    for i in (0..12).rev() {
        match a[i].cmp(&b[i]) {
            std::cmp::Ordering::Equal => continue,
            o => return o,
        }
    }
    std::cmp::Ordering::Equal
}

fn sub(a: &mut Limbs, b: &Limbs) {
    let mut borrow = false;
    for i in 0..12 {
        let (d, b1) = a[i].overflowing_sub(b[i]);
        let (d, b2) = d.overflowing_sub(u64::from(borrow));
        a[i] = d;
        borrow = b1 || b2;
    }
}

fn add(a: &mut Limbs, b: &Limbs) {
    let mut carry = false;
    for i in 0..12 {
        let (s, c1) = a[i].overflowing_add(b[i]);
        let (s, c2) = s.overflowing_add(u64::from(carry));
        a[i] = s;
        carry = c1 || c2;
    }
}

/// `a * b` (both below 2^384).
fn mul(a: &Limbs, b: &Limbs) -> Limbs {
    let mut out = [0u64; 12];
    for i in 0..6 {
        let mut carry = 0u128;
        for j in 0..6 {
            let t = u128::from(a[i]) * u128::from(b[j]) + u128::from(out[i + j]) + carry;
            out[i + j] = t as u64;
            carry = t >> 64;
        }
        let mut k = i + 6;
        while carry != 0 && k < 12 {
            let t = u128::from(out[k]) + carry;
            out[k] = t as u64;
            carry = t >> 64;
            k += 1;
        }
    }
    out
}

/// `a mod p` by binary long division (p below 2^384, so the remainder never overflows).
fn reduce(a: &Limbs, p: &Limbs) -> Limbs {
    let mut r = [0u64; 12];
    for bit in (0..768).rev() {
        // r = 2r + bit
        let mut carry = (a[bit / 64] >> (bit % 64)) & 1;
        for limb in r.iter_mut() {
            let next = *limb >> 63;
            *limb = (*limb << 1) | carry;
            carry = next;
        }
        if cmp(&r, p) != std::cmp::Ordering::Less {
            sub(&mut r, p);
        }
    }
    r
}

fn mul_mod(a: &Limbs, b: &Limbs, p: &Limbs) -> Limbs {
    reduce(&mul(a, b), p)
}

fn add_mod(a: &Limbs, b: &Limbs, p: &Limbs) -> Limbs {
    let mut s = *a;
    add(&mut s, b);
    if cmp(&s, p) != std::cmp::Ordering::Less {
        sub(&mut s, p);
    }
    s
}

fn hex(s: &str) -> Limbs {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
        .collect();
    from_be(&bytes)
}

/// (p, b) of y^2 = x^3 - 3x + b (FIPS 186-4 D.1.2.3 and D.1.2.4).
fn curve(group: Group) -> Option<(Limbs, Limbs)> {
    match group {
        Group::Ecp256 => Some((
            hex("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff"),
            hex("5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b"),
        )),
        Group::Ecp384 => Some((
            hex("fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffeffffffff0000000000000000ffffffff"),
            hex("b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875ac656398d8a2ed19d2a85c8edd3ec2aef"),
        )),
        Group::Curve25519 => None,
    }
}

/// The u-coordinates of X25519's points of small order, little-endian, top bit cleared
/// (0, 1, the two points of order 8, p - 1, p, p + 1; libsodium refuses the same list).
const X25519_SMALL_ORDER: [[u8; 32]; 7] = {
    let mut t = [[0u8; 32]; 7];
    t[1][0] = 1;
    t[2] = [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ];
    t[3] = [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ];
    let mut k = 0;
    while k < 3 {
        let mut i = 1;
        while i < 31 {
            t[4 + k][i] = 0xff;
            i += 1;
        }
        t[4 + k][31] = 0x7f;
        t[4 + k][0] = 0xec + k as u8;
        k += 1;
    }
    t
};

/// Whether `data` (a KE payload's data) can be a peer's public value of `group`: the right
/// length, and a point of the curve (ECP) or not a small-order point (X25519).
pub fn valid_public(group: Group, data: &[u8]) -> bool {
    if data.len() != group.public_len() {
        return false;
    }
    let Some((p, b)) = curve(group) else {
        let mut u: [u8; 32] = data.try_into().unwrap_or([0; 32]);
        u[31] &= 0x7f;
        return !X25519_SMALL_ORDER.contains(&u);
    };
    let half = data.len() / 2;
    let (x, y) = (from_be(&data[..half]), from_be(&data[half..]));
    // Coordinates are field elements; the point at infinity has no affine encoding.
    if cmp(&x, &p) != std::cmp::Ordering::Less || cmp(&y, &p) != std::cmp::Ordering::Less {
        return false;
    }
    let lhs = mul_mod(&y, &y, &p);
    let x3 = mul_mod(&mul_mod(&x, &x, &p), &x, &p);
    // -3x = 3(p - x) mod p
    let mut neg_x = p;
    sub(&mut neg_x, &x);
    let neg_x = reduce(&neg_x, &p);
    let minus_3x = add_mod(&add_mod(&neg_x, &neg_x, &p), &neg_x, &p);
    let rhs = add_mod(&add_mod(&x3, &minus_3x, &p), &b, &p);
    lhs == rhs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ike::crypto::KeyShare;

    #[test]
    fn keys_of_each_group_are_valid_and_off_curve_values_are_not() {
        let rng = ring::rand::SystemRandom::new();
        for g in [Group::Ecp256, Group::Ecp384, Group::Curve25519] {
            for _ in 0..20 {
                let k = KeyShare::new(g, &rng).unwrap();
                assert!(valid_public(g, &k.public), "{g:?}");
                // Any change of y takes it off the curve (x has at most two ys: y and p - y).
                if g != Group::Curve25519 {
                    let mut bad = k.public.clone();
                    let last = bad.len() - 1;
                    bad[last] ^= 1;
                    assert!(!valid_public(g, &bad), "{g:?}");
                    // and ring, the one that would do the work, agrees.
                    let other = KeyShare::new(g, &rng).unwrap();
                    assert!(other.agree(&bad).is_err());
                }
            }
            if g != Group::Curve25519 {
                // (Every 32 octets are an X25519 u-coordinate: RFC 7748 accepts non-canonical
                // ones; only the small-order list is refused.)
                assert!(!valid_public(g, &vec![0xff; g.public_len()]));
            }
            assert!(!valid_public(g, &vec![0; g.public_len()]));
            assert!(!valid_public(g, &vec![0; g.public_len() + 1]));
            assert!(!valid_public(g, &[]));
        }
    }

    #[test]
    fn the_small_order_x25519_values_are_the_ones_ring_refuses() {
        let rng = ring::rand::SystemRandom::new();
        for u in X25519_SMALL_ORDER {
            for top in [0u8, 0x80] {
                let mut v = u;
                v[31] |= top;
                assert!(!valid_public(Group::Curve25519, &v), "{v:02x?}");
                let k = KeyShare::new(Group::Curve25519, &rng).unwrap();
                assert!(k.agree(&v).is_err(), "ring accepts {v:02x?}");
            }
        }
    }
}
