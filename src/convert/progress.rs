//! Per-layer progress on stderr: shown only to a person watching a terminal, never mixed into
//! output that scripts read.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress of one layer's conversion.
#[derive(Debug)]
pub struct LayerProgress {
    enabled: bool,
    prefix: String,
    start: Instant,
    last: Instant,
}

impl LayerProgress {
    /// `index` counts from 1.
    pub fn new(index: usize, total: usize, label: &str) -> Self {
        let now = Instant::now();
        Self {
            enabled: std::io::stderr().is_terminal(),
            prefix: format!("[{index}/{total}] {label}"),
            start: now,
            last: now,
        }
    }

    /// Called with the uncompressed bytes consumed so far; redraws at most five times a second.
    pub fn update(&mut self, bytes: u64) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let line = self.line(bytes, "converting");
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }

    /// Ends the layer's line.
    pub fn finish(&self, bytes: u64, what: &str) {
        if self.enabled {
            eprintln!("\r\x1b[2K{}", self.line(bytes, what));
        }
    }

    fn line(&self, bytes: u64, what: &str) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{} {what} {} {}/s",
            self.prefix,
            human(bytes),
            human((bytes as f64 / secs) as u64)
        )
    }
}

/// `1234567` → `1.2 MB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
