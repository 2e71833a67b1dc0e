//! Namespace tests of IKEv2 keying (issue 14): espip against strongSwan 5.9.8's charon
//! (kernel-libipsec: userspace ESP in UDP), as initiator and as responder, with each ESP
//! cipher and X25519, P-256 and P-384; and two espip daemons rekeying every 5 s under load.
//! The labs check every step themselves (`espip lab strongswan`, `espip lab ike`); here each
//! run must pass all of them, and the checks that matter are named.

mod common;
use common::*;

fn has_all(text: &str, checks: &[&str]) {
    for c in checks {
        assert!(text.contains(c), "missing {c:?} in:\n{text}");
    }
    assert!(text.contains(" 0 failed"), "{text}");
}

const WITH_STRONGSWAN: &[&str] = &[
    "[PASS] IKE SA and CHILD_SA up with strongSwan",
    "[PASS] ping espip -> strongSwan",
    "[PASS] ping strongSwan -> espip",
    " MB espip -> strongSwan: sent",
    " MB strongSwan -> espip: sent",
    "while both sides rekey: every hash equal",
    "[PASS] rekeys by both sides during 50 pings a second: none lost",
    " MB after the rekeys: sent",
    "[PASS] no replay or bad_icv drops at espip",
    "[PASS] clean stop: strongSwan receives espip's DELETE",
    "[PASS] a wrong pre-shared key fails with AUTHENTICATION_FAILED on both sides",
];

/// espip initiates; AES-128-GCM, X25519; dead peer detection when charon is killed, and the
/// tunnel back once it restarts; tshark decrypts IKE and ESP (every ICV good).
#[test]
fn strongswan_espip_initiates_aes128gcm_x25519_with_dpd() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&["strongswan", "--initiator", "espip"]);
    has_all(&t, WITH_STRONGSWAN);
    has_all(
        &t,
        &[
            "[PASS] DPD notices that strongSwan died",
            "[PASS] strongSwan restarted: the tunnel comes back",
            "[PASS] tshark decrypts every ESP packet with the exported SAs, ICVs good",
            "[PASS] tshark decrypts every IKE message with the exported IKE SA keys",
        ],
    );
}

/// strongSwan initiates, espip responds; ChaCha20-Poly1305 for IKE and ESP, P-256.
#[test]
fn strongswan_initiates_chacha20poly1305_ecp256() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&[
        "strongswan",
        "--initiator",
        "strongswan",
        "--ike",
        "chacha20poly1305-prfsha256-ecp256",
        "--esp",
        "chacha20poly1305",
        "--no-dpd",
    ]);
    has_all(&t, WITH_STRONGSWAN);
}

/// espip initiates; AES-256-GCM with PRF SHA-384 and P-384.
#[test]
fn strongswan_espip_initiates_aes256gcm_ecp384() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&[
        "strongswan",
        "--initiator",
        "espip",
        "--ike",
        "aes256gcm16-prfsha384-ecp384",
        "--esp",
        "aes256gcm16",
        "--no-dpd",
        "--megabytes",
        "5",
    ]);
    has_all(&t, WITH_STRONGSWAN);
    has_all(
        &t,
        &["[PASS] tshark decrypts every IKE message with the exported IKE SA keys"],
    );
}

/// espip to espip for 60 s with a CHILD_SA rekey every 5 s (64-bit ESN negotiated): every
/// transfer's hash equal, no lost ping, zero replay and bad_icv drops, the SPIs changing in
/// the capture, tshark decrypting IKE and ESP with the exported keys; then 30 s of
/// IKE_SA_INIT flood at the responder while the initiator restarts and reconnects.
#[test]
fn espip_to_espip_rekeying_every_5_s_for_60_s() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&["ike", "--seconds", "60", "--rekey", "5", "--flood", "30"]);
    has_all(
        &t,
        &[
            "[PASS] IKE SA and CHILD_SA up on both sides",
            "while rekeying: every hash equal",
            "[PASS] CHILD_SA rekeyed every ~5 s",
            "[PASS] 50 pings a second through the rekeys: none lost",
            "[PASS] no replay or bad_icv drops",
            "[PASS] clean stop: A's DELETE reaches B",
            "[PASS] the capture shows the SPIs changing",
            "[PASS] tshark decrypts every ESP packet",
            "[PASS] tshark decrypts every IKE message",
            "[PASS] IKE_SA_INIT flood of 30 s at B: cookies, bounded memory, A reconnects during it",
        ],
    );
}

/// ESP as IP protocol 50 between two espip daemons (no NAT, no encapsulation), without ESN
/// so that tshark checks every ICV.
#[test]
fn espip_to_espip_over_protocol_50_without_esn() {
    let Some(_g) = serial() else { return };
    let t = lab_scenario(&[
        "ike",
        "--mode",
        "esp",
        "--esp",
        "aes128gcm16-noesn",
        "--seconds",
        "12",
        "--rekey",
        "4",
        "--flood",
        "0",
    ]);
    has_all(
        &t,
        &[
            "[PASS] 50 pings a second through the rekeys: none lost",
            "[PASS] tshark decrypts every ESP packet with the exported SAs, ICVs good",
        ],
    );
}
