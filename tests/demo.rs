//! `tether demo` as a newcomer runs it: the binary, small numbers, its summary and
//! its exit code.

use std::process::{Command, Output};

fn demo(args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("demo")
        .args(args)
        .output()
        .expect("tether runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

/// The values of the summary row starting with `label`, as words.
fn row<'a>(summary: &'a str, label: &str) -> Vec<&'a str> {
    let line = summary
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row in:\n{summary}"));
    line[label.len()..].split_whitespace().collect()
}

/// The row of `server` in the table of gauges beside the servers' counts.
fn metrics_row<'a>(summary: &'a str, server: &str) -> Vec<&'a str> {
    summary
        .lines()
        .filter_map(|l| l.strip_prefix(server))
        .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
        .find(|words| words.first().is_some_and(|w| w.parse::<usize>().is_ok()))
        .unwrap_or_else(|| panic!("no gauge row for {server} in:\n{summary}"))
}

fn num(word: &str) -> usize {
    word.parse()
        .unwrap_or_else(|_| panic!("{word:?} is not a number"))
}

#[test]
fn demo_shows_the_leak_without_tether_and_the_cap_and_reaping_with_it() {
    let (out, stdout) = demo(&["--preheats", "24", "--duration", "2s", "--cap", "2"]);
    assert!(
        out.status.success(),
        "exit {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: one line a second, no cursor movement.
    assert!(!stdout.contains('\x1b'), "ANSI codes in piped output");
    assert!(stdout.contains("== without tether"));
    assert!(stdout.contains("== with tether"));

    for server in ["registry", "auth"] {
        let peak = row(&stdout, &format!("{server} sockets, peak"));
        let end = row(&stdout, &format!("{server} sockets, at the end"));
        let (leaked, capped) = (num(peak[0]), num(peak[1]));
        assert!(
            leaked >= 24,
            "{server}: every preheat leaks a socket: {leaked}"
        );
        assert_eq!(num(end[0]), leaked, "{server}: nothing closes them");
        assert!(
            capped <= 2,
            "{server}: {capped} sockets through tether, cap 2"
        );
        assert_eq!(num(end[1]), 0, "{server}: reaped through tether");

        // /metrics beside the servers' own counts: peak and end agree with the cap.
        let metrics = metrics_row(&stdout, server);
        let (gauge_peak, server_peak, gauge_end, server_end) = (
            num(metrics[0]),
            num(metrics[1]),
            num(metrics[2]),
            num(metrics[3]),
        );
        assert!(gauge_peak <= 2 && server_peak == capped);
        assert_eq!((gauge_end, server_end), (0, 0));
    }
    let clients = row(&stdout, "client sockets, at the end");
    assert!(num(clients[0]) >= 24 * 2);
    assert_eq!(
        num(clients[1]),
        0,
        "tether closed the client's leaked sockets"
    );
    assert_eq!(row(&stdout, "preheats succeeded"), ["24/24", "24/24"]);
    assert!(stdout.contains("result: PASS"), "{stdout}");
}

#[test]
fn demo_exits_nonzero_when_tether_cannot_reap_within_the_duration() {
    // An idle timeout far longer than the wait: the sockets are still open at the end.
    let (out, stdout) = demo(&[
        "--preheats",
        "8",
        "--duration",
        "1s",
        "--idle-timeout",
        "30s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("result: FAIL"), "{stdout}");
    assert!(
        stdout.contains("did not reap every socket to zero"),
        "{stdout}"
    );
}

/// A tmux server of the test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// `None` (the test is skipped) without tmux, except in CI, where it fails.
    fn start() -> Option<Tmux> {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
            assert!(!ci, "CI is set but tmux is missing (apt-get install tmux)");
            eprintln!("SKIPPED: no tmux");
            return None;
        }
        Some(Tmux {
            socket: format!("tether-demo-test-{}", std::process::id()),
        })
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// Runs the demo in a real terminal `width` columns wide and returns everything it
/// left on it (scrollback included), once it has exited 0.
fn demo_in_tmux(tmux: &Tmux, width: usize) -> String {
    let session = format!("w{width}");
    let script = format!(
        "'{}' demo --preheats 24 --duration 2s --cap 2; echo TETHER-DEMO-EXIT=$?; exec sleep 600",
        env!("CARGO_BIN_EXE_tether")
    );
    let (w, h) = (width.to_string(), "40".to_string());
    tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        &w,
        "-y",
        &h,
        "sh",
        "-c",
        &script,
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let screen = tmux.cmd(&["capture-pane", "-p", "-t", &session, "-S", "-"]);
        if let Some(at) = screen.find("TETHER-DEMO-EXIT=") {
            let code = screen[at..].lines().next().unwrap();
            assert_eq!(code, "TETHER-DEMO-EXIT=0", "{screen}");
            return screen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo did not end:\n{screen}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn the_live_view_stays_intact_in_a_terminal_and_shows_the_diagnosis_as_its_own_line() {
    let Some(tmux) = Tmux::start() else {
        return;
    };
    for width in [80, 130] {
        let screen = demo_in_tmux(&tmux, width);
        let lines: Vec<&str> = screen.lines().collect();
        // Drawn in place: each run's block is on the terminal once, not once per
        // redraw, and no log line went into the view.
        for label in ["without tether ", "with tether "] {
            let n = lines.iter().filter(|l| l.starts_with(label)).count();
            assert_eq!(n, 1, "{width} columns: {label:?} {n} times:\n{screen}");
        }
        assert!(
            !screen.contains("WARN") && !screen.contains("tether::"),
            "{width} columns: a log line in the view:\n{screen}"
        );
        // The tether run's block: its rows, then the diagnosis on a line of its own
        // (wrapped under its label if the terminal is narrow), then a blank line.
        let start = lines
            .iter()
            .position(|l| l.starts_with("with tether "))
            .unwrap();
        let block: Vec<&str> = lines[start..]
            .iter()
            .copied()
            .take_while(|l| !l.is_empty())
            .collect();
        assert!(block[1].starts_with("  registry "), "{block:#?}");
        assert!(block[2].starts_with("  auth "), "{block:#?}");
        assert!(block[3].starts_with("  client "), "{block:#?}");
        assert!(
            block[4].starts_with("  diagnosis: tether names client 127.0.0.1: "),
            "{width} columns: {block:#?}"
        );
        let diagnosis: Vec<&str> = block[4..].iter().map(|l| l.trim()).collect();
        assert!(
            diagnosis.join(" ").ends_with("a new HTTP client per job"),
            "{width} columns: {block:#?}"
        );
        for line in &block[5..] {
            assert!(line.starts_with(&" ".repeat(13)), "continuation: {line:?}");
        }
        // No line of the live view filled the width (a full line wraps on some
        // terminals and shifts the next redraw).
        let summary = lines.iter().position(|l| l.starts_with("summary")).unwrap();
        let first = lines
            .iter()
            .position(|l| l.starts_with("without tether "))
            .unwrap();
        for line in &lines[first..summary] {
            assert!(line.chars().count() < width, "{width} columns: {line:?}");
        }
        assert!(screen.contains("result: PASS"), "{screen}");
        assert!(
            screen.contains("tether's log during the demo: "),
            "the log file is named:\n{screen}"
        );
        let file = screen
            .lines()
            .find_map(|l| l.strip_prefix("tether's log during the demo: "))
            .unwrap()
            .trim();
        let log = std::fs::read_to_string(file).unwrap();
        assert!(
            log.contains("probably creating a new HTTP client per job"),
            "the warning went to the file instead: {log}"
        );
        let _ = std::fs::remove_file(file);
        // For the report: the final screen.
        let visible = tmux.cmd(&["capture-pane", "-p", "-t", &format!("w{width}")]);
        eprintln!("--- final screen at {width} columns ---\n{visible}");
    }
}
