//! Path probes: the authenticated echo request and reply each path carries, and what their
//! round trips tell.

use super::*;

/// Whether an [`Probe`] asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Sent every probe interval on each path.
    Probe = 1,
    /// The answer, on the path the probe came from.
    Echo = 2,
}

/// The payload of a probe or echo inside an ESP dummy packet (next header 59):
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |              magic "eMP1" (0x654d5031)                        |
/// +---------------+---------------+-------------------------------+
/// |  kind (1, 2)  | prober's path |          reserved (0)         |
/// +---------------+---------------+-------------------------------+
/// |                probe identifier (64 bits)                     |
/// +                                                               +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |          prober's send time, nanoseconds (64 bits)            |
/// +                                                               +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |  inner bytes the prober had sent on the path (64 bits,        |
/// +            echoed unchanged)                                  +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |  echo: inner bytes the answering side received on the path    |
/// +            the probe came by (probe: 0) (64 bits)             +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |  probe: the sequence numbers of this round's probes on the    |
/// +  other paths, 64 bits each, at most 8 (the skip list);        +
/// |  echo: the answering side's arrival time of the probe,        |
/// +  nanoseconds on its own clock (64 bits; absent from espip     +
/// |  before 2026-12-06, which answers with no field here)         |
/// +---------------------------------------------------------------+
/// ```
///
/// The prober's clock never leaves its own host in any other sense: the echo returns the
/// timestamp unchanged, so no clock synchronisation is assumed. The answering side's arrival
/// time is read only as differences between its own echoes (a capacity train's spacing at the
/// far end, [`train`](super::train)), never against the prober's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Probe or echo.
    pub kind: ProbeKind,
    /// The prober's path index.
    pub path: u8,
    /// Identifier.
    pub id: u64,
    /// The prober's send time.
    pub sent: u64,
    /// Bytes the prober had sent on the path when it sent the probe (echoed back unchanged).
    pub tx_bytes: u64,
    /// Echo: bytes received on the path.
    pub rx_bytes: u64,
    /// Probe: the sequence numbers of the probes sent on the other paths in the same round
    /// (the first `skipped` entries), so a receiver whose reorder stage misses them (a path is
    /// down) need not wait for them.
    pub skip: [u64; MAX_PATHS],
    /// Entries of `skip` in use.
    pub skipped: u8,
    /// Echo: when the probe arrived at the answering side, on its clock (0: not given).
    pub arrived: u64,
}

impl Probe {
    /// Bytes on the wire (inside ESP) without the skip list; each entry adds 8.
    pub const LEN: usize = 40;

    /// A probe or echo with no skip list.
    pub fn new(kind: ProbeKind, path: u8, id: u64, sent: u64, rx_bytes: u64) -> Probe {
        Probe {
            kind,
            path,
            id,
            sent,
            tx_bytes: 0,
            rx_bytes,
            skip: [0; MAX_PATHS],
            skipped: 0,
            arrived: 0,
        }
    }

    /// Its length on the wire.
    pub fn len(&self) -> usize {
        match self.kind {
            ProbeKind::Probe => Probe::LEN + 8 * usize::from(self.skipped),
            ProbeKind::Echo if self.arrived != 0 => Probe::LEN + 8,
            ProbeKind::Echo => Probe::LEN,
        }
    }

    /// Never: a probe has at least its fixed fields.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The skip list in use.
    pub fn skipped(&self) -> &[u64] {
        &self.skip[..usize::from(self.skipped).min(MAX_PATHS)]
    }
    const MAGIC: [u8; 4] = *b"eMP1";
    /// The kind byte of a capacity train's filler ([`train`](super::train)): the magic, this
    /// kind, the prober's path, then zeros to [`FILL_LEN`](super::train::FILL_LEN) bytes.
    pub const FILL_KIND: u8 = 4;

    /// Write a filler of a train on path `path` into `out` (all of it).
    pub fn emit_fill(path: u8, out: &mut [u8]) {
        out.fill(0);
        out[0..4].copy_from_slice(&Probe::MAGIC);
        out[4] = Probe::FILL_KIND;
        out[5] = path;
    }

    /// Whether `b` is a train's filler.
    pub fn is_fill(b: &[u8]) -> bool {
        b.len() >= 8 && b[0..4] == Probe::MAGIC && b[4] == Probe::FILL_KIND
    }

    /// Write the payload into `out` (at least [`Probe::len`] bytes).
    pub fn emit(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&Probe::MAGIC);
        out[4] = self.kind as u8;
        out[5] = self.path;
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&self.id.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent.to_be_bytes());
        out[24..32].copy_from_slice(&self.tx_bytes.to_be_bytes());
        out[32..40].copy_from_slice(&self.rx_bytes.to_be_bytes());
        match self.kind {
            ProbeKind::Probe => {
                for (i, s) in self.skipped().iter().enumerate() {
                    out[40 + 8 * i..48 + 8 * i].copy_from_slice(&s.to_be_bytes());
                }
            }
            ProbeKind::Echo if self.arrived != 0 => {
                out[40..48].copy_from_slice(&self.arrived.to_be_bytes())
            }
            ProbeKind::Echo => {}
        }
    }

    /// Read a payload; `None` for anything else (another implementation's dummy packet, TFC
    /// padding).
    pub fn parse(b: &[u8]) -> Option<Probe> {
        let extra = b.len().checked_sub(Probe::LEN)?;
        if extra % 8 != 0 || extra / 8 > MAX_PATHS || b[0..4] != Probe::MAGIC || b[6..8] != [0, 0] {
            return None;
        }
        let kind = match b[4] {
            1 => ProbeKind::Probe,
            2 => ProbeKind::Echo,
            _ => return None,
        };
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let mut p = Probe::new(kind, b[5], u64_at(8), u64_at(16), u64_at(32));
        p.tx_bytes = u64_at(24);
        match kind {
            ProbeKind::Probe => {
                for i in 0..extra / 8 {
                    p.skip[i] = u64_at(40 + 8 * i);
                }
                p.skipped = (extra / 8) as u8;
            }
            // An echo's first field after the fixed ones is the arrival time; more are
            // ignored (room for later fields).
            ProbeKind::Echo if extra >= 8 => p.arrived = u64_at(40),
            ProbeKind::Echo => {}
        }
        Some(p)
    }
}
