//! The demo's terminal view: redrawn in place (ANSI) on a terminal, one line a second
//! otherwise, and the summary table at the end.

use std::io::{self, Write};
use std::time::Duration;

use super::{DemoOptions, DemoReport, Server, Trace};

/// Columns of the socket-count sparkline.
const SPARK_WIDTH: usize = 48;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

pub struct View<'a> {
    out: &'a mut dyn Write,
    live: bool,
    /// Lines of the last frame, to move back over when redrawing.
    drawn: usize,
    /// Line mode: the run being reported and when its next line is due.
    current: Option<&'static str>,
    next_line: Duration,
    /// Line mode: the time of the sample last printed.
    printed: Option<Duration>,
    /// Line mode: the diagnosis line is printed once.
    diagnosed: bool,
    /// Live: the terminal's width; every line of a frame is cut to fit, so that
    /// none wraps and the redraw moves back over exactly the lines it drew.
    width: usize,
}

impl<'a> View<'a> {
    pub fn new(out: &'a mut dyn Write, live: bool) -> View<'a> {
        View {
            out,
            live,
            drawn: 0,
            current: None,
            next_line: Duration::ZERO,
            printed: None,
            diagnosed: false,
            width: terminal_width().unwrap_or(80),
        }
    }

    pub fn note(&mut self, text: &str) -> io::Result<()> {
        writeln!(self.out, "{text}")
    }

    pub fn header(&mut self, o: &DemoOptions) -> io::Result<()> {
        writeln!(
            self.out,
            "tether demo: a leaky client (a new HTTP client per preheat, never closed) runs {} \
             preheats over {}, first straight at a fake registry and token server, then \
             through tether (cap {} per upstream, idle timeout {}, client idle timeout {}).",
            o.preheats,
            secs(o.duration),
            o.cap,
            secs(o.idle_timeout()),
            secs(o.client_idle_timeout()),
        )?;
        writeln!(
            self.out,
            "Socket counts are the servers' own (what `ss` shows); gauges are tether's /metrics.\n"
        )
    }

    /// Shows the runs so far; the last one is in progress.
    pub fn frame(&mut self, traces: &[&Trace]) -> io::Result<()> {
        if self.live {
            self.redraw(traces)
        } else {
            self.line(traces.last().expect("at least one run"))
        }
    }

    fn redraw(&mut self, traces: &[&Trace]) -> io::Result<()> {
        let scale = traces
            .iter()
            .flat_map(|t| &t.samples)
            .flat_map(|s| s.servers)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut lines = Vec::new();
        for t in traces {
            let last = t.last();
            lines.push(format!(
                "{:<16}{:>6.1}s   preheats {}/{} done, {} ok{}",
                t.label,
                last.at.as_secs_f64(),
                last.done,
                t.preheats,
                last.succeeded,
                if t.finished { "   (finished)" } else { "" },
            ));
            for server in Server::BOTH {
                let i = server as usize;
                let series: Vec<usize> = t.samples.iter().map(|s| s.servers[i]).collect();
                let gauge = last
                    .gauges
                    .map(|g| format!("   gauge {:>3}", g[i]))
                    .unwrap_or_default();
                lines.push(format!(
                    "  {:<9}{:>5}  {:<width$}{gauge}",
                    server.name(),
                    last.servers[i],
                    sparkline(&series, scale),
                    width = SPARK_WIDTH,
                ));
            }
            lines.push(format!(
                "  {:<9}{:>5}  client sockets still open{}",
                "client",
                last.client,
                if t.through_tether {
                    " (to tether, which closes idle ones)"
                } else {
                    " (nothing ever closes them)"
                },
            ));
            if let Some(d) = &t.diagnosis {
                // Wrapped, not cut: the point of the demo is this line.
                lines.extend(wrap(&format!("  diagnosis: {d}"), self.width, 13));
            }
            lines.push(String::new());
        }
        if self.drawn > 0 {
            // Back to the first line of the last frame, and clear below it.
            write!(self.out, "\x1b[{}F\x1b[J", self.drawn)?;
        }
        for line in &lines {
            writeln!(self.out, "{}", fit(line, self.width))?;
        }
        self.drawn = lines.len();
        self.out.flush()
    }

    fn line(&mut self, t: &Trace) -> io::Result<()> {
        if self.current != Some(t.label) {
            self.current = Some(t.label);
            self.next_line = Duration::ZERO;
            let how = if t.through_tether {
                "through tether's route listeners"
            } else {
                "straight at the fake registry and token server"
            };
            writeln!(self.out, "== {}: {} preheats {how}", t.label, t.preheats)?;
        }
        let last = t.last();
        // A line a second, and the run's last state once it is finished.
        let due = last.at >= self.next_line || (t.finished && self.printed != Some(last.at));
        if !due {
            return Ok(());
        }
        self.next_line += Duration::from_secs(1);
        self.printed = Some(last.at);
        let gauge = |i: usize| {
            last.gauges
                .map(|g| format!(" (gauge {})", g[i]))
                .unwrap_or_default()
        };
        writeln!(
            self.out,
            "{:<15} t={:>5.1}s  preheats {:>4}/{} ok {:>4}  registry {:>4}{}  auth {:>4}{}  client sockets {:>4}",
            t.label,
            last.at.as_secs_f64(),
            last.done,
            t.preheats,
            last.succeeded,
            last.servers[0],
            gauge(0),
            last.servers[1],
            gauge(1),
            last.client,
        )?;
        if let (Some(d), false) = (&t.diagnosis, self.diagnosed) {
            self.diagnosed = true;
            writeln!(self.out, "{:<15} diagnosis: {d}", t.label)?;
        }
        self.out.flush()
    }

    pub fn summary(&mut self, r: &DemoReport) -> io::Result<()> {
        let (d, t) = (&r.direct, &r.tethered);
        let (dl, tl) = (d.last(), t.last());
        let cap = r.options.cap;
        let out = &mut self.out;
        writeln!(
            out,
            "\nsummary                          without tether   with tether"
        )?;
        for server in Server::BOTH {
            let i = server as usize;
            let name = server.name();
            writeln!(
                out,
                "{:<33}{:>14}{:>14}   (cap {cap})",
                format!("{name} sockets, peak"),
                d.peak[i],
                t.peak[i],
            )?;
            writeln!(
                out,
                "{:<33}{:>14}{:>14}",
                format!("{name} sockets, at the end"),
                dl.servers[i],
                tl.servers[i],
            )?;
        }
        writeln!(
            out,
            "{:<33}{:>14}{:>14}",
            "client sockets, at the end", dl.client, tl.client
        )?;
        writeln!(
            out,
            "{:<33}{:>14}{:>14}",
            "requests that bypassed tether",
            d.unproxied.iter().sum::<usize>(),
            t.unproxied.iter().sum::<usize>(),
        )?;
        writeln!(
            out,
            "{:<33}{:>14}{:>14}",
            "preheats succeeded",
            format!("{}/{}", dl.succeeded, d.preheats),
            format!("{}/{}", tl.succeeded, t.preheats),
        )?;
        for trace in [d, t] {
            if let Some(e) = &trace.first_error {
                writeln!(out, "first failed preheat {}: {e}", trace.label)?;
            }
        }
        if let Some(diagnosis) = &t.diagnosis {
            writeln!(out, "\nleak diagnosis: {diagnosis}")?;
        }

        writeln!(
            out,
            "\nwith tether: /metrics tether_upstream_connections beside the servers' own counts"
        )?;
        writeln!(
            out,
            "upstream     gauge peak   server peak   gauge at end   server at end   ss at end"
        )?;
        let gauge_peak = t.peak_gauge.unwrap_or_default();
        let gauge_end = tl.gauges.unwrap_or_default();
        for server in Server::BOTH {
            let i = server as usize;
            writeln!(
                out,
                "{:<12}{:>11}{:>14}{:>15}{:>16}{:>12}",
                server.name(),
                gauge_peak[i],
                t.peak[i],
                gauge_end[i],
                tl.servers[i],
                t.final_ss.map_or("-".to_string(), |ss| ss[i].to_string()),
            )?;
        }

        let mut failures = Vec::new();
        if !r.within_cap() {
            failures.push(format!("went over the cap of {cap}"));
        }
        if !t.reaped() {
            failures.push(format!(
                "did not reap every socket to zero within {}",
                secs(r.options.duration)
            ));
        }
        if tl.succeeded != t.preheats {
            failures.push(format!(
                "{} of {} preheats failed",
                t.preheats - tl.succeeded,
                t.preheats
            ));
        }
        if failures.is_empty() {
            writeln!(
                out,
                "\nresult: PASS: through tether neither server saw more than {cap} sockets, \
                 and every socket was reaped to zero."
            )?;
        } else {
            writeln!(
                out,
                "\nresult: FAIL: with tether the run {}.",
                failures.join("; ")
            )?;
        }
        out.flush()
    }
}

/// `series` squeezed into at most [`SPARK_WIDTH`] columns (the maximum of each
/// bucket), each a block from ▁ to █ against `scale`; `·` is zero.
fn sparkline(series: &[usize], scale: usize) -> String {
    let per = series.len().div_ceil(SPARK_WIDTH).max(1);
    series
        .chunks(per)
        .map(|bucket| {
            let v = bucket.iter().copied().max().unwrap_or(0);
            if v == 0 {
                '·'
            } else {
                let level = (v * SPARKS.len()).div_ceil(scale).clamp(1, SPARKS.len());
                SPARKS[level - 1]
            }
        })
        .collect()
}

/// `line` cut to `width - 1` columns (every character of a frame is one column
/// wide), so that it never fills the last column and wraps.
fn fit(line: &str, width: usize) -> String {
    let max = width.saturating_sub(1).max(1);
    if line.chars().count() <= max {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// `text` word-wrapped to `width - 1` columns, continuation lines indented by
/// `indent`; each returned line fits (see [`fit`]).
fn wrap(text: &str, width: usize, indent: usize) -> Vec<String> {
    let max = width.saturating_sub(1).max(indent + 8);
    let lead = text.len() - text.trim_start().len();
    let mut lines = Vec::new();
    let mut current = " ".repeat(lead);
    for word in text.split_whitespace() {
        let len = current.chars().count();
        if current.trim().is_empty() {
            current.push_str(word);
        } else if len + 1 + word.chars().count() <= max {
            current.push(' ');
            current.push_str(word);
        } else {
            lines.push(std::mem::replace(&mut current, " ".repeat(indent) + word));
        }
    }
    lines.push(current);
    lines.into_iter().map(|l| fit(&l, width)).collect()
}

/// Columns of the terminal on stdout, if it is one.
fn terminal_width() -> Option<usize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (size.ws_col > 0).then_some(size.ws_col as usize)
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_to_the_width_so_none_wraps() {
        assert_eq!(fit("abcdef", 80), "abcdef");
        assert_eq!(fit("abcdef", 5), "abc…");
        assert_eq!(fit("▁▂▃▄▅▆", 4).chars().count(), 3);
    }

    #[test]
    fn the_diagnosis_wraps_under_its_label() {
        let text = "  diagnosis: tether names client 127.0.0.1: 80 connections";
        assert_eq!(wrap(text, 200, 13), [text]);
        let lines = wrap(text, 40, 13);
        assert!(lines.len() > 1, "{lines:?}");
        assert!(lines.iter().all(|l| l.chars().count() < 40), "{lines:?}");
        assert!(lines[1].starts_with(&" ".repeat(13)), "{lines:?}");
        assert_eq!(
            lines.join(" ").split_whitespace().collect::<Vec<_>>(),
            text.split_whitespace().collect::<Vec<_>>()
        );
    }

    #[test]
    fn sparkline_scales_and_squeezes() {
        assert_eq!(sparkline(&[0, 1, 4, 8], 8), "·▁▄█");
        let long: Vec<usize> = (0..SPARK_WIDTH * 3).collect();
        assert_eq!(sparkline(&long, long.len()).chars().count(), SPARK_WIDTH);
    }
}
