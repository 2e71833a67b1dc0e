//! The `espip` command line.

/// The command line's definition (shared with build.rs, which writes the man pages from it).
mod cli;

/// `espip --version`: the crate's version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("ESPIP_GIT_COMMIT"),
    ")"
);

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::*;
use espip::config::Config;
use espip::sa::Cipher;
use espip_lab::p2p::{LabMode, P2pOptions};
use std::path::PathBuf;

impl Target {
    /// Whether no daemon was named (every socket of the default directory is asked).
    fn is_listing(&self) -> bool {
        self.socket.is_none() && self.config.is_none() && self.interface.is_none()
    }

    /// The sockets to ask, each with the network namespace its daemon runs in when that is
    /// another one: the one named, or every daemon's with a default socket path (from the
    /// initial namespace, those of every namespace too).
    fn sockets(&self) -> Result<Vec<(PathBuf, Option<String>)>> {
        let dir = &espip::config::default_dir();
        if let Some(s) = &self.socket {
            return Ok(vec![(s.clone(), None)]);
        }
        if let Some(c) = &self.config {
            return Ok(vec![(Config::load(c)?.interface.control, None)]);
        }
        let all = espip::control::all_default_sockets();
        if let Some(i) = &self.interface {
            let here = dir.join(format!("{i}.sock"));
            if here.exists() {
                return Ok(vec![(here, None)]);
            }
            // Not in this namespace: a daemon of that name in another one, if exactly one.
            let want = std::ffi::OsString::from(format!("{i}.sock"));
            let found: Vec<_> = all
                .into_iter()
                .filter(|(p, ns)| ns.is_some() && p.file_name() == Some(want.as_os_str()))
                .filter(|(p, _)| espip::control::request(p, "status").is_ok())
                .collect();
            return match found.len() {
                0 => Ok(vec![(here, None)]),
                1 => Ok(found),
                _ => bail!(
                    "daemons of interface {i} run in several network namespaces ({}); name one with --socket PATH",
                    found
                        .iter()
                        .map(|(p, ns)| format!("{}: {}", ns.as_deref().unwrap_or("this one"), p.display()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
        if all.is_empty() {
            bail!(
                "no espip daemon found: {} holds no control socket; start one with `espip run -c FILE`, or name one with --socket PATH or --config FILE",
                dir.display()
            );
        }
        Ok(all)
    }
}

/// `espip reload`: read and validate the configuration and its key files as root, open the
/// state files of its keys (root's directory, which the daemon may no longer open), and send
/// it all to the daemon.
fn reload(path: &std::path::Path) -> Result<()> {
    use espip::config::KeyFiles;
    use espip::datapath::EncapSpec;
    use std::os::fd::AsFd;
    let text = Config::read_text(path)?;
    let base = path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let keys = KeyFiles::disk();
    let cfg = Config::parse_with(&text, &base, &keys).map_err(|e| e.in_file(path))?;
    let store = espip::sys::seqstore::SeqStore::open(&cfg.interface.state_dir, &cfg.interface.name)
        .with_context(|| format!("interface.state_dir {}", cfg.interface.state_dir.display()))?;
    let mut fps = Vec::new();
    let mut files = Vec::new();
    for p in &cfg.peers {
        if let EncapSpec::Esp {
            spi_out, key_out, ..
        } = &p.encap
        {
            let fp = key_out.fingerprint();
            let (file, _) = store.open_key(*spi_out, &fp)?;
            fps.push(fp);
            files.push(file);
        }
    }
    let doc = espip::control::ReloadDocument {
        config: text,
        base,
        files: keys.into_read(),
        keys: fps,
    };
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let answer = espip::control::request_reload(&cfg.interface.control, &doc, &fds)?;
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let summary = v.get("reloaded").and_then(|s| s.as_str()).unwrap_or("");
    println!(
        "{}: reloaded: {}",
        cfg.interface.name,
        espip::control::clean(summary)
    );
    Ok(())
}

/// `espip rekey`: ask each named daemon to start the rekeys; print what each started.
fn rekey(target: &Target, peer: Option<&str>, ike: bool) -> Result<()> {
    if let Some(p) = peer {
        if p.is_empty() || p.len() > 64 || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("--peer {p:?}: a peer name from the configuration (no spaces)");
        }
    }
    let request = format!(
        "rekey {}{}",
        if ike { "ike" } else { "child" },
        peer.map(|p| format!(" {p}")).unwrap_or_default()
    );
    let mut failed = false;
    for (sock, _) in target.sockets()? {
        let raw = match espip::control::request(&sock, &request) {
            Ok(r) => r,
            Err(espip::control::ControlError::NotRunning(..)) if target.is_listing() => continue,
            Err(e) => {
                return Err(anyhow::Error::from(e))
                    .with_context(|| format!("asking the daemon at {}", sock.display()))
            }
        };
        let v: serde_json::Value = serde_json::from_slice(&raw)?;
        match (
            v.get("rekey").and_then(|s| s.as_str()),
            v.get("error").and_then(|s| s.as_str()),
        ) {
            (Some(s), _) => println!("{}: {}", sock.display(), espip::control::clean(s)),
            (_, Some(e)) => {
                eprintln!("{}: {}", sock.display(), espip::control::clean(e));
                failed = true;
            }
            _ => bail!(
                "the daemon at {} gave no answer espip understands",
                sock.display()
            ),
        }
    }
    if failed {
        bail!("no rekey started at one daemon or more (see above)");
    }
    Ok(())
}

fn show(target: &Target, json: bool) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut all = Vec::new();
    let sockets = target.sockets()?;
    let listing = target.is_listing();
    let mut printed = 0;
    for (sock, netns) in &sockets {
        let raw = match espip::control::request(sock, "status") {
            Ok(r) => r,
            // Listing: a socket (or a namespace's directory) left by a stopped daemon is
            // skipped without a word.
            Err(espip::control::ControlError::NotRunning(..)) if listing => continue,
            Err(e) => return Err(e.into()),
        };
        let mut st: espip::status::Status = serde_json::from_slice(&raw).with_context(|| {
            format!("the daemon at {} sent an unreadable answer", sock.display())
        })?;
        st.netns = netns.clone();
        if json {
            all.push(st);
        } else {
            if printed > 0 {
                println!();
            }
            // Names and addresses come from the daemon: no escape sequences reach the terminal.
            print!("{}", espip::control::clean(&st.to_text(now)));
            printed += 1;
        }
    }
    if listing && all.is_empty() && printed == 0 {
        bail!(
            "no espip daemon is running (the sockets in {} are left by stopped ones)",
            espip::config::default_dir().display()
        );
    }
    if json {
        // One daemon: its object; several: an array. JSON escapes control characters.
        let out = if all.len() == 1 {
            serde_json::to_string_pretty(&all[0])?
        } else {
            serde_json::to_string_pretty(&all)?
        };
        println!("{out}");
    }
    Ok(())
}

fn sa(target: &Target, wireshark: bool, write: Option<&std::path::Path>) -> Result<()> {
    use espip::control::clean;
    let mut lines = Vec::new();
    let mut notes = Vec::new();
    for (sock, _) in target.sockets()? {
        let req = if wireshark { "sa-keys" } else { "sa" };
        let raw = match espip::control::request(&sock, req) {
            Ok(r) => r,
            Err(espip::control::ControlError::NotRunning(..)) if target.is_listing() => continue,
            Err(e) => return Err(e.into()),
        };
        let sas: Vec<espip::status::SaExport> =
            serde_json::from_slice(&raw).with_context(|| {
                format!("the daemon at {} sent an unreadable answer", sock.display())
            })?;
        for sa in sas {
            if !wireshark {
                println!(
                    "{} {:>3} spi {:#010x} {} -> {} {}",
                    clean(&sa.peer),
                    clean(&sa.direction),
                    sa.spi,
                    clean(&sa.src),
                    clean(&sa.dst),
                    clean(&sa.cipher)
                );
                continue;
            }
            match sa.wireshark {
                Some(l) => {
                    if let Err(why) = espip::wireshark::check_line(&l) {
                        bail!(
                            "the daemon at {} sent an SA line espip does not write ({why}); refusing to print or store it",
                            sock.display()
                        );
                    }
                    lines.push(l)
                }
                None => notes.push(clean(&format!(
                    "# SA {:#010x} ({} -> {}, {}): Wireshark's ESP dissector has no {} (RFC 7634) decryption{}; its packets stay encrypted in Wireshark",
                    sa.spi, sa.src, sa.dst, sa.cipher, sa.cipher, tshark_version().map(|v| format!(" (installed: {v})")).unwrap_or_default()
                ))),
            }
        }
    }
    if !wireshark {
        eprintln!("(add --wireshark for Wireshark esp_sa lines with the keys)");
        return Ok(());
    }
    // IKEv2 peers: the IKE SAs' keys for Wireshark's ikev2_decryption_table.
    let ike_lines = ike_key_lines(target)?;
    for n in &notes {
        println!("{n}");
    }
    if lines.is_empty() {
        if write.is_some() {
            eprintln!("nothing written: no SA has a cipher Wireshark can decrypt (see above)");
        }
        return Ok(());
    }
    print_wireshark(&lines, &ike_lines);
    if let Some(path) = write {
        write_key_lines(path, &lines, "SA(s)")?;
        if !ike_lines.is_empty() {
            let ike_path = path.with_file_name("ikev2_decryption_table");
            write_key_lines(&ike_path, &ike_lines, "IKE SA(s)")?;
        }
    }
    Ok(())
}

/// The IKE SAs' keys of every daemon's IKEv2 peers, as Wireshark ikev2_decryption_table
/// lines; a line espip would not write is refused.
fn ike_key_lines(target: &Target) -> Result<Vec<zeroize::Zeroizing<String>>> {
    let mut ike_lines = Vec::new();
    for (sock, _) in target.sockets()? {
        let Ok(raw) = espip::control::request(&sock, "ike-keys") else {
            continue;
        };
        let raw = zeroize::Zeroizing::new(raw);
        let got: Vec<zeroize::Zeroizing<String>> = serde_json::from_slice(&raw).unwrap_or_default();
        for l in got {
            if let Err(why) = espip::wireshark::check_ikev2_line(&l) {
                bail!(
                    "the daemon at {} sent an IKEv2 key line espip does not write ({why}); refusing to print or store it",
                    sock.display()
                );
            }
            ike_lines.push(l);
        }
    }
    Ok(ike_lines)
}

/// The esp_sa lines, the ikev2_decryption_table lines and a tshark command using both.
fn print_wireshark(lines: &[zeroize::Zeroizing<String>], ike_lines: &[zeroize::Zeroizing<String>]) {
    println!("# Wireshark esp_sa (Preferences > Protocols > ESP > ESP SAs, or ~/.config/wireshark/esp_sa):");
    for l in lines {
        println!("{}", l.as_str());
    }
    let mut opts: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "-o {}",
                espip::rules::shell_word(&format!("uat:esp_sa:{}", l.as_str()))
            )
        })
        .collect();
    if !ike_lines.is_empty() {
        println!("# Wireshark ikev2_decryption_table (Preferences > Protocols > ISAKMP > IKEv2 Decryption Table):");
        for l in ike_lines {
            println!("{}", l.as_str());
            opts.push(format!(
                "-o {}",
                espip::rules::shell_word(&format!("uat:ikev2_decryption_table:{}", l.as_str()))
            ));
        }
    }
    println!("# tshark, reading a capture (replace FILE):");
    println!(
        "tshark -o esp.enable_encryption_decode:TRUE -o esp.enable_authentication_check:TRUE {} -r FILE",
        opts.join(" ")
    );
}

/// Write key lines (one per line) to `path`, mode 0600, without following a link there.
fn write_key_lines(
    path: &std::path::Path,
    lines: &[zeroize::Zeroizing<String>],
    what: &str,
) -> Result<()> {
    let mut text = zeroize::Zeroizing::new(String::new());
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    let mode = espip::sys::safefs::write_private(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} {what} to {} (mode {mode:04o})",
        lines.len(),
        path.display()
    );
    Ok(())
}

/// `tshark --version`'s first line, if tshark is installed.
/// Refuse a proposal espip cannot use before a lab starts.
fn check_proposals(ike: &str, esp: &str) -> Result<()> {
    espip::ike::proposal::IkeProposal::parse(ike).map_err(|e| anyhow::anyhow!("--ike: {e}"))?;
    espip::ike::proposal::EspProposal::parse(esp).map_err(|e| anyhow::anyhow!("--esp: {e}"))?;
    Ok(())
}

fn tshark_version() -> Option<String> {
    let out = std::process::Command::new("tshark")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "TShark (Wireshark) 4.0.17 (Git v4.0.17 packaged as 4.0.17-0+deb12u1)."
    let version = text
        .lines()
        .next()?
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    Some(format!("tshark {version}"))
}

impl LabArgs {
    fn run(self) -> Result<espip_lab::LabRun> {
        Ok(espip_lab::LabRun {
            keep: self.keep,
            pcap_dir: self.pcap,
            install: !self.no_install,
            exe: std::env::current_exe().context("locating the espip binary")?,
        })
    }
}

fn cipher_arg(name: &str) -> Result<Cipher> {
    Cipher::from_name(name).with_context(|| {
        format!("unknown cipher {name:?}; expected aes-128-gcm, aes-256-gcm or chacha20-poly1305")
    })
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a file or the journal gets plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
}

fn check(config: &std::path::Path) -> Result<()> {
    let cfg = Config::load(config)?;
    let i = &cfg.interface;
    if let Some(l) = i.local {
        if !espip::sys::is_local_address(l) {
            bail!("{}: {}", config.display(), espip::sys::not_local_message(l));
        }
    }
    println!("{}: OK", config.display());
    println!(
        "interface {}: addresses [{}], mtu {}, outer source {}",
        i.name,
        i.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        i.mtu
            .map(|m| m.to_string())
            .unwrap_or_else(|| "derived at start from the path MTU".into()),
        i.local
            .map(|l| l.to_string())
            .unwrap_or_else(|| "chosen by routing".into())
    );
    for p in &cfg.peers {
        let allowed = p
            .allowed_ips
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "peer {:?}: {}; routes and accepts [{allowed}]",
            p.name,
            p.describe(i.listen_port)
        );
        if let Some(k) = cfg.ike.iter().find(|k| k.peer == p.name) {
            let names = |v: Vec<String>| v.join(", ");
            let udp = matches!(
                p.encap,
                espip::datapath::EncapSpec::EspPending {
                    udp_port: Some(_),
                    ..
                }
            );
            println!(
                "  IKEv2 {}: {} -> {}, pre-shared key of {} bytes; IKE [{}], ESP [{}]",
                match k.role {
                    espip::config::IkeRole::Initiator => "initiator (connects at start)",
                    espip::config::IkeRole::Responder => "responder (waits for the peer)",
                },
                k.local_id,
                k.remote_id,
                k.psk.len(),
                names(k.ike_proposals.iter().map(|x| x.name()).collect()),
                names(k.esp_proposals.iter().map(|x| x.name()).collect()),
            );
            println!(
                "  CHILD_SA rekeyed {}-{} s after it is made (lifetime {} s), IKE SA {}-{} s (lifetime {} s); liveness check after {}; selectors: ours [{}], theirs [{allowed}]; UDP 500{}",
                k.child_lifetime - k.rekey_margin - k.rekey_jitter,
                k.child_lifetime - k.rekey_margin,
                k.child_lifetime,
                k.ike_lifetime - k.rekey_margin - k.rekey_jitter,
                k.ike_lifetime - k.rekey_margin,
                k.ike_lifetime,
                if k.dpd_interval == 0 {
                    "never (dpd_interval = 0)".to_string()
                } else {
                    format!("{} s of silence", k.dpd_interval)
                },
                names(k.local_ts.iter().map(|x| x.to_string()).collect()),
                if udp {
                    format!(", then the NAT-T port {} (ESP in UDP)", i.listen_port)
                } else {
                    ", ESP as IP protocol 50 (a NAT between the peers is an error: use esp-udp)".into()
                }
            );
        }
    }
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

/// Print the end of a lab report; a failed check makes the exit status 1.
fn finish(report: espip_lab::Report) {
    print!("{}", report.render());
    if !report.passed() {
        std::process::exit(1);
    }
}

fn main() {
    // Errors are printed as one chain of causes ("error: a: b"), never as a backtrace, even
    // when RUST_BACKTRACE is set: they are messages for the user, not crashes.
    if let Err(e) = real_main() {
        // Our error types name their cause in their own message; add a cause only when it
        // is not already there.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg = format!("{msg}: {c}");
            }
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn megabytes_arg(megabytes: u64) -> Result<u64> {
    if megabytes == 0 {
        bail!("--megabytes must be at least 1");
    }
    Ok(megabytes)
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run { config } => {
            init_logging(&cli.log_level);
            let cfg = Config::load(&config)?;
            espip::daemon::run(cfg, Some(&config))?;
        }
        Cmd::Reload { config } => reload(&config)?,
        Cmd::Check { config } => check(&config)?,
        Cmd::Show { target, json } => show(&target, json)?,
        Cmd::Sa {
            target,
            wireshark,
            write,
        } => sa(&target, wireshark, write.as_deref())?,
        Cmd::Rekey { target, peer, ike } => rekey(&target, peer.as_deref(), ike)?,
        Cmd::Rules { config, remove } => {
            let cfg = Config::load(&config)?;
            print!("{}", espip::rules::script(&cfg, remove));
        }
        Cmd::Genkey { cipher } => {
            let k = espip::sys::random_key(cipher_arg(&cipher)?)?;
            println!("{}", k.to_hex().as_str());
        }
        Cmd::Lab { scenario } => lab(scenario)?,
        Cmd::LabTool { tool } => lab_tool(tool)?,
    }
    Ok(())
}

/// `espip lab SCENARIO`: run one scenario and print its report.
fn lab(scenario: LabCmd) -> Result<()> {
    match scenario {
        LabCmd::Down { name } => {
            let gone = espip_lab::netns::down(&name)?;
            if gone.is_empty() {
                bail!("no namespace of lab {name} exists (`ip netns list` shows what does)");
            }
            println!("stopped and deleted: {}", gone.join(" "));
        }
        LabCmd::Multipath(args) => finish(espip_lab::multipath::run(&multipath_options(args)?)?),
        LabCmd::Ike(args) => finish(espip_lab::ike::run_ike(&ike_options(args)?)?),
        LabCmd::Strongswan(args) => {
            finish(espip_lab::ike::run_strongswan(&strongswan_options(args)?)?)
        }
        LabCmd::P2p(args) => finish(espip_lab::p2p::run(&p2p_options(args)?)?),
        LabCmd::Gateway {
            common,
            cipher,
            without_forward,
        } => {
            let opts = espip_lab::gateway::GatewayOptions {
                cipher: cipher_arg(&cipher)?,
                without_forward,
                run: common.run()?,
            };
            finish(espip_lab::gateway::run(&opts)?);
        }
        LabCmd::Roaming {
            common,
            mode,
            cipher,
            megabytes,
            keying,
            strongswan,
        } => {
            if strongswan.is_some() && keying != cli::KeyingArg::Ikev2 {
                anyhow::bail!(
                    "lab roaming: --strongswan runs an IKEv2 pair with MOBIKE; add --keying ikev2"
                );
            }
            if keying == cli::KeyingArg::Ikev2 && !matches!(mode, ModeArg::EspUdp) {
                anyhow::bail!(
                    "lab roaming: --keying ikev2 runs over --mode esp-udp (its IKEv2 pair is the strongSwan-style NAT-T one); leave --mode out"
                );
            }
            let mode = match mode {
                ModeArg::Esp => LabMode::Esp(cipher_arg(&cipher)?),
                ModeArg::EspUdp => LabMode::EspUdp(cipher_arg(&cipher)?),
                ModeArg::Ipip => anyhow::bail!(
                    "lab roaming: --mode ipip cannot roam (ipip peers are told apart by their address); use esp or esp-udp"
                ),
            };
            let opts = espip_lab::roaming::RoamingOptions {
                mode,
                megabytes,
                ikev2: keying == cli::KeyingArg::Ikev2,
                strongswan: strongswan.map(|s| match s {
                    cli::SwSideArg::Client => espip_lab::ike::SwSide::Client,
                    cli::SwSideArg::Server => espip_lab::ike::SwSide::Server,
                }),
                run: common.run()?,
            };
            finish(espip_lab::roaming::run(&opts)?);
        }
        LabCmd::Upstream { common } => {
            let opts = espip_lab::upstream::UpstreamOptions { run: common.run()? };
            finish(espip_lab::upstream::run(&opts)?);
        }
        LabCmd::Hub { common, cipher } => {
            let opts = espip_lab::hub::HubOptions {
                cipher: cipher_arg(&cipher)?,
                run: common.run()?,
            };
            finish(espip_lab::hub::run(&opts)?);
        }
        LabCmd::SameLan {
            common,
            cipher,
            megabytes,
        } => {
            let opts = espip_lab::same_lan::SameLanOptions {
                cipher: cipher_arg(&cipher)?,
                megabytes: megabytes_arg(megabytes)?,
                run: common.run()?,
            };
            finish(espip_lab::same_lan::run(&opts)?);
        }
    }
    Ok(())
}

/// The options of `espip lab multipath`, checked.
fn multipath_options(args: MultipathArgs) -> Result<espip_lab::multipath::MultipathOptions> {
    let MultipathArgs {
        common,
        mode,
        cipher,
        link1,
        link2,
        links,
        scheduler,
        seconds,
        redundant_loss,
        compare_mptcp,
        runs,
        glorytun,
        no_equal_delay,
        ab_equal_delay,
        ab_repair,
        ab_trains,
        ab_fast_acks,
        plot,
        congestion,
        rate_change,
        static_weights,
        topology,
        keying,
    } = args;
    let ab = [
        (ab_equal_delay, "equal_delay"),
        (ab_repair, "repair"),
        (ab_trains, "capacity_trains"),
        (ab_fast_acks, "fast_acks"),
    ]
    .into_iter()
    .find_map(|(on, key)| on.then_some(key));
    let compare_mptcp = compare_mptcp || runs.is_some() || glorytun.is_some() || ab.is_some();
    let runs = runs.unwrap_or(1);
    if !(1..=20).contains(&runs) {
        bail!("--runs must be 1..20");
    }
    if let Some(g) = &glorytun {
        if !g.is_file() {
            bail!(
                "--glorytun {}: no such file (give the path of glorytun's binary, e.g. ../shared/anchors/glorytun-0.3.4-32267e8)",
                g.display()
            );
        }
    }
    let ikev2 = keying == cli::KeyingArg::Ikev2;
    if ikev2 && !matches!(mode, ModeArg::EspUdp) {
        bail!("--keying ikev2 runs over --mode esp-udp (IKE's NAT-T port and ESP in UDP); leave --mode out");
    }
    let topology = match topology {
        TopologyArg::Pair => espip_lab::multipath::Topology::Pair,
        TopologyArg::Uplinks => espip_lab::multipath::Topology::Uplinks,
    };
    let links = match links {
        Some(l) => {
            if topology == espip_lab::multipath::Topology::Uplinks {
                bail!("--links is for --topology pair; the uplinks topology takes --link1 and --link2");
            }
            espip_lab::multipath::parse_links(&l).map_err(|e| anyhow::anyhow!("--links {e}"))?
        }
        None => {
            let l1 = link1
                .parse::<espip_lab::multipath::LinkSpec>()
                .map_err(|e| anyhow::anyhow!("--link1 {e}"))?;
            let mut l2 = link2
                .parse::<espip_lab::multipath::LinkSpec>()
                .map_err(|e| anyhow::anyhow!("--link2 {e}"))?;
            // The pair's link 2 is the IPv6 one (the uplinks are IPv4, behind a NAT).
            l2.ipv6 = topology == espip_lab::multipath::Topology::Pair;
            if l1.ipv6 && topology == espip_lab::multipath::Topology::Pair {
                bail!("--link1 is IPv4 (link 2 is the IPv6 one); use --links to choose each link's family");
            }
            vec![l1, l2]
        }
    };
    if topology == espip_lab::multipath::Topology::Uplinks {
        if !matches!(mode, ModeArg::EspUdp) {
            bail!("--topology uplinks needs --mode esp-udp: uplink 2 is behind a NAT, which passes UDP");
        }
        if rate_change {
            bail!("--rate-change runs on --topology pair only (it changes the pair's link 1)");
        }
        if compare_mptcp {
            bail!("--compare-mptcp, --runs and --glorytun run on --topology pair only (MPTCP's subflows need the pair's addresses)");
        }
    }
    if let Some(cc) = &congestion {
        if !["cubic", "bbr", "reno"].contains(&cc.as_str()) {
            bail!("--congestion {cc:?}: expected cubic, bbr or reno");
        }
    }
    if rate_change && matches!(mode, ModeArg::Ipip) {
        bail!("--rate-change reads the paths' capacity estimates, which need probes: use --mode esp-udp or esp");
    }
    let mode = match mode {
        ModeArg::Esp => LabMode::Esp(cipher_arg(&cipher)?),
        ModeArg::EspUdp => LabMode::EspUdp(cipher_arg(&cipher)?),
        ModeArg::Ipip => LabMode::IpIp,
    };
    let scheduler = espip::multipath::Scheduler::from_name(&scheduler).with_context(|| {
        format!("--scheduler {scheduler:?}: expected spread, earliest, failover or redundant")
    })?;
    if !(0.0..=50.0).contains(&redundant_loss) {
        bail!("--redundant-loss must be 0..50 percent");
    }
    if !(1..=600).contains(&seconds) {
        bail!("--seconds must be 1..600");
    }
    Ok(espip_lab::multipath::MultipathOptions {
        topology,
        mode,
        links,
        scheduler,
        seconds,
        redundant_loss,
        compare_mptcp,
        runs,
        glorytun: glorytun.map(|g| std::path::absolute(&g)).transpose()?,
        plot: plot.map(|p| std::path::absolute(&p)).transpose()?,
        equal_delay: !no_equal_delay,
        ab,
        congestion,
        rate_change,
        adapt: !static_weights,
        ikev2,
        run: common.run()?,
    })
}

/// The options of `espip lab ike`, checked.
fn ike_options(args: IkeArgs) -> Result<espip_lab::ike::IkeLabOptions> {
    let IkeArgs {
        common,
        mode,
        ike,
        esp,
        rekey,
        seconds,
        flood,
    } = args;
    check_proposals(&ike, &esp)?;
    if flood > 600 {
        bail!("--flood must be 0..600 s");
    }
    if !(3..=600).contains(&rekey) || !(5..=3600).contains(&seconds) {
        bail!("--rekey must be 3..600 s and --seconds 5..3600");
    }
    Ok(espip_lab::ike::IkeLabOptions {
        mode: match mode {
            ModeArg::Esp => "esp".into(),
            ModeArg::EspUdp => "esp-udp".into(),
            ModeArg::Ipip => bail!("--mode ipip: IKEv2 keys ESP; use esp-udp or esp"),
        },
        ike,
        esp,
        rekey,
        seconds,
        flood,
        run: common.run()?,
    })
}

/// The options of `espip lab strongswan`, checked.
fn strongswan_options(args: StrongswanArgs) -> Result<espip_lab::ike::StrongswanOptions> {
    let StrongswanArgs {
        common,
        initiator,
        ike,
        esp,
        megabytes,
        no_dpd,
    } = args;
    check_proposals(&ike, &esp)?;
    Ok(espip_lab::ike::StrongswanOptions {
        espip_initiates: matches!(initiator, InitiatorArg::Espip),
        ike,
        esp,
        megabytes,
        dpd: !no_dpd,
        run: common.run()?,
    })
}

/// The options of `espip lab p2p`, checked.
fn p2p_options(args: P2pArgs) -> Result<P2pOptions> {
    let P2pArgs {
        common,
        mode,
        cipher,
        esn,
        megabytes,
        outer,
    } = args;
    let mode = match mode {
        ModeArg::Esp => LabMode::Esp(cipher_arg(&cipher)?),
        ModeArg::EspUdp => LabMode::EspUdp(cipher_arg(&cipher)?),
        ModeArg::Ipip => {
            if esn {
                bail!("--esn applies to --mode esp only");
            }
            LabMode::IpIp
        }
    };
    Ok(P2pOptions {
        mode,
        megabytes: megabytes_arg(megabytes)?,
        esn,
        outer_v6: outer == OuterArg::Ipv6,
        run: common.run()?,
    })
}

/// `espip lab-tool TOOL`: the helpers the labs run inside their namespaces.
fn lab_tool(tool: ToolCmd) -> Result<()> {
    match tool {
        ToolCmd::Sink { listen } => println!("{}", espip_lab::transfer::sink(listen)?),
        ToolCmd::HttpServe { listen, name } => espip_lab::transfer::http_serve(listen, &name)?,
        ToolCmd::Flood {
            dst,
            spi,
            seconds,
            pps,
        } => {
            let [a, b, c, d] = espip_lab::flood::flood(dst, spi, seconds, pps)?;
            println!(
                "{{\"esp_known_spi\": {a}, \"esp_unknown_spi\": {b}, \"ipip\": {c}, \"short\": {d}}}"
            );
        }
        ToolCmd::IkeFlood {
            to,
            seconds,
            proposal,
            bad_ke,
            natt,
            from,
        } => {
            let n = espip_lab::ike::ike_flood(
                to,
                seconds,
                &espip_lab::ike::FloodOptions {
                    proposal,
                    bad_ke,
                    natt,
                    from,
                },
            )?;
            println!("{{\"ike_sa_init\": {n}}}");
        }
        ToolCmd::Source { connect, bytes } => {
            println!("{}", espip_lab::transfer::source(connect, bytes)?)
        }
        ToolCmd::Relay {
            ifaces,
            delay_ms,
            loss_percent,
            jitter_ms,
            cut,
        } => {
            if !(0.0..=100.0).contains(&loss_percent)
                || !(0.0..=10_000.0).contains(&delay_ms)
                || !(0.0..=10_000.0).contains(&jitter_ms)
            {
                bail!("--loss-percent must be 0..100, --delay-ms and --jitter-ms 0..10000");
            }
            let opts = espip_lab::relay::RelayOptions {
                ifaces: [ifaces[0].clone(), ifaces[1].clone()],
                delay: std::time::Duration::from_secs_f64(delay_ms / 1e3),
                jitter: std::time::Duration::from_secs_f64(jitter_ms / 1e3),
                loss: loss_percent / 100.0,
                cut,
            };
            let [ab, ba] = espip_lab::relay::run(&opts)?;
            println!("{{\"frames\": [{}, {}], \"lost\": [{}, {}], \"cut\": [{}, {}], \"refused\": [{}, {}]}}",
                ab.frames, ba.frames, ab.lost, ba.lost, ab.cut, ba.cut, ab.refused, ba.refused);
        }
    }
    Ok(())
}
