//! Release hygiene: the shipped binary is stripped and small, and the shell
//! completions and man pages come from the clap definitions.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The release binary may not grow past this (it was 48.7 MB with debug info).
const MAX_RELEASE_BYTES: u64 = 16 * 1024 * 1024;

fn tether(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tether {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const SUBCOMMANDS: [&str; 5] = ["run", "check-config", "iptables", "completions", "man"];

#[test]
fn completions_are_generated_for_bash_zsh_and_fish_with_every_subcommand() {
    for (shell, marker, option) in [
        ("bash", "complete -F _tether", "--config"),
        ("zsh", "#compdef tether", "--config"),
        ("fish", "complete -c tether", "-l config"),
    ] {
        let script = tether(&["completions", shell]);
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        assert!(script.contains(option), "{shell}: options too");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_man_page_lists_the_subcommands_each_of_which_has_a_page() {
    let page = tether(&["man"]);
    assert!(page.contains(".TH tether 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"));
    for sub in SUBCOMMANDS {
        let escaped = sub.replace('-', "\\-");
        assert!(
            page.contains(&format!("tether\\-{escaped}(1)")),
            "no {sub} in\n{page}"
        );
        let own = tether(&["man", sub]);
        assert!(own.contains(&format!(".TH tether-{sub} 1")), "{own}");
        assert!(own.contains(&format!("\\fBtether {escaped}\\fR")), "{own}");
    }
    let check = tether(&["man", "check-config"]);
    assert!(check.contains("\\-\\-config"), "{check}");
}

/// `[profile.release]` strips: the image's `cargo build --release` ships no
/// symbols or debug info.
#[test]
fn the_release_profile_strips() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let release = &manifest["profile"]["release"];
    assert_eq!(release.get("strip"), Some(&toml::Value::Boolean(true)));
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked \\\n    && install -D -m 0755 target/release/tether /out/tether"));
}

/// The release binary (built by `.ci/run` before the tests) has no DWARF
/// (`.debug_*`) or `.symtab` section and is under [`MAX_RELEASE_BYTES`]: what the
/// image ships, since its builder runs the same `cargo build --release --locked`.
#[test]
fn the_release_binary_is_stripped_and_under_the_bound() {
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_tether"));
    let release = debug
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("release").join("tether"))
        .unwrap();
    if !release.exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v.is_empty()),
            "CI is set but {} was not built (cargo build --release --locked)",
            release.display()
        );
        eprintln!("SKIPPED: no {} (cargo build --release)", release.display());
        return;
    }
    let bytes = std::fs::read(&release).unwrap();
    let sections = elf_sections(&bytes);
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    let kept: Vec<&String> = sections
        .iter()
        // .debug_gdb_scripts is loaded (a pointer to gdb's pretty-printers), not DWARF.
        .filter(|s| (s.starts_with(".debug") && *s != ".debug_gdb_scripts") || *s == ".symtab")
        .collect();
    assert!(kept.is_empty(), "not stripped: {kept:?}");
    assert!(
        (bytes.len() as u64) < MAX_RELEASE_BYTES,
        "{} bytes, over {MAX_RELEASE_BYTES}",
        bytes.len()
    );
    eprintln!("release binary: {} bytes", bytes.len());
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Section names of a little-endian ELF64 file.
fn elf_sections(elf: &[u8]) -> Vec<String> {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!(elf[4], 2, "ELF64");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(|i| {
            let name = strtab + u32_at(header(i));
            let end = elf[name..].iter().position(|&b| b == 0).unwrap() + name;
            String::from_utf8_lossy(&elf[name..end]).into_owned()
        })
        .collect()
}
