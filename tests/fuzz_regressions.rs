//! Replays every input the fuzzers ever failed on (`fuzz/regressions/<target>/`), and
//! the seed corpus (`fuzz/seeds/<target>/`), through the same checks the fuzz targets
//! run, so a fixed finding stays fixed under plain `cargo test`. How to fuzz:
//! `fuzz/README.md`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Runs `check` on every file under `fuzz/<dir>/<target>/`; the number of files.
fn replay(dir: &str, target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        // `.gitkeep` keeps an empty directory in git.
        .filter(|path| {
            path.is_file() && !path.file_name().unwrap().to_string_lossy().starts_with('.')
        })
        .collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{} fails the {target} checks again",
            path.display()
        );
    }
    files.len()
}

#[test]
fn request_target_regressions_and_seeds_pass() {
    replay("regressions", "request_target", checks::request_target);
    assert!(replay("seeds", "request_target", checks::request_target) > 0);
}

#[test]
fn challenge_regressions_and_seeds_pass() {
    replay("regressions", "challenge", checks::challenge);
    assert!(replay("seeds", "challenge", checks::challenge) > 0);
}

#[test]
fn config_regressions_and_seeds_pass() {
    replay("regressions", "config", checks::config);
    assert!(replay("seeds", "config", checks::config) > 0);
}

#[test]
fn request_head_regressions_and_seeds_pass() {
    replay("regressions", "request_head", checks::request_head);
    assert!(replay("seeds", "request_head", checks::request_head) > 0);
}
