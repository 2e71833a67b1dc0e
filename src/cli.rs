// The command line's definition (clap), apart from what it does: `src/main.rs` runs it, and
// `build.rs` includes this file to write the man pages and shell completions from it. It
// uses only clap and std.

use clap::{Parser, Subcommand, ValueEnum};

/// espip: an ESP (RFC 4303) or IP-in-IP (RFC 2003) tunnel between a TUN device and raw IP
/// sockets.
#[derive(Parser)]
#[command(version = crate::VERSION, about, long_about = None)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the tunnel in the foreground until SIGINT or SIGTERM.
    Run {
        /// The TOML configuration.
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Apply a changed configuration to the running daemon without stopping it: peers added,
    /// removed or changed (endpoints, allowed_ips, keys and SPIs). Reads the file and its key
    /// files as root and sends them over the control socket; a configuration that does not
    /// validate, or changes what only a restart can, is refused and the old one keeps running.
    Reload {
        /// The TOML configuration (its interface.control names the daemon).
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Validate a configuration and explain what it sets up.
    Check {
        /// The TOML configuration.
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Print the netfilter rules the NAT helper installs, as a shell script.
    Rules {
        /// The TOML configuration.
        #[arg(long, short)]
        config: std::path::PathBuf,
        /// Print the removal script instead.
        #[arg(long)]
        remove: bool,
    },
    /// Show the running daemons: interface, peers, SAs, traffic, drops (like `wg show`).
    Show {
        #[command(flatten)]
        target: Target,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the ESP SAs of a running daemon; with --wireshark, as Wireshark esp_sa lines
    /// (these contain the keys).
    Sa {
        #[command(flatten)]
        target: Target,
        /// Print the SAs as Wireshark `esp_sa` UAT lines and a ready tshark command.
        #[arg(long)]
        wireshark: bool,
        /// Also write the lines to this file (mode 0600), e.g. ~/.config/wireshark/esp_sa.
        #[arg(long, requires = "wireshark")]
        write: Option<std::path::PathBuf>,
    },
    /// Rekey the CHILD_SAs (or with --ike the IKE SA) of a running daemon's IKEv2 peers now,
    /// as strongSwan's `swanctl --rekey` does.
    Rekey {
        #[command(flatten)]
        target: Target,
        /// Only this peer (default: every IKEv2 peer).
        #[arg(long)]
        peer: Option<String>,
        /// Rekey the IKE SA instead of the CHILD_SAs.
        #[arg(long)]
        ike: bool,
    },
    /// Print fresh random key material (hex of key || 4-byte salt, the `ip xfrm` layout).
    Genkey {
        /// aes-128-gcm, aes-256-gcm or chacha20-poly1305.
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: String,
    },
    /// Build a scenario in network namespaces, run its checks, report, tear down.
    Lab {
        #[command(subcommand)]
        scenario: LabCmd,
    },
    /// Helpers the labs run inside namespaces.
    #[command(hide = true)]
    LabTool {
        #[command(subcommand)]
        tool: ToolCmd,
    },
}

/// Which daemon to ask.
#[derive(clap::Args)]
pub struct Target {
    /// The daemon's interface name (its socket is /run/espip/NAME.sock; in another network
    /// namespace /run/espip/netns-INODE/NAME.sock).
    #[arg(long, short, conflicts_with_all = ["socket", "config"])]
    pub interface: Option<String>,
    /// The daemon's control socket (interface.control).
    #[arg(long, conflicts_with = "config")]
    pub socket: Option<std::path::PathBuf>,
    /// The daemon's configuration (its interface.control is used).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
}

/// Who starts the IKEv2 exchange in `espip lab strongswan`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum InitiatorArg {
    /// espip (role = "initiator").
    Espip,
    /// strongSwan (`swanctl --initiate`; espip is the responder).
    Strongswan,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OuterArg {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyingArg {
    Static,
    Ikev2,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Esp,
    EspUdp,
    Ipip,
}

/// What every lab scenario takes.
#[derive(clap::Args)]
pub struct LabArgs {
    /// Leave the namespaces and daemons running to explore (`espip lab down NAME` ends them).
    #[arg(long)]
    pub keep: bool,
    /// Keep configs, logs, a capture of each link, the daemons' inner/outer taps and
    /// Wireshark's esp_sa file here (see docs/captures.md).
    #[arg(long)]
    pub pcap: Option<std::path::PathBuf>,
    /// Do not install missing Debian packages; fail instead.
    #[arg(long)]
    pub no_install: bool,
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Tear down a lab left running with --keep: stop its daemons (SIGTERM, so they remove
    /// their rules), kill what else runs there, delete its namespaces.
    Down {
        /// The lab's name as --keep printed it (espip-lab-PID).
        name: String,
    },
    /// Two espip daemons keyed by IKEv2 (A initiator, B responder), rekeying their CHILD_SA
    /// every few seconds while transfers and 50 pings a second run; tshark decrypts IKE and
    /// ESP of the capture with the exported keys.
    Ike(IkeArgs),
    /// espip against strongSwan's charon (kernel-libipsec, userspace ESP in UDP) keyed by
    /// IKEv2 with a pre-shared key: pings, transfers, rekeys by both sides under load, dead
    /// peer detection, DELETE on stop, a wrong key; tshark decrypts the capture.
    Strongswan(StrongswanArgs),
    /// Scenario 1: two hosts, one tunnel (A 192.0.2.1 / 10.4.2.99, B 192.0.2.2 / 10.4.2.5).
    P2p(P2pArgs),
    /// Seed 000's goal: one TCP stream over two links at once (link 1 IPv4, link 2 IPv6-only,
    /// each through a middle namespace that delays, drops and rate-limits): aggregate
    /// throughput, a link cut mid-transfer, redundant under loss.
    Multipath(MultipathArgs),
    /// Scenario 2: the SEED VPN lab (U 192.168.56.9, server 192.168.56.10 / 192.168.50.1,
    /// V 192.168.50.11); U reaches V through the server.
    Gateway {
        #[command(flatten)]
        common: LabArgs,
        /// ESP cipher.
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: String,
        /// Leave forwarding off on the server, as the article's author did (the lab fails and
        /// says why).
        #[arg(long)]
        without_forward: bool,
    },
    /// Scenario 4: asymmetric upstream-only IP-in-IP relays through a censoring firewall
    /// (C 10.0.2.244, RA 10.0.2.201, F 10.0.2.1/10.0.3.1, RB 10.0.3.29, S 10.0.3.26).
    Upstream {
        #[command(flatten)]
        common: LabArgs,
    },
    /// Scenario 5: a hub relaying between three clients on 192.168.0.0/24, with MASQUERADE to
    /// an internet host.
    Hub {
        #[command(flatten)]
        common: LabArgs,
        /// ESP cipher.
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: String,
    },
    /// A road warrior: the server names no address of its client, whose address changes
    /// twice during a TCP transfer (static keys; B learns and follows A).
    Roaming {
        #[command(flatten)]
        common: LabArgs,
        /// esp (IP protocol 50) or esp-udp (ESP in UDP, RFC 3948).
        #[arg(long, value_enum, default_value = "esp-udp")]
        mode: ModeArg,
        /// ESP cipher.
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: String,
        /// Size of the TCP transfer in MB.
        #[arg(long, default_value_t = 25)]
        megabytes: u64,
        /// static keys, or an IKEv2 pair (A initiates; B is a responder without endpoint that
        /// finds A by its identity; ESP in UDP).
        #[arg(long, value_enum, default_value = "static")]
        keying: KeyingArg,
        /// With --keying ikev2: strongSwan's charon plays the client that moves (espip the
        /// server, which names the client's first address) or the server (espip the client);
        /// MOBIKE (RFC 4555) moves the SAs.
        #[arg(long, value_enum)]
        strongswan: Option<SwSideArg>,
    },
    /// Scenario 3: an encrypted pair on one LAN with the NAT helpers (A 10.0.0.161, B 10.0.0.160,
    /// alias 10.0.1.0/24).
    SameLan {
        #[command(flatten)]
        common: LabArgs,
        /// ESP cipher.
        #[arg(long, default_value = "aes-128-gcm")]
        cipher: String,
        /// Size of the TCP transfer in MB.
        #[arg(long, default_value_t = 50)]
        megabytes: u64,
    },
}

#[derive(Subcommand)]
pub enum ToolCmd {
    /// Accept one TCP connection and print the bytes and SHA-256 received.
    Sink {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Serve a one-line HTTP page, logging each client address.
    HttpServe {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// Send garbage ESP and IP-in-IP at a daemon for the flood test; prints what was sent.
    Flood {
        #[arg(long)]
        dst: std::net::Ipv4Addr,
        /// The daemon's inbound SPI (the costly garbage uses it).
        #[arg(long, value_parser = parse_spi)]
        spi: u32,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// At most this many packets a second in all (0: as fast as one core sends).
        #[arg(long, default_value_t = 0)]
        pps: u64,
    },
    /// Send IKE_SA_INIT requests (each a fresh SPI, nonce and key share) at an IKE port
    /// for the flood tests; prints how many.
    IkeFlood {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The IKE proposal offered (default: espip's default proposal).
        #[arg(long)]
        proposal: Option<String>,
        /// Replace the key share with this many 0xff octets' worth (not a point of any group).
        #[arg(long)]
        bad_ke: bool,
        /// Send to an ESP-in-UDP port, behind the non-ESP marker (RFC 3948).
        #[arg(long)]
        natt: bool,
        /// Send from this address.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
    },
    /// Relay every frame between two interfaces with a delay and random loss (the multipath
    /// lab's emulated link; this kernel has no netem). Runs until SIGTERM; prints its counts.
    Relay {
        /// The two interfaces.
        #[arg(long, num_args = 2)]
        ifaces: Vec<String>,
        /// One-way delay in milliseconds.
        #[arg(long, default_value_t = 0.0)]
        delay_ms: f64,
        /// Share of frames dropped at random, in percent.
        #[arg(long, default_value_t = 0.0)]
        loss_percent: f64,
        /// Extra one-way delay per frame, uniform in 0..this many ms; frames keep their order.
        #[arg(long, default_value_t = 0.0)]
        jitter_ms: f64,
        /// While this file exists, the link is cut.
        #[arg(long)]
        cut: Option<std::path::PathBuf>,
    },
    /// Send a reproducible stream and print its bytes and SHA-256.
    Source {
        #[arg(long)]
        connect: std::net::SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
}

/// An SPI on the command line that is not a 32-bit number (decimal, or hex after `0x`).
#[derive(Debug)]
pub struct BadSpi {
    text: String,
    why: std::num::ParseIntError,
}

impl std::fmt::Display for BadSpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.text, self.why)
    }
}

impl std::error::Error for BadSpi {}

/// An SPI: decimal, or hex after `0x`.
pub fn parse_spi(s: &str) -> Result<u32, BadSpi> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|why| BadSpi {
        text: s.to_string(),
        why,
    })
}

/// The options of `espip lab ike`.
#[derive(clap::Args)]
pub struct IkeArgs {
    #[command(flatten)]
    pub common: LabArgs,
    /// esp-udp or esp (protocol 50).
    #[arg(long, value_enum, default_value = "esp-udp")]
    pub mode: ModeArg,
    /// IKE proposal (strongSwan notation).
    #[arg(long, default_value = "aes128gcm16-prfsha256-x25519")]
    pub ike: String,
    /// ESP proposal (strongSwan notation: without `esn`, no ESN).
    #[arg(long, default_value = "aes128gcm16-esn")]
    pub esp: String,
    /// CHILD_SA rekey interval, seconds.
    #[arg(long, default_value_t = 5)]
    pub rekey: u64,
    /// Seconds of transfers and pings.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seconds of the IKE_SA_INIT flood at the responder (0: none).
    #[arg(long, default_value_t = 10)]
    pub flood: u64,
}

/// The options of `espip lab multipath`.
#[derive(clap::Args)]
pub struct MultipathArgs {
    #[command(flatten)]
    pub common: LabArgs,
    /// esp-udp (ESP in UDP, RFC 3948), esp (IP protocol 50) or ipip (no probes).
    #[arg(long, value_enum, default_value = "esp-udp")]
    pub mode: ModeArg,
    /// ESP cipher.
    #[arg(long, default_value = "aes-128-gcm")]
    pub cipher: String,
    /// Link 1 (IPv4) as RATE_MBIT/RTT_MS[/LOSS_PERCENT].
    #[arg(long, default_value = "100/10")]
    pub link1: String,
    /// Link 2 (IPv6 only) as RATE_MBIT/RTT_MS[/LOSS_PERCENT].
    #[arg(long, default_value = "100/40")]
    pub link2: String,
    /// Two to four links instead of --link1/--link2 (--topology pair), each
    /// RATE_MBIT/RTT_MS[/LOSS%][/JITTERms][/ipv6], comma-separated:
    /// "60/10,30/100/ipv6,15/40" or "50/20,20/60/2%/15ms".
    #[arg(long, conflicts_with_all = ["link1", "link2"])]
    pub links: Option<String>,
    /// spread, earliest, failover or redundant (the aggregate and cut phases).
    #[arg(long, default_value = "spread")]
    pub scheduler: String,
    /// Seconds worth of the links' sum in the aggregate transfer.
    #[arg(long, default_value_t = 8)]
    pub seconds: u64,
    /// Random loss on each link in the redundant phase, percent (0 skips it).
    #[arg(long, default_value_t = 5.0)]
    pub redundant_loss: f64,
    /// Also measure kernel MPTCP (mptcpize run iperf3, one subflow per link) against espip
    /// with iperf3 on the same links (installs mptcpd and iperf3).
    #[arg(long)]
    pub compare_mptcp: bool,
    /// Comparison runs (implies --compare-mptcp): each restarts both daemons (fresh paths),
    /// then measures espip, kernel MPTCP and (with --glorytun) glorytun one after the other;
    /// the report prints every run and the medians and ranges.
    #[arg(long)]
    pub runs: Option<usize>,
    /// glorytun's binary (the multipath tunnel of OpenMPTCPRouter), measured in each
    /// comparison run on the same links with each path's rate fixed to its link's.
    #[arg(long)]
    pub glorytun: Option<std::path::PathBuf>,
    /// Both peers with equal_delay = false (spread delivers each packet as soon as it is in
    /// order, not as late as the slowest path's).
    #[arg(long)]
    pub no_equal_delay: bool,
    /// Comparison runs alternate equal_delay on and off (an A/B in one lab; implies
    /// --compare-mptcp).
    #[arg(long, conflicts_with = "no_equal_delay")]
    pub ab_equal_delay: bool,
    /// Comparison runs alternate repair on and off (lost packets asked for again and sent
    /// again; an A/B in one lab; implies --compare-mptcp).
    #[arg(long, conflicts_with = "ab_equal_delay")]
    pub ab_repair: bool,
    /// Comparison runs alternate capacity_trains on and off (a fresh path measured by a train
    /// of fillers, or by its first transfer; an A/B in one lab; implies --compare-mptcp).
    #[arg(long, conflicts_with_all = ["ab_equal_delay", "ab_repair"])]
    pub ab_trains: bool,
    /// Comparison runs alternate fast_acks on and off (pure TCP acknowledgments on the
    /// fastest path, delivered at once; an A/B in one lab; implies --compare-mptcp).
    #[arg(long, conflicts_with_all = ["ab_equal_delay", "ab_repair", "ab_trains"])]
    pub ab_fast_acks: bool,
    /// Draw the transfer with the cut of link 1 into this SVG file: the stream and each path
    /// per half second, the cut marked.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// TCP congestion control of the iperf3 comparison (iperf3 -C): cubic or bbr.
    #[arg(long)]
    pub congestion: Option<String>,
    /// Also halve link 1's rate 3 s into a transfer and restore it 3 s later, and check that
    /// its capacity estimate follows each change within 2 s (--topology pair; not with ipip,
    /// which has no probes).
    #[arg(long)]
    pub rate_change: bool,
    /// spread with the links' rates as static weights only (adapt = false).
    #[arg(long)]
    pub static_weights: bool,
    /// pair: two links between A and B, each with its own addresses; uplinks: A with two
    /// uplinks and two default routes (uplink 2 behind a NAT) to one address of B (esp-udp).
    #[arg(long, value_enum, default_value = "pair")]
    pub topology: TopologyArg,
    /// static keys, or IKEv2 (A initiates over its first path; CHILD_SAs rekeyed every few
    /// seconds all through the lab, with a check that the rekeys lose nothing; esp-udp).
    #[arg(long, value_enum, default_value = "static")]
    pub keying: KeyingArg,
}

/// `--topology` of `espip lab multipath`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TopologyArg {
    /// Two links between A and B, each with its own addresses (link 2 IPv6 only).
    Pair,
    /// A with two uplinks (two default routes, uplink 2 behind a NAT), B with one address.
    Uplinks,
}

/// The options of `espip lab p2p`.
#[derive(clap::Args)]
pub struct P2pArgs {
    #[command(flatten)]
    pub common: LabArgs,
    /// esp (IP protocol 50), esp-udp (ESP in UDP port 4500, RFC 3948) or ipip.
    #[arg(long, value_enum, default_value = "esp")]
    pub mode: ModeArg,
    /// ESP cipher.
    #[arg(long, default_value = "aes-128-gcm")]
    pub cipher: String,
    /// Use 64-bit extended sequence numbers.
    #[arg(long)]
    pub esn: bool,
    /// The underlay: ipv4 (192.0.2.1 - .2) or ipv6 (2001:db8:2::1 - ::2; ESP as next
    /// header 50, ESP in UDP/IPv6, IPv4 in IPv6).
    #[arg(long, value_enum, default_value = "ipv4")]
    pub outer: OuterArg,
    /// Size of the TCP transfer in MB.
    #[arg(long, default_value_t = 50)]
    pub megabytes: u64,
}

/// The options of `espip lab strongswan`.
#[derive(clap::Args)]
pub struct StrongswanArgs {
    #[command(flatten)]
    pub common: LabArgs,
    /// Which side initiates.
    #[arg(long, value_enum, default_value = "espip")]
    pub initiator: InitiatorArg,
    /// IKE proposal (strongSwan notation).
    #[arg(long, default_value = "aes128gcm16-prfsha256-x25519")]
    pub ike: String,
    /// ESP proposal (strongSwan notation).
    #[arg(long, default_value = "aes128gcm16")]
    pub esp: String,
    /// Size of each TCP transfer in MB.
    #[arg(long, default_value_t = 20)]
    pub megabytes: u64,
    /// Skip the dead peer detection check (kills charon; about 20 s).
    #[arg(long)]
    pub no_dpd: bool,
}

/// `espip lab roaming --strongswan`: the side strongSwan plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SwSideArg {
    /// strongSwan is the client whose address changes.
    Client,
    /// strongSwan is the server.
    Server,
}
