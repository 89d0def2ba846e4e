//! Records the commit the binary was built from, for `tether --version`: the
//! `BUILD_COMMIT` environment variable when set (a container build, which has no
//! `.git`), else `git rev-parse`, else "unknown". (Not `TETHER_*`: at run time those
//! are configuration overrides.) A build from a tree with
//! uncommitted changes says so with a `-dirty` suffix.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_COMMIT");
    // Rebuilt when HEAD moves (a checkout), when the branch it names moves (a commit),
    // and when the index changes (dirty or not). Asked of git, so it works from a
    // worktree too, whose `.git` is a file.
    let watched = [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--git-path", "index"]),
        git(&["symbolic-ref", "-q", "HEAD"])
            .and_then(|branch| git(&["rev-parse", "--git-path", &branch])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ];
    for path in watched.into_iter().flatten() {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = std::env::var("BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let head = git(&["rev-parse", "--short=12", "HEAD"])?;
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            Some(if dirty { format!("{head}-dirty") } else { head })
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_COMMIT_OF_TETHER={commit}");
}
