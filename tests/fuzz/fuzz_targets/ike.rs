//! IKEv2: any datagram into the engine, as it arrives (a fresh responder: IKE_SA_INIT and
//! what follows it) and, structure-aware, as the decrypted payload chain of an authentic
//! request on an established IKE SA (the fuzzer's bytes sealed with the real SK_ei, so the
//! state machine's request handling is reached past the ICV). Never a panic; a message
//! never makes the engine send on an SA the other side does not hold.
#![no_main]

use espip::ike::engine::{Engine, IkeConfig, Out, Role};
use espip::ike::msg::{self, Id};
use espip::ike::proposal::{EspProposal, IkeProposal};
use espip::ike::ts;
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use std::net::SocketAddr;

fn cfg(role: Role, me: &str, peer: &str) -> IkeConfig {
    let a = me == "192.0.2.1";
    IkeConfig {
        name: "fuzz".into(),
        role,
        psk: zeroize::Zeroizing::new(b"fuzz-pre-shared-key-0123456789".to_vec()),
        local_id: Id::from_config(if a { "a.lab" } else { "b.lab" }),
        remote_id: Id::from_config(if a { "b.lab" } else { "a.lab" }),
        ike: vec![IkeProposal::parse("aes128gcm16-prfsha256-x25519").unwrap()],
        esp: vec![EspProposal::parse("aes128gcm16-x25519").unwrap()],
        ike_rekey_ms: 0,
        child_rekey_ms: 0,
        child_life_ms: 0,
        jitter_ms: 0,
        dpd_ms: 0,
        retransmit_ms: 500,
        retransmit_tries: 2,
        local_ts: vec![ts::from_prefix(&if a { "10.0.0.1/32" } else { "10.0.0.2/32" }.parse().unwrap())],
        remote_ts: vec![ts::from_prefix(&if a { "10.0.0.2/32" } else { "10.0.0.1/32" }.parse().unwrap())],
        remote: SocketAddr::new(peer.parse().unwrap(), 500),
        local: me.parse().unwrap(),
        local_port: 500,
        natt_port: 4500,
        remote_natt_port: 4500,
        force_encap: true,
        lobby: None,
        mobike: false,
    }
}

const A: &str = "192.0.2.1";
const B: &str = "192.0.2.2";

/// Deliver everything `outs` sends to the other engine until nothing is left.
fn pump(a: &mut Engine, b: &mut Engine, first: Vec<Out>, rng: &SystemRandom) {
    let mut queue: Vec<(bool, Vec<u8>)> = first
        .into_iter()
        .filter_map(|o| match o {
            Out::Send { msg, .. } => Some((true, msg)),
            _ => None,
        })
        .collect();
    let mut n = 0;
    while let Some((to_b, m)) = queue.pop() {
        n += 1;
        if n > 50 {
            break;
        }
        let outs = if to_b {
            b.handle(&m, SocketAddr::new(A.parse().unwrap(), 4500), true, 1, rng)
        } else {
            a.handle(&m, SocketAddr::new(B.parse().unwrap(), 4500), true, 1, rng)
        };
        for o in outs {
            if let Out::Send { msg, .. } = o {
                queue.push((!to_b, msg));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = msg::parse_header(data) {
        let _ = msg::parse_chain(data, msg::HDR_LEN, h.next);
    }
    let rng = SystemRandom::new();
    let from = SocketAddr::new(A.parse().unwrap(), 500);
    // A fresh responder, the bytes as they came.
    let mut fresh = Engine::new(cfg(Role::Responder, B, A));
    let _ = fresh.handle(data, from, false, 0, &rng);
    let _ = fresh.handle(data, SocketAddr::new(A.parse().unwrap(), 4500), true, 0, &rng);
    let _ = fresh.tick(1_000_000_000, &rng);
    // A lobby (responders without endpoint): the same bytes from an address no peer names.
    let mut lobby_cfg = cfg(Role::Responder, B, "0.0.0.0");
    lobby_cfg.lobby = Some(vec![Id::from_config("a.lab")]);
    let mut lobby = Engine::new(lobby_cfg);
    let stranger = SocketAddr::new("198.51.100.9".parse().unwrap(), 4500);
    for natt in [false, true] {
        for o in lobby.handle(data, stranger, natt, 0, &rng) {
            if let Out::Handoff { spis, .. } = o {
                let _ = lobby.hand_over(spis);
            }
        }
    }
    if data.len() < 4 {
        return;
    }
    // An established pair; the bytes as the payloads of the initiator's next request.
    let mut a = Engine::new(cfg(Role::Initiator, A, B));
    let mut b = Engine::new(cfg(Role::Responder, B, A));
    let first = a.tick(0, &rng);
    pump(&mut a, &mut b, first, &rng);
    let Some((spi_i, spi_r, sk_ei, _)) = b.ike_keys().into_iter().next() else {
        return;
    };
    let exchange = 34 + data[0] % 4;
    let first_payload = data[1];
    let msg_id = 1 + u32::from(data[2] % 3);
    let response = data[3] & 0x20;
    let body = &data[4..];
    let mut m = Vec::with_capacity(64 + body.len());
    m.extend_from_slice(&spi_i.to_be_bytes());
    m.extend_from_slice(&spi_r.to_be_bytes());
    m.extend_from_slice(&[msg::kind::SK, 0x20, exchange, msg::flags::INITIATOR | response]);
    m.extend_from_slice(&msg_id.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    let sk = m.len();
    m.extend_from_slice(&[first_payload, 0, 0, 0]);
    m.extend_from_slice(&7u64.to_be_bytes());
    m.extend_from_slice(body);
    m.push(0); // pad length
    let total = m.len() + 16;
    m[24..28].copy_from_slice(&(total as u32).to_be_bytes());
    let sk_len = (total - sk) as u16;
    m[sk + 2..sk + 4].copy_from_slice(&sk_len.to_be_bytes());
    let (aad, rest) = m.split_at_mut(sk + 4);
    let tag = espip::sa::Aead::new(&sk_ei).seal(7u64.to_be_bytes(), aad, &mut rest[8..]);
    m.extend_from_slice(&tag);
    let outs = b.handle(&m, SocketAddr::new(A.parse().unwrap(), 4500), true, 2, &rng);
    let mut back = Vec::new();
    for o in outs {
        if let Out::Send { msg, .. } = o {
            back.push(msg);
        }
    }
    for m in back {
        let _ = a.handle(&m, SocketAddr::new(B.parse().unwrap(), 4500), true, 3, &rng);
    }
    // Whatever happened, what B sends on, A accepts.
    let (sa, sb) = (a.sas(), b.sas());
    if let Some(out) = sb.out {
        assert!(
            sa.ins.iter().any(|c| c.spi_in == out.spi_out) || sa.ins.is_empty(),
            "B sends on an SA A does not hold"
        );
    }
    let _ = b.tick(10_000_000_000, &rng);
});
