//! How a hostile case reports: a header with the case ID and the expectation, the
//! dialogue lines of [`super::smtp`], notes of what was measured, and one verdict line.
//! `make hostile` runs the cases with `--nocapture`, so this is its output.

use std::time::Instant;

/// One running case; prints `FAIL` if dropped while panicking.
pub struct Case {
    id: String,
    started: Instant,
    done: bool,
}

impl Case {
    /// Prints the case header.
    pub fn begin(id: &str, title: &str, expect: &str) -> Self {
        println!("=== CASE {id}: {title}\n    expect: {expect}");
        Self {
            id: id.to_owned(),
            started: Instant::now(),
            done: false,
        }
    }

    /// Prints a measurement or a step.
    pub fn note(&self, text: impl AsRef<str>) {
        println!("  [{}] {}", self.id, text.as_ref());
    }

    /// Prints the verdict line.
    pub fn pass(mut self, summary: impl AsRef<str>) {
        self.done = true;
        println!(
            "=== PASS {} ({:.1}s): {}",
            self.id,
            self.started.elapsed().as_secs_f64(),
            summary.as_ref()
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if !self.done {
            println!(
                "=== FAIL {} ({:.1}s)",
                self.id,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
