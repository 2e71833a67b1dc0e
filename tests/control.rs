//! Namespace tests: The control side: privileges after the drop, the root-only control socket, `espip show`, and the metrics as Prometheus's own parser reads them.
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

#[test]
fn metrics_and_control_socket() {
    let Some(_g) = serial() else { return };
    let h = half_lab_with(
        "metrics",
        Cipher::Aes128Gcm,
        "\n[metrics]\nlisten = \"127.0.0.1:9587\"\n",
    );
    // After setup the daemon is its own system user `espip` (created on demand; not the shared
    // `nobody`) with CAP_NET_ADMIN and CAP_NET_RAW only, on every thread, and cannot regain
    // privileges.
    let espip_uid = nix::unistd::User::from_name("espip")
        .unwrap()
        .expect("the daemon created its user")
        .uid
        .as_raw();
    let pid = h.daemon.pid().unwrap();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(
            field("Uid:"),
            format!("{espip_uid} {espip_uid} {espip_uid} {espip_uid}"),
            "{status}"
        );
        for caps in ["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:"] {
            assert_eq!(field(caps), "0000000000003000", "{caps} {status}");
        }
        assert_eq!(field("NoNewPrivs:"), "1");
    }
    // Root-only control socket.
    use std::os::unix::fs::PermissionsExt;
    let sock = h.dir.join("state/control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let show = Command::new(exe())
        .args(["show", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("peer: b") && text.contains("sa out: spi 0x00001001"),
        "{text}"
    );
    assert!(
        !text.contains(h.keys.a_to_b.to_hex().as_str()),
        "no key in show"
    );
    // The metrics (OpenMetrics, from prometheus-client), parsed by the Prometheus project's own
    // Python parser for that format.
    let get = |path: &str| {
        let out = netns::run(h.a.command("curl").args([
            "-s",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:9587{path}"),
        ]))
        .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let body = get("/metrics");
    assert!(body.ends_with("\n200"), "{body}");
    assert!(get("/other").ends_with("404"));
    let parse = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as f\nfor fam in f(sys.stdin.read()):\n  for s in fam.samples:\n    print(fam.type, s.name, s.labels.get('reason', ''), s.value)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    parse
        .stdin
        .as_ref()
        .unwrap()
        .write_all(body.rsplit_once('\n').map_or("", |(b, _)| b).as_bytes())
        .unwrap();
    let out = parse.wait_with_output().unwrap();
    let parsed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "prometheus_client refused the metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "counter espip_peer_packets_total  0.0",
        "counter espip_drops_total bad_icv 0.0",
        "counter espip_drops_total replay 0.0",
        "gauge espip_mtu_bytes  1446.0",
    ] {
        assert!(parsed.contains(line), "{line:?} missing in:\n{parsed}");
    }
    assert!(
        !body.contains(h.keys.a_to_b.to_hex().as_str()),
        "no key in metrics"
    );
    drop(h);
}
