//! The pure packet core must not touch the kernel, files, clocks, threads or logs above debug
//! (STYLE.md: "a test fails if the core imports it").

const CORE: &[&str] = &[
    "src/buf.rs",
    "src/datapath.rs",
    "src/prefix.rs",
    "src/replay.rs",
    "src/sa.rs",
    "src/wireshark.rs",
    "src/nat.rs",
    "src/gso.rs",
    "src/gro.rs",
    "src/status.rs",
    "src/wire/mod.rs",
    "src/wire/esp.rs",
    "src/wire/ip.rs",
    "src/wire/icmp.rs",
];

const FORBIDDEN: &[&str] = &[
    "crate::sys",
    "crate::daemon",
    "crate::lab",
    "crate::config",
    "std::fs",
    "std::io::",
    "std::net::UdpSocket",
    "std::net::Tcp",
    "std::process",
    "std::thread",
    "std::time::Instant",
    "Instant::now",
    "SystemTime",
    "tokio",
    "socket2",
    "nix::",
    "libc::",
    "rtnetlink",
    "ring::rand",
    "tracing::info",
    "tracing::warn",
    "tracing::error",
    "info!",
    "warn!",
    "error!",
    "println!",
    "eprintln!",
];

#[test]
fn core_is_free_of_io() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut bad = Vec::new();
    for file in CORE {
        let text = std::fs::read_to_string(format!("{root}/{file}"))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        // Only the non-test part counts: tests may print.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            for f in FORBIDDEN {
                if l.contains(f) {
                    bad.push(format!("{file}:{}: uses {f}: {l}", n + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the pure core touches the outside world:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_core_file_is_listed() {
    // A new file under src/wire must be added to CORE (or be deliberately an edge).
    let root = env!("CARGO_MANIFEST_DIR");
    for entry in std::fs::read_dir(format!("{root}/src/wire")).unwrap() {
        let p = entry.unwrap().path();
        let rel = format!("src/wire/{}", p.file_name().unwrap().to_string_lossy());
        assert!(
            CORE.contains(&rel.as_str()),
            "{rel} is not checked by the layering test"
        );
    }
}
