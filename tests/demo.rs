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
