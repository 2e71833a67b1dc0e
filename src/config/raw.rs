//! The TOML file as serde reads it: every key optional or typed loosely, so that validation
//! (in the section modules) can name the key, the value found and what to write instead.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) interface: RawInterface,
    #[serde(default)]
    pub(super) peer: Vec<RawPeer>,
    pub(super) nat: Option<RawNat>,
    pub(super) capture: Option<RawCapture>,
    pub(super) metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapture {
    pub(super) dir: Option<PathBuf>,
    pub(super) inner: Option<bool>,
    pub(super) outer: Option<bool>,
    pub(super) max_file_mb: Option<i64>,
    pub(super) files: Option<i64>,
    pub(super) snaplen: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNat {
    pub(super) rules: Option<String>,
    #[serde(default)]
    pub(super) map: Vec<RawMap>,
    #[serde(default)]
    pub(super) masquerade: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMap {
    pub(super) real: String,
    pub(super) alias: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInterface {
    pub(super) name: String,
    #[serde(default)]
    pub(super) address: Vec<String>,
    pub(super) mtu: Option<i64>,
    pub(super) local: Option<String>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) forward: Option<bool>,
    pub(super) rp_filter: Option<String>,
    pub(super) control: Option<PathBuf>,
    pub(super) user: Option<String>,
    pub(super) offload: Option<bool>,
    pub(super) listen_port: Option<i64>,
    pub(super) tx_threads: Option<i64>,
    pub(super) save_keys: Option<PathBuf>,
    pub(super) tx_path: Option<String>,
    pub(super) rx_path: Option<String>,
    pub(super) post_up: Option<Vec<String>>,
    pub(super) pre_down: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum SpiValue {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) name: String,
    pub(super) endpoint: Option<String>,
    /// `[[peer.path]]`: several paths instead of one `endpoint`.
    #[serde(default)]
    pub(super) path: Vec<RawPath>,
    pub(super) scheduler: Option<String>,
    pub(super) probe_interval_ms: Option<i64>,
    pub(super) dead_after: Option<i64>,
    pub(super) reorder_ms: Option<i64>,
    pub(super) reorder_packets: Option<i64>,
    pub(super) reorder_bytes: Option<i64>,
    pub(super) adapt: Option<bool>,
    pub(super) equal_delay: Option<bool>,
    pub(super) repair: Option<bool>,
    pub(super) capacity_trains: Option<bool>,
    pub(super) fast_acks: Option<bool>,
    /// A peer without endpoint: how many (address, port)s it may be reached by at once.
    pub(super) max_paths: Option<i64>,
    /// Seconds after which a silent learned path is forgotten.
    pub(super) path_idle: Option<i64>,
    #[serde(default)]
    pub(super) allowed_ips: Vec<String>,
    pub(super) mode: String,
    pub(super) cipher: Option<String>,
    pub(super) spi_out: Option<SpiValue>,
    pub(super) spi_in: Option<SpiValue>,
    pub(super) key_out: Option<zeroize::Zeroizing<String>>,
    pub(super) key_in: Option<zeroize::Zeroizing<String>>,
    pub(super) key_out_file: Option<PathBuf>,
    pub(super) key_in_file: Option<PathBuf>,
    pub(super) replay_window: Option<i64>,
    pub(super) esn: Option<bool>,
    pub(super) route: Option<bool>,
    pub(super) lifetime_packets: Option<i64>,
    pub(super) lifetime_bytes: Option<i64>,
    pub(super) lifetime_seconds: Option<i64>,
    pub(super) keying: Option<String>,
    pub(super) psk_file: Option<PathBuf>,
    pub(super) local_id: Option<String>,
    pub(super) remote_id: Option<String>,
    pub(super) role: Option<String>,
    pub(super) ike_proposals: Option<Vec<String>>,
    pub(super) esp_proposals: Option<Vec<String>>,
    pub(super) ike_lifetime: Option<i64>,
    pub(super) child_lifetime: Option<i64>,
    pub(super) rekey_margin: Option<i64>,
    pub(super) rekey_jitter: Option<i64>,
    pub(super) dpd_interval: Option<i64>,
    pub(super) local_ts: Option<Vec<String>>,
    pub(super) mobike: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPath {
    pub(super) name: Option<String>,
    pub(super) endpoint: String,
    pub(super) weight: Option<i64>,
    pub(super) local: Option<String>,
    pub(super) device: Option<String>,
}
