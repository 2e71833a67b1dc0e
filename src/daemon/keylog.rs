//! `interface.save_keys`: every SA's keys appended to Wireshark's `esp_sa` and
//! `ikev2_decryption_table` files as the SA comes up (strongSwan's `save-keys` plugin does the
//! same). A debugging aid: whoever reads these files decrypts the traffic, forward secrecy
//! included.
//!
//! The directory must be private to root ([`PrivateDir`]); both files are created fresh
//! (`O_EXCL | O_NOFOLLOW`, mode 0600) before the daemon drops its privileges and written
//! through the descriptors it keeps. A line is appended the moment the SA it keys exists
//! (after each IKE message or timer that changed something), so an SA that lives for a
//! millisecond (the loser of a rekey collision) is in the file too.

use crate::control::Live;
use crate::sys::safefs::PrivateDir;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Wireshark's name for the ESP SA table.
pub const ESP_FILE: &str = "esp_sa";
/// Wireshark's name for the IKEv2 decryption table.
pub const IKE_FILE: &str = "ikev2_decryption_table";

/// The two open files and what is in them.
pub struct KeyLog {
    esp: File,
    ike: File,
    /// SHA-256 of each line written (not the lines: they hold keys).
    written: HashSet<[u8; 32]>,
}

impl KeyLog {
    /// Open `dir` (private to root) and start both files afresh.
    pub fn open(dir: &Path) -> io::Result<KeyLog> {
        let d = PrivateDir::open(dir)?;
        let fresh = |name: &str| -> io::Result<File> {
            d.remove(name)?;
            d.create(name, b"", 0o600)
        };
        Ok(KeyLog {
            esp: fresh(ESP_FILE)?,
            ike: fresh(IKE_FILE)?,
            written: HashSet::new(),
        })
    }

    /// Append the lines of SAs not written yet.
    pub fn record(&mut self, live: &Live) {
        let esp: Vec<String> = live
            .sa_export(true)
            .into_iter()
            .filter_map(|s| s.wireshark.map(|l| l.to_string()))
            .collect();
        let ike: Vec<String> = live.ike_wireshark().iter().map(|l| l.to_string()).collect();
        for (lines, file) in [(esp, &mut self.esp), (ike, &mut self.ike)] {
            let mut add = String::new();
            for mut l in lines {
                let h = ring::digest::digest(&ring::digest::SHA256, l.as_bytes());
                let h: [u8; 32] = h.as_ref().try_into().expect("32 bytes");
                if self.written.insert(h) {
                    add.push_str(&l);
                    add.push('\n');
                }
                zeroize::Zeroize::zeroize(&mut l);
            }
            if !add.is_empty() {
                if let Err(e) = file.write_all(add.as_bytes()) {
                    tracing::warn!("interface.save_keys: writing a key line: {e}");
                }
            }
            zeroize::Zeroize::zeroize(&mut add);
        }
    }
}
