//! Kernel settings espip changes while it runs (`forward`, `rp_filter`), restored on stop.
//!
//! Before a value changes, the old one is written to `<state_dir>/<interface>.sysctl`; a clean
//! stop restores it and deletes the file; after a SIGKILL the next start restores the values
//! from the file first, so nothing stays changed.

use std::io;
use std::path::{Path, PathBuf};

/// Settings changed by one daemon, restored when dropped.
#[derive(Debug)]
pub struct Sysctls {
    file: PathBuf,
    saved: Vec<(String, String)>,
}

fn proc_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn read(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(proc_path(key))?.trim().to_string())
}

fn write(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(proc_path(key), value)
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value}: {e}")))
}

fn state_file(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{iface}.sysctl"))
}

/// Restore what a killed predecessor changed; returns the settings restored.
pub fn restore_stale(dir: &Path, iface: &str) -> Vec<String> {
    let file = state_file(dir, iface);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if write(k, v).is_ok() {
                done.push(format!("{k}={v}"));
            }
        }
    }
    let _ = std::fs::remove_file(&file);
    done
}

/// Apply `settings` (sysctl key, value), recording the old values first. Keys under
/// `net.ipv4.conf.<iface>.` belong to the TUN and vanish with it, so they are not recorded.
pub fn apply(dir: &Path, iface: &str, settings: &[(String, String)]) -> io::Result<Sysctls> {
    let own = format!("net.ipv4.conf.{iface}.");
    let mut saved = Vec::new();
    for (k, _) in settings {
        if !k.starts_with(&own) {
            saved.push((k.clone(), read(k)?));
        }
    }
    let file = state_file(dir, iface);
    let text: String = saved.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(&file, text)?;
    let guard = Sysctls { file, saved };
    for (k, v) in settings {
        write(k, v)?;
    }
    Ok(guard)
}

impl Sysctls {
    /// The settings that will be restored.
    pub fn saved(&self) -> &[(String, String)] {
        &self.saved
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        for (k, v) in &self.saved {
            let _ = write(k, v);
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The current value of a sysctl (for diagnostics).
pub fn value(key: &str) -> Option<String> {
    read(key).ok()
}
