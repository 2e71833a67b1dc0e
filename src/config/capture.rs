//! `[capture]`: the pcap taps.

use super::raw::RawCapture;
use super::{invalid, Capture, ConfigError, DEFAULT_CAPTURE_FILES, DEFAULT_CAPTURE_FILE_MB};
use std::path::Path;

pub(super) fn capture(
    raw: Option<RawCapture>,
    base: &Path,
    ifname: &str,
) -> Result<Option<Capture>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let dir = match raw.dir {
        Some(d) if !d.as_os_str().is_empty() => {
            if d.is_relative() {
                base.join(d)
            } else {
                d
            }
        }
        _ => {
            return Err(invalid(
                "capture.dir",
                "(missing)",
                format!("a directory for {ifname}-inner.pcap and {ifname}-outer.pcap, e.g. \"/var/log/espip\"; remove [capture] to capture nothing"),
            ))
        }
    };
    let (inner, outer) = (raw.inner.unwrap_or(true), raw.outer.unwrap_or(true));
    if !inner && !outer {
        return Err(invalid(
            "capture.inner/outer",
            "false/false",
            "at least one tap switched on, or no [capture] section",
        ));
    }
    let max_mb = raw.max_file_mb.unwrap_or(DEFAULT_CAPTURE_FILE_MB as i64);
    if !(1..=1 << 20).contains(&max_mb) {
        return Err(invalid(
            "capture.max_file_mb",
            max_mb,
            "a file size in MB from 1 to 1048576",
        ));
    }
    let files = raw.files.unwrap_or(DEFAULT_CAPTURE_FILES as i64);
    if !(1..=1000).contains(&files) {
        return Err(invalid(
            "capture.files",
            files,
            "the number of files kept per tap, from 1 to 1000 (older ones are deleted)",
        ));
    }
    let snaplen = raw.snaplen.unwrap_or(65535);
    if !(64..=65535).contains(&snaplen) {
        return Err(invalid(
            "capture.snaplen",
            snaplen,
            "bytes kept of each packet, from 64 to 65535",
        ));
    }
    Ok(Some(Capture {
        dir,
        inner,
        outer,
        max_file_bytes: max_mb as u64 * 1_000_000,
        files: files as u32,
        snaplen: snaplen as u32,
    }))
}
