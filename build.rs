//! Build-time outputs of the command line: the version string with the git commit, and the
//! man pages (clap_mangen) and shell completions (clap_complete) written from the same clap
//! definitions `src/main.rs` runs (`src/cli.rs`). They land in `target/<profile>/assets/`,
//! where `cargo deb` picks them up (`[package.metadata.deb]` in Cargo.toml).

#![allow(dead_code)]

// The definitions use `crate::VERSION`.
const VERSION: &str = "";

include!("src/cli.rs");

use clap::CommandFactory;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git_commit();
    println!("cargo:rustc-env=ESPIP_GIT_COMMIT={commit}");
    let version = format!("{} ({commit})", env!("CARGO_PKG_VERSION"));
    let version: &'static str = Box::leak(version.into_boxed_str());
    let cmd = Cli::command().version(version).name("espip");
    let Some(dir) = assets_dir() else { return };
    if let Err(e) = write_assets(cmd, &dir) {
        println!(
            "cargo:warning=man pages and completions not written to {}: {e}",
            dir.display()
        );
    }
}

/// The commit the build is made from (`unknown` outside a git checkout); the build reruns
/// when HEAD moves.
fn git_commit() -> String {
    for f in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".into())
}

/// `target/<profile>/assets`, from OUT_DIR (`target/<profile>/build/espip-*/out`).
fn assets_dir() -> Option<PathBuf> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR")?);
    Some(out.ancestors().nth(3)?.join("assets"))
}

fn write_assets(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    // espip(8), and one page per subcommand: espip-run(8), espip-show(8), ...
    clap_mangen::generate_to(cmd.clone().hide(false), &man)?;
    for f in std::fs::read_dir(&man)? {
        let f = f?;
        let name = f.file_name().to_string_lossy().into_owned();
        // Section 8: a system administration command, as other tunnel daemons' pages.
        if let Some(stem) = name.strip_suffix(".1") {
            let text = std::fs::read_to_string(f.path())?.replacen(" 1 ", " 8 ", 1);
            let page = man.join(format!("{stem}.8"));
            std::fs::write(&page, text)?;
            std::fs::remove_file(f.path())?;
            // Debian installs manual pages compressed (gzip -9n: no name or time stamp, so
            // the package builds reproducibly); without gzip they stay plain.
            let _ = std::fs::remove_file(man.join(format!("{stem}.8.gz")));
            let _ = std::process::Command::new("gzip")
                .args(["-9n", "-f"])
                .arg(&page)
                .status();
        }
    }
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    let mut cmd = cmd;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "espip", &comp)?;
    }
    Ok(())
}
