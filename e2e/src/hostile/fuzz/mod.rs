//! Bounded fuzzing on stable Rust: the short runs `cargo test` does of every target in
//! [`targets`] (the long, coverage-guided runs are `make fuzz`, libFuzzer on the same target
//! functions, see `smtp-node/fuzz`).
//!
//! A run executes every seed of the target's corpus (`e2e/hostile/corpus/<target>/`, which
//! also holds minimised crash reproducers once found), then mutates seeds until its budget
//! of executions or time is spent. The mutations are libFuzzer's basic ones (bit flips, byte
//! inserts and erases, copies, splices, dictionary tokens from `e2e/hostile/dict/`) plus the
//! trick of mapping bytes onto an SMTP alphabet so that random input reaches
//! deep grammar. There is no coverage feedback: this is the regression and smoke half; the
//! search is libFuzzer's. The generator is seeded, so a failure reproduces with the same
//! seed, and the failing input is written to a file named in the panic message.

pub mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use targets::{TARGETS, Target};

/// Largest input the mutator makes (libFuzzer's `-max_len` in `make fuzz` is larger).
pub const MAX_INPUT: usize = 8 * 1024;

/// Where a run stops: whichever limit comes first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_executions: u64,
    pub max_time: Duration,
}

/// What one run did.
#[derive(Debug, Clone)]
pub struct RunStats {
    pub target: String,
    pub seeds: usize,
    pub executions: u64,
    pub elapsed: Duration,
}

/// The seed corpora and dictionaries (`e2e/hostile`).
pub fn hostile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile")
}

/// Every file of `e2e/hostile/corpus/<target>/`, sorted by name.
pub fn load_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = hostile_dir().join("corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_file())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    std::fs::read(e.path()).ok().map(|bytes| (name, bytes))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The tokens of `e2e/hostile/dict/<target>.dict` (libFuzzer dictionary syntax:
/// `name="value"` or `"value"` per line, `\xNN`, `\\` and `\"` escapes, `#` comments).
pub fn load_dictionary(target: &str) -> Vec<Vec<u8>> {
    let path = hostile_dir().join("dict").join(format!("{target}.dict"));
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let start = line.find('"')?;
            let end = line.rfind('"')?;
            (end > start).then(|| unescape(&line[start + 1..end]))
        })
        .collect()
}

fn unescape(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'x' if i + 3 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap_or("");
                    if let Ok(b) = u8::from_str_radix(hex, 16) {
                        out.push(b);
                        i += 4;
                        continue;
                    }
                    out.push(b'\\');
                    i += 1;
                }
                other => {
                    out.push(other);
                    i += 2;
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Runs `target` on its corpus, then on mutations, within `budget`. Panics with the target,
/// the input (escaped, shortened) and the path of a file holding it when a property fails.
pub fn run_target(name: &str, target: Target, budget: Budget, seed: u64) -> RunStats {
    let started = Instant::now();
    let corpus = load_corpus(name);
    let dictionary = load_dictionary(name);
    let mut executions = 0u64;
    for (file, input) in &corpus {
        execute(name, target, input, &format!("seed {file}"));
        executions += 1;
    }
    let mut pool: Vec<Vec<u8>> = corpus.iter().map(|(_, b)| b.clone()).collect();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut rng = Rng(seed | 1);
    while executions < budget.max_executions && started.elapsed() < budget.max_time {
        let base = pool[rng.below(pool.len())].clone();
        let input = mutate(&mut rng, base, &pool, &dictionary);
        execute(
            name,
            target,
            &input,
            &format!("mutation {executions} of seed {seed:#x}"),
        );
        executions += 1;
    }
    RunStats {
        target: name.to_owned(),
        seeds: corpus.len(),
        executions,
        elapsed: started.elapsed(),
    }
}

fn execute(name: &str, target: Target, input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_ok() {
        return;
    }
    let path = std::env::temp_dir().join(format!(
        "kubemail-fuzz-{name}-{:016x}",
        input
            .iter()
            .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b))
    ));
    let _ = std::fs::write(&path, input);
    panic!(
        "fuzz target `{name}` failed on {what}; input ({} bytes) saved to {} \
         (copy it to e2e/hostile/corpus/{name}/ as a regression seed): {}",
        input.len(),
        path.display(),
        escape(&input[..input.len().min(400)])
    );
}

/// `input` with non-printable bytes as `\xNN`.
pub fn escape(input: &[u8]) -> String {
    input
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// xorshift64*: small, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// The RFC 5321 alphabet, plus the bytes of the smuggling sequences.
const SMTP_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz:=-<>,;@.\"\\[] \r\n\0+";

/// Applies one to four random mutations.
fn mutate(rng: &mut Rng, mut input: Vec<u8>, pool: &[Vec<u8>], dictionary: &[Vec<u8>]) -> Vec<u8> {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let b = SMTP_ALPHABET[rng.below(SMTP_ALPHABET.len())];
                input.insert(i, b);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                // Copy a range to another place (repeats lines and sequences).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            5 | 6 if !dictionary.is_empty() => {
                let token = &dictionary[rng.below(dictionary.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, token.iter().copied());
            }
            7 => {
                // Splice: a prefix of this input and a suffix of another.
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            8 if len > 0 => {
                // Map a range onto the SMTP alphabet.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                for b in &mut input[i..i + n] {
                    *b = SMTP_ALPHABET[usize::from(*b) % SMTP_ALPHABET.len()];
                }
            }
            9 if len > 0 => input.truncate(rng.below(len)),
            _ => {
                let at = rng.below(len + 1);
                let b = rng.next() as u8;
                input.insert(at, b);
            }
        }
        input.truncate(MAX_INPUT);
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_escapes() {
        assert_eq!(unescape(r#"a\x0d\x0a.\"\\"#), b"a\r\n.\"\\".to_vec());
        assert_eq!(unescape(r"\xZZ"), b"\\xZZ".to_vec());
    }

    #[test]
    fn mutations_stay_bounded() {
        let mut rng = Rng(3);
        let pool = vec![vec![b'a'; MAX_INPUT]];
        for _ in 0..1000 {
            let out = mutate(&mut rng, pool[0].clone(), &pool, &[b"xyz".to_vec()]);
            assert!(out.len() <= MAX_INPUT);
        }
    }
}
