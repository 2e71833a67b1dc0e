//! Persisted sequence number reservations, so that a restarted daemon never sends a sequence
//! number (and so never an AES-GCM/ChaCha20 nonce) twice under the same key.
//!
//! For each outbound SA the file `<state_dir>/<interface>-<spi>.seq` holds the key's
//! fingerprint and the highest sequence number reserved. Before an SA sends, a block of
//! [`RESERVE`] numbers is written and synced; the core refuses to go past it
//! (`DropReason::SeqUnreserved`); the TX thread extends the reservation when half of it is used.
//! A restart resumes after the reservation (at most one block is skipped, never reused). A
//! clean stop records the last number actually sent. A new key (another fingerprint) starts
//! at 1 again.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Sequence numbers reserved per write. Tuning constant: 2^22 lasts about 4 s at a million
/// packets per second, so the TX thread writes and syncs a small file every few seconds at
/// most; a crash skips at most 2^22 numbers, about 1/1000 of the 32-bit space.
pub const RESERVE: u64 = 1 << 22;

/// The state files of one interface.
#[derive(Debug, Clone)]
pub struct SeqStore {
    dir: PathBuf,
    iface: String,
}

impl SeqStore {
    /// Use (and create, mode 0700) `dir`.
    pub fn open(dir: &Path, iface: &str) -> io::Result<SeqStore> {
        std::fs::create_dir_all(dir)?;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o022 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(SeqStore {
            dir: dir.to_path_buf(),
            iface: iface.to_string(),
        })
    }

    fn path(&self, spi: u32) -> PathBuf {
        self.dir.join(format!("{}-{spi:08x}.seq", self.iface))
    }

    /// The reservation saved for `spi` under key fingerprint `fp`, if any.
    pub fn load(&self, spi: u32, fp: &str) -> io::Result<Option<u64>> {
        let text = match std::fs::read_to_string(self.path(spi)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut parts = text.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some("v1"), Some(f), Some(n)) if f == fp => n.parse().map(Some).map_err(|_| {
                io::Error::other(format!(
                    "{}: corrupt sequence state",
                    self.path(spi).display()
                ))
            }),
            _ => Ok(None),
        }
    }

    /// Durably record that sequence numbers up to `reserved` may have been used.
    pub fn save(&self, spi: u32, fp: &str, reserved: u64) -> io::Result<()> {
        let path = self.path(spi);
        let tmp = path.with_extension("seq.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "v1 {fp} {reserved}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_key_change() {
        let dir = std::env::temp_dir().join(format!("espip-seq-{}", std::process::id()));
        let s = SeqStore::open(&dir, "espip0").unwrap();
        assert_eq!(s.load(0x1001, "aa").unwrap(), None);
        s.save(0x1001, "aa", 4_194_304).unwrap();
        assert_eq!(s.load(0x1001, "aa").unwrap(), Some(4_194_304));
        assert_eq!(
            s.load(0x1001, "bb").unwrap(),
            None,
            "another key starts fresh"
        );
        assert_eq!(s.load(0x1002, "aa").unwrap(), None);
        let mode = std::fs::metadata(dir.join("espip0-00001001.seq"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
