//! Kernel settings espip changes while it runs (`forward`, `rp_filter`), restored on stop.
//!
//! Before a value changes, the old one is written to `<state_dir>/<interface>.sysctl` (a file
//! of root's in root's own directory, [`PrivateDir`]); the descriptor stays open, so a clean
//! stop, by then unprivileged, restores the values and empties the file through it. After a
//! SIGKILL the next start restores the values from the file first, so nothing stays changed.
//!
//! What is read back is checked against an allow-list: only the keys espip itself changes
//! ([`RESTORABLE`]) with the values such a key can hold. Anything else in the file is refused
//! and named in the log, never written (issue 16: a key like `/tmp/x` or
//! `kernel.core_pattern` once made root write wherever the file said).

use super::safefs::PrivateDir;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

/// Keys whose old value espip saves, with the values they may be restored to. The TUN's own
/// `net.ipv4.conf.<if>.rp_filter` is not saved: it vanishes with the device.
pub const RESTORABLE: &[(&str, &[&str])] = &[
    ("net.ipv4.ip_forward", &["0", "1"]),
    ("net.ipv4.conf.all.rp_filter", &["0", "1", "2"]),
];

/// Largest state file read back (two short lines are ever written).
const STATE_MAX: u64 = 4096;

/// Settings changed by one daemon, restored when dropped.
#[derive(Debug)]
pub struct Sysctls {
    file: File,
    path: PathBuf,
    saved: Vec<(String, String)>,
}

fn proc_path(key: &str) -> PathBuf {
    std::path::Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn read(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(proc_path(key))?.trim().to_string())
}

fn write(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(proc_path(key), value)
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value}: {e}")))
}

/// Turn IPv6 off on the TUN `iface` (its own key: it goes with the device, nothing to
/// restore). Without it the kernel gives the TUN a link-local address and sends router and
/// multicast listener solicitations into it, which a tunnel without IPv6 can only drop.
pub fn disable_ipv6_on(iface: &str) -> io::Result<()> {
    if iface.is_empty() || iface.contains(['/', '.']) {
        return Err(io::Error::other("not an interface name"));
    }
    write(&format!("net.ipv6.conf.{iface}.disable_ipv6"), "1")
}

fn state_name(iface: &str) -> String {
    format!("{iface}.sysctl")
}

/// Whether `key=value` is one espip could have saved.
pub fn restorable(key: &str, value: &str) -> bool {
    RESTORABLE
        .iter()
        .any(|(k, vs)| *k == key && vs.contains(&value))
}

/// What a predecessor's state file asks for: the allowed settings, and the lines refused.
pub fn parse_state(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_once('=') {
            Some((k, v)) if restorable(k, v) => ok.push((k.to_string(), v.to_string())),
            _ => refused.push(line.chars().take(80).collect()),
        }
    }
    (ok, refused)
}

/// What `restore_stale` did.
#[derive(Debug, Default)]
pub struct Restored {
    /// `key=value` settings written.
    pub done: Vec<String>,
    /// Lines not on the allow-list (never written).
    pub refused: Vec<String>,
    /// The file itself could not be trusted (not root's, a link, too large): why. Nothing of
    /// it was read.
    pub untrusted: Option<String>,
}

/// Restore what a killed predecessor changed, from root's own state file.
pub fn restore_stale(dir: &PrivateDir, iface: &str) -> Restored {
    let name = state_name(iface);
    let mut r = Restored::default();
    let text = match dir.read(&name, STATE_MAX) {
        Ok(Some(t)) => t,
        Ok(None) => return r,
        Err(e) => {
            r.untrusted = Some(e.to_string());
            return r;
        }
    };
    let (ok, refused) = parse_state(&String::from_utf8_lossy(&text));
    r.refused = refused;
    for (k, v) in ok {
        if write(&k, &v).is_ok() {
            r.done.push(format!("{k}={v}"));
        }
    }
    let _ = dir.remove(&name);
    r
}

/// Apply `settings` (sysctl key, value), recording the old values of the [`RESTORABLE`] keys
/// first. Keys under `net.ipv4.conf.<iface>.` belong to the TUN and vanish with it.
pub fn apply(dir: &PrivateDir, iface: &str, settings: &[(String, String)]) -> io::Result<Sysctls> {
    let mut saved = Vec::new();
    for (k, _) in settings {
        if RESTORABLE.iter().any(|(r, _)| r == k) {
            let old = read(k)?;
            if !restorable(k, &old) {
                return Err(io::Error::other(format!(
                    "sysctl {k} is {old:?}, a value espip could not restore; set it to one of {:?} first",
                    RESTORABLE.iter().find(|(r, _)| r == k).map(|(_, v)| *v).unwrap_or_default()
                )));
            }
            saved.push((k.clone(), old));
        }
    }
    let name = state_name(iface);
    let text: String = saved.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let file = dir.create(&name, text.as_bytes(), 0o600)?;
    let guard = Sysctls {
        file,
        path: dir.join(&name),
        saved,
    };
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
        let mut done = Vec::new();
        for (k, v) in &self.saved {
            match write(k, v) {
                Ok(()) => done.push(format!("{k}={v}")),
                Err(e) => tracing::warn!("restoring {k}={v}: {e}"),
            }
        }
        // Emptied through the descriptor (the directory is root's; the daemon may not be):
        // the next start finds nothing to restore.
        let emptied = self
            .file
            .set_len(0)
            .and_then(|_| self.file.flush())
            .and_then(|_| self.file.sync_all());
        if let Err(e) = emptied {
            tracing::warn!("emptying {}: {e}", self.path.display());
        }
        if !done.is_empty() {
            tracing::info!(restored = %done.join(" "), "kernel settings restored");
        }
    }
}

/// The current value of a sysctl (for diagnostics).
pub fn value(key: &str) -> Option<String> {
    read(key).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_listed_keys_and_values_are_restored() {
        let (ok, refused) = parse_state(
            "net.ipv4.ip_forward=0\n\
             /tmp/pwned=written-as-root\n\
             kernel.core_pattern=|/tmp/x\n\
             net.ipv4.conf.all.rp_filter=2\n\
             net.ipv4.ip_forward=1; id\n\
             net.ipv4.conf.all.rp_filter=../../x\n",
        );
        assert_eq!(
            ok,
            vec![
                ("net.ipv4.ip_forward".to_string(), "0".to_string()),
                ("net.ipv4.conf.all.rp_filter".to_string(), "2".to_string())
            ]
        );
        assert_eq!(refused.len(), 4, "{refused:?}");
    }
}
