//! Showing progress: indicatif bars (bytes, rate, ETA per file, and an overall bar for several
//! files) when stdout is a terminal; otherwise one summary line per file; with `-q` nothing but
//! errors. Errors are always one line on stderr: `netcp: OP PATH: reason`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::human_bytes;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// indicatif bars on stdout (a terminal).
    Bars,
    /// One summary line per file on stdout.
    Lines,
    /// Nothing but errors.
    Quiet,
}

impl Output {
    /// Bars when stdout is a terminal, lines otherwise; `quiet` wins.
    pub fn detect(quiet: bool) -> Output {
        if quiet {
            Output::Quiet
        } else if std::io::stdout().is_terminal() {
            Output::Bars
        } else {
            Output::Lines
        }
    }
}

/// What one finished transfer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The file's size.
    pub bytes: u64,
    /// Where it continued a partial copy, if it did.
    pub resumed_at: Option<u64>,
    /// File bytes that crossed the wire in this run.
    pub sent: u64,
    pub elapsed: Duration,
}

impl Outcome {
    /// The summary line (without a newline): path, bytes, time, rate, resume point, "verified".
    pub fn summary(&self, label: &str) -> String {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { (self.sent as f64 / secs) as u64 } else { self.sent };
        let mut line = format!("{label}: {} bytes in {secs:.2} s ({}/s)", self.bytes, human_bytes(rate));
        if let Some(at) = self.resumed_at {
            line.push_str(&format!(", resumed at {at}, {} bytes sent", self.sent));
        }
        line.push_str(", verified");
        line
    }
}

/// The progress display of one netcp run, shared by all its transfers.
#[derive(Clone)]
pub struct Progress {
    output: Output,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
}

const FILE_TEMPLATE: &str =
    "{wide_msg} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta:>4} [{bar:25}]";
const OVERALL_TEMPLATE: &str = "total {pos}/{len} files {wide_msg}";

impl Progress {
    /// A display in the given mode, with no overall bar yet.
    pub fn new(output: Output) -> Progress {
        let multi = (output == Output::Bars).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Progress { output, multi, overall: None }
    }

    /// The mode.
    pub fn output(&self) -> Output {
        self.output
    }

    /// Adds the overall bar (for several files or a tree): counts files, shows total bytes.
    pub fn set_total(&mut self, files: u64, bytes: u64) {
        if let Some(multi) = &self.multi {
            let style = ProgressStyle::with_template(OVERALL_TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar = multi.add(ProgressBar::new(files).with_style(style));
            bar.set_message(format!("({})", human_bytes(bytes)));
            self.overall = Some(bar);
        }
    }

    /// Starts the display of one file of `size` bytes.
    pub fn start(&self, label: &str, size: u64) -> FileProgress {
        let bar = self.multi.as_ref().map(|multi| {
            let style = ProgressStyle::with_template(FILE_TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            let bar = match &self.overall {
                Some(overall) => multi.insert_before(overall, ProgressBar::new(size)),
                None => multi.add(ProgressBar::new(size)),
            };
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        });
        FileProgress {
            label: label.to_string(),
            output: self.output,
            bar,
            overall: self.overall.clone(),
            multi: self.multi.clone(),
            done: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    /// Prints one error line on stderr, out of the bars' way.
    pub fn error(&self, line: &str) {
        let print = || {
            let _ = writeln!(std::io::stderr(), "netcp: {line}");
        };
        match &self.multi {
            Some(multi) => multi.suspend(print),
            None => print(),
        }
    }

    /// Prints one informational line on stdout (not with `-q`).
    pub fn info(&self, line: &str) {
        match (&self.multi, self.output) {
            (_, Output::Quiet) => {}
            (Some(multi), _) => {
                let _ = multi.println(line);
            }
            (None, _) => print_line(line),
        }
    }

    /// Ends the overall bar.
    pub fn finish(&self) {
        if let Some(overall) = &self.overall {
            overall.finish();
        }
    }
}

/// Prints one line on stdout; a closed stdout (`netcp ... | head`) is not an error of the copy.
fn print_line(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// The display of one file.
pub struct FileProgress {
    label: String,
    output: Output,
    bar: Option<ProgressBar>,
    overall: Option<ProgressBar>,
    multi: Option<MultiProgress>,
    /// Bytes shown as done, so a restart from zero can take them back.
    done: Arc<AtomicU64>,
    started: Instant,
}

impl FileProgress {
    /// Sets the bytes done so far (a resume point, or zero after a restart).
    pub fn set_position(&self, pos: u64) {
        self.done.store(pos, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.reset_eta();
        }
    }

    /// Adds `n` bytes done.
    pub fn inc(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// When this file started (for the summary's time).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The file verified: finish its bar, or print its summary line.
    pub fn finish(&self, outcome: &Outcome) {
        match (&self.bar, self.output) {
            (Some(bar), _) => {
                // The finished bar becomes the summary line, whole (the running bar's message is cut
                // to the terminal's width).
                bar.set_style(ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
                bar.finish_with_message(outcome.summary(&self.label));
            }
            (None, Output::Lines) => print_line(&outcome.summary(&self.label)),
            _ => {}
        }
        if let Some(overall) = &self.overall {
            overall.inc(1);
        }
    }

    /// The file failed: leave its bar marked as failed.
    pub fn fail(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon_with_message(format!("{} FAILED", self.label));
            if let Some(multi) = &self.multi {
                multi.remove(bar);
            }
        }
        if let Some(overall) = &self.overall {
            overall.inc(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let o = Outcome { bytes: 10, resumed_at: None, sent: 10, elapsed: Duration::from_secs(1) };
        assert_eq!(o.summary("f"), "f: 10 bytes in 1.00 s (10 B/s), verified");
        let o = Outcome { resumed_at: Some(4), sent: 6, ..o };
        assert_eq!(o.summary("f"), "f: 10 bytes in 1.00 s (6 B/s), resumed at 4, 6 bytes sent, verified");
    }
}
