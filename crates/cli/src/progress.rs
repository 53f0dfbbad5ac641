//! Progress while waiting: a spinner on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Shows what a wait is doing.
pub struct Progress {
    bar: Option<ProgressBar>,
    last: String,
    started: Instant,
    quiet: bool,
}

impl Progress {
    /// A progress display; `quiet` prints nothing (for `-o json`).
    pub fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Self {
            bar,
            last: String::new(),
            started: Instant::now(),
            quiet,
        }
    }

    /// Shows `msg` if it changed.
    pub fn set(&mut self, msg: &str) {
        if msg == self.last {
            return;
        }
        self.last = msg.to_string();
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None if !self.quiet => {
                eprintln!("[{:>5.1}s] {msg}", self.started.elapsed().as_secs_f64())
            }
            None => {}
        }
    }

    /// Time since the wait began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the display.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
