//! Persisted sequence number reservations, so that a restarted daemon never sends a sequence
//! number (and so never an AES-GCM/ChaCha20 nonce) twice under the same key.
//!
//! One file per *key*, not per SPI or interface: the nonce is salt || sequence number, so what
//! must never repeat is a (key, sequence number) pair. `<state_dir>/key-<fingerprint>.seq`
//! holds two fixed-size slots; each names the key's fingerprint, a generation and the highest
//! sequence number reserved, and carries a SHA-256 check. A save writes the same value to both
//! slots, one after the other, each with `pwrite` and `fdatasync`, and nothing sends under a
//! new reservation before both are written. So either slot alone is a safe upper bound of what
//! was sent: a crash in the middle of a write leaves the other slot intact with the previous
//! value (nothing was sent above it yet), and damage to one slot later (a partial overwrite,
//! a flipped byte) leaves the other with the same value. A start takes the highest value of
//! the valid slots. Files of other keys stay: several coexist, and going back to an earlier
//! key resumes after its own reservation.
//!
//! Before an SA sends, a block of [`RESERVE`] numbers is saved; the core refuses to go past it
//! (`DropReason::SeqUnreserved`); the TX thread extends the reservation when half of it is
//! used. A restart resumes after the reservation (at most one block is skipped, never reused).
//! A clean stop records the last number actually sent.
//!
//! Trust: the directory is a [`PrivateDir`] (root's alone) and each file is opened by root at
//! start and kept open; the daemon writes through that descriptor after it dropped root, so the
//! unprivileged user never has a path to the files. A file that exists but cannot be read, is
//! not root's, or whose slots are both corrupt, stops the start: resuming at 1 could reuse
//! nonces, so the error names the file and the way out (new keys). Each key file is locked
//! (`flock`) while in use: two daemons sending under one key would reuse nonces too.
//!
//! Files of espip before 0.2 (`<interface>-<spi>.seq`, text `v1 <fp> <n>`, in a directory the
//! unprivileged user could write) are read only as a lower bound: they can move the start up,
//! never down, and a garbled one for a key without a new-style file stops the start.

use super::safefs::PrivateDir;
use nix::fcntl::{Flock, FlockArg};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Sequence numbers reserved per write. Tuning constant: 2^22 lasts about 4 s at a million
/// packets per second, so the TX thread writes and syncs a small file every few seconds at
/// most; a crash skips at most 2^22 numbers, about 1/1000 of the 32-bit space.
pub const RESERVE: u64 = 1 << 22;

/// Slot layout: magic (8) | fingerprint (8) | generation (8, BE) | reserved (8, BE) |
/// SHA-256 of the first 32 bytes, truncated (16).
const MAGIC: &[u8; 8] = b"espipSQ2";
const SLOT_LEN: usize = 48;
/// Slot `i` starts at `i * SLOT_STRIDE`.
const SLOT_STRIDE: u64 = 64;
/// The file is exactly two slots long.
const FILE_LEN: u64 = SLOT_STRIDE + SLOT_LEN as u64;
/// Largest legacy file read (a `v1` line is under 60 bytes).
const LEGACY_MAX: u64 = 256;

/// Why the sequence state cannot be trusted; the daemon refuses to start on any of these.
#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    /// A file exists but its content proves nothing.
    #[error("{path}: the sequence state of key {fp} is corrupt ({why}); resuming at 1 could reuse AES-GCM/ChaCha20 nonces. Make new keys for this SA on both ends (`espip genkey`), or, only if the peer has never received a packet under this key, remove the file")]
    Corrupt {
        /// The file.
        path: String,
        /// Key fingerprint.
        fp: String,
        /// What is wrong.
        why: String,
    },
    /// Another process holds the key's lock.
    #[error("{path}: key {fp} is in use by another running espip; two daemons (or two SAs) sending under one key would reuse nonces: give each SA its own key")]
    InUse {
        /// The file.
        path: String,
        /// Key fingerprint.
        fp: String,
    },
    /// The OS refused.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn check(body: &[u8]) -> [u8; 16] {
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    d.as_ref()[..16].try_into().expect("16 of 32 bytes")
}

fn fp_bytes(fp: &str) -> Option<[u8; 8]> {
    if fp.len() != 16 {
        return None;
    }
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(fp.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One slot's bytes.
fn encode(fp: [u8; 8], generation: u64, reserved: u64) -> [u8; SLOT_LEN] {
    let mut s = [0u8; SLOT_LEN];
    s[..8].copy_from_slice(MAGIC);
    s[8..16].copy_from_slice(&fp);
    s[16..24].copy_from_slice(&generation.to_be_bytes());
    s[24..32].copy_from_slice(&reserved.to_be_bytes());
    let c = check(&s[..32]);
    s[32..].copy_from_slice(&c);
    s
}

/// (generation, reserved) of a valid slot for `fp`.
fn decode(s: &[u8], fp: [u8; 8]) -> Option<(u64, u64)> {
    if s.len() < SLOT_LEN || &s[..8] != MAGIC || s[8..16] != fp || check(&s[..32]) != s[32..48] {
        return None;
    }
    let g = u64::from_be_bytes(s[16..24].try_into().ok()?);
    let r = u64::from_be_bytes(s[24..32].try_into().ok()?);
    Some((g, r))
}

/// (newest generation, highest reservation) of the valid slots of a whole file's bytes. The
/// highest reservation, not the newest slot's: each slot alone bounds what was sent (see the
/// module documentation), so the highest is safe whichever slot was damaged.
fn newest(bytes: &[u8], fp: [u8; 8]) -> Option<(u64, u64)> {
    let valid: Vec<(u64, u64)> = [0usize, SLOT_STRIDE as usize]
        .iter()
        .filter_map(|&o| bytes.get(o..).and_then(|s| decode(s, fp)))
        .collect();
    let g = valid.iter().map(|&(g, _)| g).max()?;
    let r = valid.iter().map(|&(_, r)| r).max()?;
    Some((g, r))
}

/// The reservation recorded for key `fp` in `dir`, read without taking the key's lock (for
/// diagnostics and tests; a running daemon may be writing it).
pub fn peek(dir: &std::path::Path, fp: &str) -> io::Result<Option<u64>> {
    let fpb = fp_bytes(fp).ok_or_else(|| io::Error::other("not a key fingerprint"))?;
    let bytes = match std::fs::read(dir.join(format!("key-{fp}.seq"))) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(newest(&bytes, fpb).map(|(_, r)| r))
}

/// An open key file.
#[derive(Debug)]
struct KeyFile {
    /// Locked (`flock`) while this daemon runs: unlocked by the kernel when it exits.
    file: Flock<File>,
    generation: u64,
    /// The reservation last saved.
    reserved: u64,
}

/// The key files of one daemon, opened as root and kept open.
#[derive(Debug)]
pub struct SeqStore {
    dir: PrivateDir,
    iface: String,
    open: HashMap<String, KeyFile>,
}

impl SeqStore {
    /// Use `dir` (root's alone, created 0700 if absent).
    pub fn open(dir: &std::path::Path, iface: &str) -> io::Result<SeqStore> {
        Ok(SeqStore {
            dir: PrivateDir::open(dir)?,
            iface: iface.to_string(),
            open: HashMap::new(),
        })
    }

    fn name(fp: &str) -> String {
        format!("key-{fp}.seq")
    }

    /// Open (or create) the file of key `fp`, lock it, and return the reservation saved in it,
    /// if any. `spi` is only used to find a legacy file. Refuses corrupt, foreign or locked
    /// state (see the module documentation).
    pub fn load(&mut self, spi: u32, fp: &str) -> Result<Option<u64>, SeqError> {
        let (file, saved) = self.open_key(spi, fp)?;
        self.adopt(fp, file)?;
        Ok(saved)
    }

    /// Open (or create) the file of key `fp` without locking it, and return the reservation
    /// saved in it (or in a legacy file), if any. `espip reload` does this as root and hands
    /// the descriptor to the daemon, which [`SeqStore::adopt`]s it.
    pub fn open_key(&self, spi: u32, fp: &str) -> Result<(File, Option<u64>), SeqError> {
        let name = Self::name(fp);
        let path = self.dir.join(&name).display().to_string();
        let fpb = fp_bytes(fp).ok_or_else(|| SeqError::Corrupt {
            path: path.clone(),
            fp: fp.into(),
            why: "not a key fingerprint".into(),
        })?;
        let legacy = self.legacy(spi, fp)?;
        let file = match self.dir.open_existing(&name, FILE_LEN) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let mut init = vec![0u8; FILE_LEN as usize];
                init[..SLOT_LEN].copy_from_slice(&encode(fpb, 0, 0));
                self.dir.create(&name, &init, 0o600)?
            }
            Err(e) => {
                return Err(SeqError::Corrupt {
                    path,
                    fp: fp.into(),
                    why: e.to_string(),
                })
            }
        };
        let (_, saved) = Self::read_state(&file, fp, &path)?;
        let saved = match (saved, legacy) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok((file, saved.filter(|&r| r > 0)))
    }

    /// The newest valid slot of an open key file: (generation, reserved).
    fn read_state(file: &File, fp: &str, path: &str) -> Result<(u64, Option<u64>), SeqError> {
        let corrupt = |why: String| SeqError::Corrupt {
            path: path.to_string(),
            fp: fp.into(),
            why,
        };
        let fpb = fp_bytes(fp).ok_or_else(|| corrupt("not a key fingerprint".into()))?;
        let mut bytes = vec![0u8; FILE_LEN as usize];
        let n = file
            .read_at(&mut bytes, 0)
            .map_err(|e| corrupt(format!("unreadable: {e}")))?;
        bytes.truncate(n);
        match newest(&bytes, fpb) {
            Some((g, r)) => Ok((g, Some(r))),
            None => Err(corrupt("no valid slot".into())),
        }
    }

    /// Lock the key file `file` of key `fp` (opened by [`SeqStore::open_key`], here or by
    /// root in `espip reload`) and keep it for saves. Its slots are read again here: the
    /// generation continues from the file itself.
    pub fn adopt(&mut self, fp: &str, file: File) -> Result<Option<u64>, SeqError> {
        let path = self.path(fp).display().to_string();
        let (generation, saved) = Self::read_state(&file, fp, &path)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err(_) => {
                return Err(SeqError::InUse {
                    path,
                    fp: fp.into(),
                })
            }
        };
        self.open.insert(
            fp.to_string(),
            KeyFile {
                file,
                generation,
                reserved: saved.unwrap_or(0),
            },
        );
        Ok(saved.filter(|&r| r > 0))
    }

    /// Whether the file of key `fp` is open (and locked) here.
    pub fn holds(&self, fp: &str) -> bool {
        self.open.contains_key(fp)
    }

    /// The reservation last saved for key `fp` here.
    pub fn reserved(&self, fp: &str) -> Option<u64> {
        self.open.get(fp).map(|k| k.reserved)
    }

    /// Close (and unlock) the files of keys `keep` rejects: keys no SA uses any more. What
    /// they hold stays: a key used again later resumes after it.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.open.retain(|fp, _| keep(fp));
    }

    /// A pre-0.2 file of this interface and SPI, as a lower bound (see the module docs).
    fn legacy(&self, spi: u32, fp: &str) -> Result<Option<u64>, SeqError> {
        let name = format!("{}-{spi:08x}.seq", self.iface);
        let path = self.dir.join(&name).display().to_string();
        let text = match self.dir.read(&name, LEGACY_MAX) {
            Ok(None) => return Ok(None),
            Ok(Some(t)) => t,
            // Not root's, a link, too large: it proves nothing, and may be the only record.
            Err(e) => {
                return if self
                    .dir
                    .read(&Self::name(fp), FILE_LEN)
                    .is_ok_and(|f| f.is_some())
                {
                    Ok(None)
                } else {
                    Err(SeqError::Corrupt {
                        path,
                        fp: fp.into(),
                        why: format!("an earlier version's file that cannot be trusted: {e}"),
                    })
                };
            }
        };
        let text = String::from_utf8_lossy(&text);
        let mut parts = text.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some("v1"), Some(f), Some(n)) if f == fp => match n.parse::<u64>() {
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(SeqError::Corrupt {
                    path,
                    fp: fp.into(),
                    why: format!("an earlier version's file with sequence {n:?}"),
                }),
            },
            (Some("v1"), Some(_), Some(_)) => Ok(None),
            _ if self
                .dir
                .read(&Self::name(fp), FILE_LEN)
                .is_ok_and(|f| f.is_some()) =>
            {
                Ok(None)
            }
            _ => Err(SeqError::Corrupt {
                path,
                fp: fp.into(),
                why: "an earlier version's file in an unknown format".into(),
            }),
        }
    }

    /// Durably record that sequence numbers up to `reserved` may have been used under key
    /// `fp` (loaded before). Writes through the descriptor opened at start: works after the
    /// privilege drop, needs no new descriptor.
    pub fn save(&mut self, fp: &str, reserved: u64) -> io::Result<()> {
        let Some(k) = self.open.get_mut(fp) else {
            return Err(io::Error::other(format!(
                "key {fp}: sequence state was not loaded"
            )));
        };
        let fpb = fp_bytes(fp).ok_or_else(|| io::Error::other("not a key fingerprint"))?;
        // Both slots, each durable before the next: a crash between leaves one slot with the
        // new value and one with the old, and nothing was sent above the old one yet.
        for g in [k.generation + 1, k.generation + 2] {
            let slot = encode(fpb, g, reserved);
            k.file.write_all_at(&slot, (g % 2) * SLOT_STRIDE)?;
            k.file.sync_data()?;
            k.generation = g;
        }
        k.reserved = reserved;
        Ok(())
    }

    /// The file of key `fp` (for messages).
    pub fn path(&self, fp: &str) -> std::path::PathBuf {
        self.dir.join(&Self::name(fp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const FP_A: &str = "00112233445566aa";
    const FP_B: &str = "00112233445566bb";

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("espip-seq-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_load_and_several_keys_coexist() {
        let dir = scratch("keys");
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(
            s.load(0x1001, FP_A).unwrap(),
            None,
            "a new key starts fresh"
        );
        s.save(FP_A, 4_194_304).unwrap();
        s.save(FP_A, 8_388_608).unwrap();
        drop(s);
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(
            s.load(0x1001, FP_B).unwrap(),
            None,
            "another key starts fresh"
        );
        s.save(FP_B, 7).unwrap();
        drop(s);
        // Back to the first key: its own reservation, not the other key's.
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(s.load(0x1001, FP_A).unwrap(), Some(8_388_608));
        assert_eq!(s.load(0x1001, FP_B).unwrap(), Some(7));
        let mode = std::fs::metadata(dir.join(format!("key-{FP_A}.seq")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_write_falls_back_to_the_other_slot() {
        let dir = scratch("torn");
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        s.load(0x1001, FP_A).unwrap();
        s.save(FP_A, 100).unwrap();
        drop(s);
        let f = dir.join(format!("key-{FP_A}.seq"));
        let saved = std::fs::read(&f).unwrap();
        // A crash while the next reservation (200) was written: its first slot torn, the
        // other still the previous value; nothing was sent above 100 yet.
        let mut b = saved.clone();
        b[..SLOT_LEN].copy_from_slice(&encode(fp_bytes(FP_A).unwrap(), 3, 200));
        b[30] ^= 0xff;
        std::fs::write(&f, &b).unwrap();
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(s.load(0x1001, FP_A).unwrap(), Some(100));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 28 item 8: damage to any one byte of either slot never moves the start below
    /// what was reserved; on 6c363c3 a flipped byte in the newest slot fell back to the older
    /// slot's lower value (nonces reused).
    #[test]
    fn damage_to_either_slot_never_rolls_the_counter_back() {
        let dir = scratch("damage");
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        s.load(0x1001, FP_A).unwrap();
        s.save(FP_A, 4_194_304).unwrap();
        s.save(FP_A, 8_388_608).unwrap();
        // A clean stop records the last number sent (below the reservation).
        s.save(FP_A, 5_000_000).unwrap();
        s.save(FP_A, 12_582_912).unwrap();
        drop(s);
        let f = dir.join(format!("key-{FP_A}.seq"));
        let saved = std::fs::read(&f).unwrap();
        for at in 0..saved.len() {
            let mut b = saved.clone();
            b[at] ^= 0x5a;
            std::fs::write(&f, &b).unwrap();
            let mut s = SeqStore::open(&dir, "espip0").unwrap();
            let got = s.load(0x1001, FP_A).unwrap();
            assert_eq!(got, Some(12_582_912), "byte {at} flipped");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_truncation_and_foreign_files_refuse_to_start() {
        let dir = scratch("garbage");
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        s.load(0x1001, FP_A).unwrap();
        s.save(FP_A, 100).unwrap();
        drop(s);
        let f = dir.join(format!("key-{FP_A}.seq"));
        for bad in [&b"garbage"[..], &[][..], &[0u8; 112][..]] {
            std::fs::write(&f, bad).unwrap();
            let mut s = SeqStore::open(&dir, "espip0").unwrap();
            let e = s.load(0x1001, FP_A).unwrap_err();
            assert!(matches!(e, SeqError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains("espip genkey"), "{e}");
        }
        // A file of this key's name holding another key's slots is corrupt too.
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        s.load(0x1001, FP_B).unwrap();
        s.save(FP_B, 5).unwrap();
        drop(s);
        std::fs::copy(dir.join(format!("key-{FP_B}.seq")), &f).unwrap();
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert!(matches!(
            s.load(0x1001, FP_A).unwrap_err(),
            SeqError::Corrupt { .. }
        ));
        // Not root's (the unprivileged user made it): refused.
        std::fs::remove_file(&f).unwrap();
        std::fs::write(&f, encode(fp_bytes(FP_A).unwrap(), 1, 1)).unwrap();
        nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert!(s
            .load(0x1001, FP_A)
            .unwrap_err()
            .to_string()
            .contains("uid 65534"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_in_use_is_refused() {
        let dir = scratch("lock");
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        s.load(0x1001, FP_A).unwrap();
        let mut t = SeqStore::open(&dir, "espip1").unwrap();
        assert!(matches!(
            t.load(0x2001, FP_A).unwrap_err(),
            SeqError::InUse { .. }
        ));
        drop(s);
        t.load(0x2001, FP_A).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn legacy_files_only_raise_the_start() {
        let dir = scratch("legacy");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let legacy = dir.join("espip0-00001001.seq");
        std::fs::write(&legacy, format!("v1 {FP_A} 5000\n")).unwrap();
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(s.load(0x1001, FP_A).unwrap(), Some(5000), "migrated");
        s.save(FP_A, 9000).unwrap();
        drop(s);
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(s.load(0x1001, FP_A).unwrap(), Some(9000), "never lowered");
        drop(s);
        // Another key's legacy file: ignored.
        std::fs::write(&legacy, format!("v1 {FP_B} 5000\n")).unwrap();
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(s.load(0x1001, FP_A).unwrap(), Some(9000));
        drop(s);
        // Garbage legacy and no new file for this key: refuse (issue 16 item 2a).
        std::fs::remove_file(dir.join(format!("key-{FP_A}.seq"))).unwrap();
        std::fs::write(&legacy, b"\x00\x17garbage").unwrap();
        let mut s = SeqStore::open(&dir, "espip0").unwrap();
        assert!(matches!(
            s.load(0x1001, FP_A).unwrap_err(),
            SeqError::Corrupt { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
