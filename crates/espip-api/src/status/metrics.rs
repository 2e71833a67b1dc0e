//! The status as OpenMetrics (Prometheus) text, through the `prometheus-client` crate: the
//! families and labels `tests/vectors/metric-shapes.txt` holds.

use super::*;

impl Status {
    /// The Prometheus text exposition format. Counters end in `_total`; the interface and peer
    /// are labels; times are Unix seconds.
    pub fn to_prometheus(&self) -> String {
        let mut m = Metrics::default();
        self.interface_metrics(&mut m);
        self.peer_metrics(&mut m);
        self.sa_metrics(&mut m);
        self.drop_metrics(&mut m);
        self.ike_metrics(&mut m);
        self.capture_metrics(&mut m);
        m.finish()
    }

    /// The daemon: version, configuration generation, start time, MTU.
    fn interface_metrics(&self, m: &mut Metrics) {
        let ifl = [("interface", self.interface.name.as_str())];
        m.family("espip_info", "gauge", "Always 1; labels carry the version.");
        m.sample(
            "espip_info",
            &[
                ("interface", self.interface.name.as_str()),
                ("version", self.interface.version.as_str()),
            ],
            1.0,
        );
        m.family(
            "espip_config_generation",
            "gauge",
            "The configuration's generation: 1 at start, one more per applied reload.",
        );
        m.sample(
            "espip_config_generation",
            &ifl,
            self.interface.generation as f64,
        );
        m.family(
            "espip_start_time_seconds",
            "gauge",
            "Start time of the daemon, seconds since the Unix epoch.",
        );
        m.sample(
            "espip_start_time_seconds",
            &ifl,
            self.interface.started_unix,
        );
        m.family("espip_mtu_bytes", "gauge", "Tunnel MTU.");
        m.sample("espip_mtu_bytes", &ifl, f64::from(self.interface.mtu));
    }

    /// Per peer: traffic, paths, last packets, learned endpoints.
    fn peer_metrics(&self, m: &mut Metrics) {
        type Field = fn(&PeerStatus) -> u64;
        let per_peer: [(&str, &str, &str, Field); 4] = [
            (
                "espip_peer_packets_total",
                "tx",
                "Packets sent to (tx) or received from (rx) the peer.",
                |p| p.tx_packets,
            ),
            ("espip_peer_packets_total", "rx", "", |p| p.rx_packets),
            (
                "espip_peer_bytes_total",
                "tx",
                "Inner bytes sent to (tx) or received from (rx) the peer.",
                |p| p.tx_bytes,
            ),
            ("espip_peer_bytes_total", "rx", "", |p| p.rx_bytes),
        ];
        for (name, dir, help, f) in per_peer {
            if !help.is_empty() {
                m.family(name, "counter", help);
            }
            for p in &self.peers {
                m.sample(
                    name,
                    &[
                        ("interface", &self.interface.name),
                        ("peer", &p.name),
                        ("direction", dir),
                    ],
                    f(p) as f64,
                );
            }
        }
        self.path_metrics(m);
        m.family(
            "espip_peer_last_packet_timestamp_seconds",
            "gauge",
            "Time of the last packet sent (tx) or received (rx), Unix seconds; absent before the first.",
        );
        for p in &self.peers {
            for (dir, t) in [("tx", p.last_tx_unix), ("rx", p.last_rx_unix)] {
                if let Some(t) = t {
                    m.sample(
                        "espip_peer_last_packet_timestamp_seconds",
                        &[
                            ("interface", &self.interface.name),
                            ("peer", &p.name),
                            ("direction", dir),
                        ],
                        t,
                    );
                }
            }
        }
        if self.peers.iter().any(|p| p.endpoint_learned) {
            m.family(
                "espip_peer_endpoint_moves_total",
                "counter",
                "A peer without configured endpoint: times its learned address moved after it was first learned (roaming).",
            );
            for p in self.peers.iter().filter(|p| p.endpoint_learned) {
                m.sample(
                    "espip_peer_endpoint_moves_total",
                    &[("interface", &self.interface.name), ("peer", &p.name)],
                    p.endpoint_moves as f64,
                );
            }
        }
    }

    /// Per SA: sequence numbers.
    fn sa_metrics(&self, m: &mut Metrics) {
        m.family(
            "espip_sa_sequence_number",
            "gauge",
            "Outbound SA (direction out): last sequence number sent; inbound (in): highest authenticated.",
        );
        for p in &self.peers {
            if let Some(o) = &p.sa_out {
                let spi = format!("{:#010x}", o.spi);
                m.sample(
                    "espip_sa_sequence_number",
                    &[
                        ("interface", &self.interface.name),
                        ("peer", &p.name),
                        ("spi", &spi),
                        ("direction", "out"),
                    ],
                    o.next_seq.saturating_sub(1) as f64,
                );
            }
            if let Some(n) = &p.sa_in {
                let spi = format!("{:#010x}", n.spi);
                m.sample(
                    "espip_sa_sequence_number",
                    &[
                        ("interface", &self.interface.name),
                        ("peer", &p.name),
                        ("spi", &spi),
                        ("direction", "in"),
                    ],
                    n.highest_seq as f64,
                );
            }
        }
    }

    /// The data path and the kernel edges: drops, errors, kernel drops, offload, relaying.
    fn drop_metrics(&self, m: &mut Metrics) {
        let ifl = [("interface", self.interface.name.as_str())];
        m.family(
            "espip_drops_total",
            "counter",
            "Packets dropped by the data path, by reason.",
        );
        for (reason, n) in &self.drops {
            m.sample(
                "espip_drops_total",
                &[("interface", &self.interface.name), ("reason", reason)],
                *n as f64,
            );
        }
        m.family(
            "espip_errors_total",
            "counter",
            "Failed kernel operations at the edges, by kind.",
        );
        for (kind, n) in &self.errors {
            m.sample(
                "espip_errors_total",
                &[("interface", &self.interface.name), ("kind", kind)],
                *n as f64,
            );
        }
        m.family(
            "espip_kernel_drops_total",
            "counter",
            "Packets the kernel dropped before espip saw them: tun_tx_queue (the TUN's queue was full), tun_rx (TUN writes refused), socket_rcvbuf (a socket's receive buffer was full).",
        );
        for (kind, n) in &self.kernel_drops {
            m.sample(
                "espip_kernel_drops_total",
                &[("interface", &self.interface.name), ("kind", kind)],
                *n as f64,
            );
        }
        m.family(
            "espip_offload_packets_total",
            "counter",
            "Offload work: tso_in / uso_in (large TUN packets segmented), gro_out (coalesced TUN writes), udp_gso_out / udp_gro_in (ESP-in-UDP trains sent / received as one), ipip_gro_in (IP-in-IP packets merged by the kernel's GRO, cut back).",
        );
        for (kind, n) in &self.offload {
            m.sample(
                "espip_offload_packets_total",
                &[("interface", &self.interface.name), ("kind", kind)],
                *n as f64,
            );
        }
        m.family(
            "espip_relayed_packets_total",
            "counter",
            "Packets relayed from one peer to another inside the daemon.",
        );
        m.sample("espip_relayed_packets_total", &ifl, self.relayed as f64);
    }

    /// IKEv2 peers: SAs by state, exchanges, failures.
    fn ike_metrics(&self, m: &mut Metrics) {
        if !self.ike.is_empty() {
            m.family(
                "espip_ike_sas",
                "gauge",
                "IKE SAs and CHILD_SAs of an IKEv2 peer, by kind and state.",
            );
            for k in &self.ike {
                let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
                for sa in &k.sas {
                    *by.entry((sa.kind.clone(), sa.state.clone())).or_default() += 1;
                }
                for ((kind, state), n) in by {
                    m.sample(
                        "espip_ike_sas",
                        &[
                            ("interface", &self.interface.name),
                            ("peer", &k.peer),
                            ("kind", &kind),
                            ("state", &state),
                        ],
                        n as f64,
                    );
                }
            }
            m.family(
                "espip_ike_exchanges_total",
                "counter",
                "IKEv2 events of a peer: established, child_rekey, ike_rekey, request, retransmit, response.",
            );
            for k in &self.ike {
                for (what, n) in [
                    ("established", k.established),
                    ("child_rekey", k.child_rekeys),
                    ("ike_rekey", k.ike_rekeys),
                    ("request", k.requests),
                    ("retransmit", k.retransmits),
                    ("response", k.responses),
                ] {
                    m.sample(
                        "espip_ike_exchanges_total",
                        &[
                            ("interface", &self.interface.name),
                            ("peer", &k.peer),
                            ("event", what),
                        ],
                        n as f64,
                    );
                }
            }
            m.family(
                "espip_ike_failures_total",
                "counter",
                "IKEv2 failures and dropped messages of a peer, by reason (RFC 7296 notify names or espip's).",
            );
            for k in &self.ike {
                for (reason, n) in &k.failures {
                    m.sample(
                        "espip_ike_failures_total",
                        &[
                            ("interface", &self.interface.name),
                            ("peer", &k.peer),
                            ("reason", reason),
                        ],
                        *n as f64,
                    );
                }
            }
        }
    }

    /// The capture taps.
    fn capture_metrics(&self, m: &mut Metrics) {
        if let Some(c) = &self.capture {
            m.family(
                "espip_capture_records_total",
                "counter",
                "Capture records by outcome: written, dropped (writer behind), write_error.",
            );
            for (result, n) in [
                ("written", c.written),
                ("dropped", c.dropped),
                ("write_error", c.write_errors),
            ] {
                m.sample(
                    "espip_capture_records_total",
                    &[("interface", &self.interface.name), ("result", result)],
                    n as f64,
                );
            }
        }
    }
}

/// The exposition being built with prometheus-client (the Prometheus project's Rust client):
/// each family registered once, in order, then its samples set from the snapshot.
#[derive(Default)]
struct Metrics {
    registry: Registry,
    counters: BTreeMap<String, Family<Labels, Counter<f64, AtomicU64>>>,
    gauges: BTreeMap<String, Family<Labels, Gauge<f64, AtomicU64>>>,
}

impl Status {
    /// The per-path families of multipath peers.
    fn path_metrics(&self, m: &mut Metrics) {
        type Field = fn(&PathStatus) -> Option<f64>;
        let families: [(&str, &str, &str, Field); 11] = [
            (
                "espip_path_up",
                "gauge",
                "1 if the path answers probes (or has not been probed yet), 0 if it is down.",
                |x| Some(f64::from(u8::from(x.state != "down"))),
            ),
            (
                "espip_path_rtt_seconds",
                "gauge",
                "Smoothed probe round-trip time of the path.",
                |x| x.rtt_ms.map(|v| v / 1e3),
            ),
            (
                "espip_path_share_ratio",
                "gauge",
                "The path's share of the peer's packets (redundant: 1 per live path).",
                |x| Some(x.share),
            ),
            (
                "espip_path_capacity_bits_per_second",
                "gauge",
                "What the spread scheduler estimates the path delivers.",
                |x| Some(x.capacity_bps),
            ),
            (
                "espip_path_probes_total",
                "counter",
                "Probes sent on the path.",
                |x| Some(x.probes_sent as f64),
            ),
            (
                "espip_path_echoes_total",
                "counter",
                "Echoes received for the path's probes.",
                |x| Some(x.echoes as f64),
            ),
            (
                "espip_path_quiet_total",
                "counter",
                "Times the path went quiet: late by a probe interval and a half while another path answered, so left out of the schedule before it is found down.",
                |x| Some(x.quiet_count as f64),
            ),
            (
                "espip_path_repaired_total",
                "counter",
                "Packets sent again on the path because the peer asked for them (multipath repair).",
                |x| Some(x.repaired as f64),
            ),
            (
                "espip_path_send_refused_total",
                "counter",
                "Outer packets for the path that the kernel refused to send (no route, a source the host does not have).",
                |x| Some(x.send_refused as f64),
            ),
            (
                "espip_path_tx_bytes_total",
                "counter",
                "Inner bytes sent on the path.",
                |x| Some(x.tx_bytes as f64),
            ),
            (
                "espip_path_rx_bytes_total",
                "counter",
                "Inner bytes received on the path.",
                |x| Some(x.rx_bytes as f64),
            ),
        ];
        if !self.peers.iter().any(|p| p.multipath.is_some()) {
            return;
        }
        for (name, kind, help, f) in families {
            m.family(name, kind, help);
            for p in &self.peers {
                for x in p.multipath.iter().flat_map(|mp| &mp.paths) {
                    if let Some(v) = f(x) {
                        m.sample(
                            name,
                            &[
                                ("interface", &self.interface.name),
                                ("peer", &p.name),
                                ("path", &x.name),
                            ],
                            v,
                        );
                    }
                }
            }
        }
    }
}

impl Metrics {
    /// Register family `name` (a counter's name ends in `_total`, which the OpenMetrics
    /// encoder adds to the family's own name).
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // The encoder ends the help with a full stop.
        let help = help.trim_end_matches('.');
        if kind == "counter" {
            let f = Family::default();
            let base = name.strip_suffix("_total").unwrap_or(name);
            self.registry.register(base, help, f.clone());
            self.counters.insert(name.to_string(), f);
        } else {
            let f = Family::default();
            self.registry.register(name, help, f.clone());
            self.gauges.insert(name.to_string(), f);
        }
    }

    /// One sample of family `name`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(f) = self.counters.get(name) {
            f.get_or_create(&l).inc_by(v);
        } else if let Some(f) = self.gauges.get(name) {
            f.get_or_create(&l).set(v);
        } else {
            debug_assert!(false, "metric family {name} was not registered");
        }
    }

    /// The OpenMetrics text exposition.
    fn finish(self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
