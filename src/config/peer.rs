//! `[[peer]]`: one peer, its endpoint, allowed IPs, mode and SAs (keys read here, from the
//! configuration or from key files checked as ssh checks a private key).

use super::mode::{endpoint, Mode};
use super::raw::{RawPeer, SpiValue};
use super::{invalid, ConfigError, DEFAULT_REPLAY_WINDOW, MAX_REPLAY_WINDOW};
use crate::datapath::{EncapSpec, Lifetime, PeerSpec};
use crate::multipath::PeerPaths;
use crate::prefix::Prefix;
use crate::sa::{Cipher, KeyMaterial};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Validate one `[[peer]]`; `base` resolves key file paths; things allowed but probably not
/// meant go to `warnings`.
pub(super) fn peer(
    p: RawPeer,
    base: &Path,
    keys: &super::KeyFiles,
    interface: &super::Interface,
    warnings: &mut Vec<String>,
) -> Result<(PeerSpec, Option<super::ike::IkePeer>), ConfigError> {
    let name = p.name.clone();
    let k = |field: &str| format!("peer {name:?}.{field}");
    if name.is_empty() {
        return Err(invalid("peer.name", "\"\"", "a non-empty name"));
    }
    let mode = Mode::parse(k("mode"), &p.mode)?;
    let (endpoint, port, multipath) = outer_endpoints(&p, mode, &k, warnings)?;
    let multi = multipath.as_ref().is_some_and(|m| m.paths.len() > 1);
    let allowed_ips = allowed_ips(&p, &k, warnings)?;
    let route = p.route.unwrap_or(true);
    let mut ike = None;
    let ikev2 = super::ike::keying(&p, &k)?;
    let encap = match mode {
        _ if ikev2 => {
            ike = Some(super::ike::ike_peer(
                &p, mode, endpoint, base, keys, interface, &k, warnings,
            )?);
            let replay_window = match p.replay_window {
                None if multi => super::paths::MULTIPATH_REPLAY_WINDOW,
                None => DEFAULT_REPLAY_WINDOW,
                Some(w) if (1..=i64::from(MAX_REPLAY_WINDOW)).contains(&w) => w as u32,
                Some(w) => {
                    return Err(invalid(
                        k("replay_window"),
                        w,
                        format!("a packet count from 1 to {MAX_REPLAY_WINDOW} (IKEv2 SAs keep anti-replay on)"),
                    ))
                }
            };
            EncapSpec::EspPending {
                udp_port: (mode == Mode::EspUdp)
                    .then(|| port.unwrap_or(crate::wire::ip::IPSEC_NAT_T_PORT)),
                replay_window,
            }
        }
        Mode::IpIp => {
            refuse_sa_keys(&p, &k)?;
            warnings.push(format!(
                "peer {name:?} uses ipip: packets cross the wire unencrypted and unauthenticated"
            ));
            EncapSpec::IpIp
        }
        Mode::Esp | Mode::EspUdp => {
            let udp_port =
                (mode == Mode::EspUdp).then(|| port.unwrap_or(crate::wire::ip::IPSEC_NAT_T_PORT));
            esp(p, base, keys, udp_port, multi, &k, warnings)?
        }
    };
    if multipath.is_some() && ike.as_ref().is_some_and(|i| !i.mobike) {
        return Err(invalid(
            k("mobike"),
            "false",
            "true (the default) on a peer with several paths: its IKE SA moves to a path that is up when the one it runs on is cut, and only MOBIKE lets the peer accept it from there",
        ));
    }
    Ok((
        PeerSpec {
            name,
            endpoint,
            allowed_ips,
            encap,
            route,
            multipath,
            negotiated: None,
        },
        ike,
    ))
}

/// A peer's outer address, UDP port and paths.
type Outer = (Option<IpAddr>, Option<u16>, Option<PeerPaths>);

/// The peer's outer address and UDP port (the first path's, for several paths), and its
/// paths; no address: learned from its first authenticated packet (not for ipip).
fn outer_endpoints(
    p: &RawPeer,
    mode: Mode,
    k: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<Outer, ConfigError> {
    Ok(match (&p.endpoint, p.path.is_empty()) {
        (Some(raw), true) => {
            super::paths::refuse_path_settings(p, k)?;
            super::paths::refuse_learned_settings(p, k)?;
            let (e, port) = endpoint(raw, mode, &k("endpoint"))?;
            (Some(e), port, None)
        }
        (None, false) => {
            super::paths::refuse_learned_settings(p, k)?;
            let pp = super::paths::paths(p, mode, k, warnings)?;
            let first = &pp.paths[0];
            let port = (first.port != 0).then_some(first.port);
            (Some(first.endpoint), port, Some(pp))
        }
        (Some(_), false) => {
            return Err(invalid(
                k("endpoint"),
                "(set, and [[peer.path]] too)",
                "either one endpoint or several [[peer.path]] tables, each with its own endpoint",
            ))
        }
        // No endpoint: the peer's address is learned from its first authenticated packet.
        (None, true) => {
            if let Some(pp) = super::paths::learned_paths(p, mode, k)? {
                let port = (mode == Mode::EspUdp).then_some(crate::wire::ip::IPSEC_NAT_T_PORT);
                return Ok((None, port, Some(pp)));
            }
            super::paths::refuse_path_settings(p, k)?;
            if mode == Mode::IpIp {
                return Err(invalid(
                    k("endpoint"),
                    "(missing)",
                    "the peer's outer address: mode = \"ipip\" tells peers apart by their outer address alone, so an ipip peer cannot be learned (an ESP peer without endpoint can)",
                ));
            }
            (None, None, None)
        }
    })
}

/// `allowed_ips` as prefixes (none is allowed, with a warning).
fn allowed_ips(
    p: &RawPeer,
    k: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<Vec<Prefix>, ConfigError> {
    let mut allowed_ips = Vec::new();
    for a in &p.allowed_ips {
        let prefix: Prefix = a.parse().map_err(|e: crate::prefix::BadPrefix| {
            invalid(k("allowed_ips"), format!("{a:?}"), e.to_string())
        })?;
        allowed_ips.push(prefix);
    }
    if allowed_ips.is_empty() {
        warnings.push(format!(
            "peer {:?} has no allowed_ips: nothing will be routed to it or accepted from it",
            p.name
        ));
    }
    Ok(allowed_ips)
}

/// An ipip peer has no SA: any SA key is a mistake, named.
fn refuse_sa_keys(p: &RawPeer, k: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    for (field, set) in [
        ("cipher", p.cipher.is_some()),
        ("spi_out", p.spi_out.is_some()),
        ("spi_in", p.spi_in.is_some()),
        ("key_out", p.key_out.is_some() || p.key_out_file.is_some()),
        ("key_in", p.key_in.is_some() || p.key_in_file.is_some()),
        ("esn", p.esn.is_some()),
        ("replay_window", p.replay_window.is_some()),
        ("lifetime_packets", p.lifetime_packets.is_some()),
        ("lifetime_bytes", p.lifetime_bytes.is_some()),
        ("lifetime_seconds", p.lifetime_seconds.is_some()),
    ] {
        if set {
            return Err(invalid(
                k(field),
                "(set)",
                "nothing: mode = \"ipip\" carries packets unprotected; remove the key or use mode = \"esp\"",
            ));
        }
    }
    Ok(())
}

/// The SA pair of an esp or esp-udp peer.
fn esp(
    p: RawPeer,
    base: &Path,
    keys: &super::KeyFiles,
    udp_port: Option<u16>,
    multi: bool,
    k: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<EncapSpec, ConfigError> {
    let name = &p.name;
    let cname = p.cipher.clone().unwrap_or_default();
    let cipher = Cipher::from_name(&cname).ok_or_else(|| {
        invalid(
            k("cipher"),
            if p.cipher.is_some() {
                format!("{cname:?}")
            } else {
                "(missing)".into()
            },
            "one of \"aes-128-gcm\", \"aes-256-gcm\", \"chacha20-poly1305\"",
        )
    })?;
    let spi_out = spi(k("spi_out"), p.spi_out)?;
    let spi_in = spi(k("spi_in"), p.spi_in)?;
    let key_out = key_material(&k("key_out"), p.key_out, p.key_out_file, base, keys, cipher)?;
    let key_in = key_material(&k("key_in"), p.key_in, p.key_in_file, base, keys, cipher)?;
    let replay_window = match p.replay_window {
        // Several paths deliver out of order by up to their delay difference times the rate.
        None if multi => super::paths::MULTIPATH_REPLAY_WINDOW,
        None => DEFAULT_REPLAY_WINDOW,
        Some(w) if (0..=i64::from(MAX_REPLAY_WINDOW)).contains(&w) => w as u32,
        Some(w) => {
            return Err(invalid(
                k("replay_window"),
                w,
                format!("a packet count from 0 (off) to {MAX_REPLAY_WINDOW}"),
            ))
        }
    };
    let esn = p.esn.unwrap_or(false);
    if replay_window == 0 {
        if esn {
            return Err(invalid(
                k("replay_window"),
                0,
                "a window above 0 with esn = true: the receiver infers the high sequence bits from the window (RFC 4303 appendix A)",
            ));
        }
        warnings.push(format!(
            "peer {name:?}: replay_window = 0 turns anti-replay off; captured packets can be replayed"
        ));
    }
    if key_in.to_hex() == key_out.to_hex() {
        warnings.push(format!(
            "peer {name:?}: key_in equals key_out; use a different key each way so the two directions never share a nonce space"
        ));
    }
    let limit = |field: &str, v: Option<i64>| -> Result<Option<u64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(n) if n > 0 => Ok(Some(n as u64)),
            Some(n) => Err(invalid(
                k(field),
                n,
                "a positive number (the SA stops when it is reached), or no key for no limit",
            )),
        }
    };
    let lifetime = Lifetime {
        packets: limit("lifetime_packets", p.lifetime_packets)?,
        bytes: limit("lifetime_bytes", p.lifetime_bytes)?,
        seconds: limit("lifetime_seconds", p.lifetime_seconds)?,
    };
    Ok(EncapSpec::Esp {
        cipher,
        spi_out,
        key_out,
        spi_in,
        key_in,
        replay_window,
        esn,
        lifetime,
        udp_port,
    })
}

fn spi(key: String, v: Option<SpiValue>) -> Result<u32, ConfigError> {
    let expected = "an SPI from 0x100 to 0xffffffff, as \"0x...\" hex or a decimal number (0-255 are reserved, RFC 4303 section 2.1)";
    let (n, shown) = match v {
        None => return Err(invalid(key, "(missing)", expected)),
        Some(SpiValue::Int(i)) => (u32::try_from(i).ok(), i.to_string()),
        Some(SpiValue::Str(s)) => {
            let t = s.trim();
            let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => t.parse::<u32>().ok(),
            };
            (n, format!("{s:?}"))
        }
    };
    match n {
        Some(n) if n >= 256 => Ok(n),
        _ => Err(invalid(key, shown, expected)),
    }
}

fn key_material(
    key: &str,
    inline: Option<zeroize::Zeroizing<String>>,
    file: Option<PathBuf>,
    base: &Path,
    keys: &super::KeyFiles,
    cipher: Cipher,
) -> Result<KeyMaterial, ConfigError> {
    let expected = format!(
        "0x followed by {} hex digits: a {}-byte key and a 4-byte salt (`espip genkey --cipher {}` makes one)",
        2 * (cipher.key_len() + 4),
        cipher.key_len(),
        cipher.name()
    );
    match (inline, file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            "(both inline and _file)",
            format!("either {key} or {key}_file, not both"),
        )),
        (None, None) => Err(invalid(
            key,
            "(missing)",
            format!("{key} = \"{expected}\", or {key}_file = \"path\""),
        )),
        (Some(hex), None) => KeyMaterial::from_hex(cipher, &hex)
            .map_err(|e| invalid(key, "\"<redacted>\"", format!("{e}; expected {expected}"))),
        (None, Some(path)) => {
            let path = if path.is_relative() {
                base.join(path)
            } else {
                path
            };
            let fkey = format!("{key}_file");
            let text = keys.read(&fkey, &path)?;
            KeyMaterial::from_hex(cipher, &text).map_err(|e| {
                invalid(
                    &fkey,
                    path.display(),
                    format!("a file holding {expected}: {e}"),
                )
            })
        }
    }
}

/// Largest key file read: a key is at most 2 + 2 x 36 hex digits and a newline.
const KEY_FILE_MAX: u64 = 4096;

/// Read a key file as ssh reads a private key: a regular file (a link is followed, but its
/// target must be one), owned by root or the user running espip, not readable by others, of a
/// sane size. Opened with `O_NONBLOCK`, so a FIFO is refused instead of hanging.
pub(super) fn read_key_file(
    fkey: &str,
    path: &Path,
) -> Result<zeroize::Zeroizing<String>, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    // Named absolute, as the other key file errors name it.
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let unreadable =
        |e: std::io::Error| invalid(fkey, shown.display(), format!("a readable key file ({e})"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(unreadable)?;
    let meta = f.metadata().map_err(unreadable)?;
    // Messages name the file itself, not a link to it (`chmod` on a link to /dev/zero would
    // change /dev/zero).
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else if meta.file_type().is_char_device() || meta.file_type().is_block_device() {
            "a device"
        } else if meta.file_type().is_fifo() {
            "a FIFO"
        } else {
            "not a regular file"
        };
        return Err(invalid(
            fkey,
            path.display(),
            format!(
                "a regular file holding the key; {} is {kind}",
                real.display()
            ),
        ));
    }
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(ConfigError::KeyFileOwner {
            key: fkey.to_string(),
            path: real,
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::KeyFilePermissions {
            key: fkey.to_string(),
            path: real,
            mode,
        });
    }
    let mut text = zeroize::Zeroizing::new(String::with_capacity(KEY_FILE_MAX as usize + 1));
    f.take(KEY_FILE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if text.len() as u64 > KEY_FILE_MAX {
        return Err(invalid(
            fkey,
            path.display(),
            format!("a key file of a few dozen bytes; this one is over {KEY_FILE_MAX}"),
        ));
    }
    Ok(text)
}
