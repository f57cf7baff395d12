//! The users file of a domain (`domains[].usersFile`): its submission users, one `user:hash`
//! per line. The operator renders it from the Secret a MailDomain names; the node reads it and
//! checks passwords against it. Both sides use this module, so they agree on the format.
//!
//! * `#` starts a comment line; blank lines are skipped; surrounding spaces are ignored.
//! * `user` is a local part (`alice`) or a full address in the file's domain
//!   (`alice@example.com`), compared case-insensitively.
//! * `hash` is an argon2 PHC string (`$argon2id$...`, what [`hash_password`] makes) or a bcrypt
//!   hash (`$2b$...`). Neither contains a `:`, so a line splits at its last one (a quoted local
//!   part may contain `:`).
//!
//! Errors name the line and the user, never the hash.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// The bcrypt version prefixes (`$2a$`, `$2b$`, `$2x$`, `$2y$`).
const BCRYPT_PREFIXES: [&str; 4] = ["$2a$", "$2b$", "$2x$", "$2y$"];
/// Length of a bcrypt hash in its modular crypt form.
const BCRYPT_LEN: usize = 60;

/// The hash schemes a users file may hold, told apart by their prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashScheme {
    /// An argon2 PHC string, `$argon2id$...` (also `$argon2i$`, `$argon2d$`).
    Argon2,
    /// A bcrypt hash, `$2b$...`.
    Bcrypt,
}

impl HashScheme {
    /// The scheme `hash` claims by its prefix (whether it is well formed is
    /// [`is_well_formed`]'s question).
    pub fn of(hash: &str) -> Option<Self> {
        if hash.starts_with("$argon2") {
            Some(Self::Argon2)
        } else if BCRYPT_PREFIXES.iter().any(|p| hash.starts_with(p)) {
            Some(Self::Bcrypt)
        } else {
            None
        }
    }
}

/// One `user:hash` line as written, before the user name is checked against a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// 1-based line number.
    pub line: usize,
    /// The user as written (trimmed): a local part or a full address.
    pub user: &'a str,
    /// The hash as written (trimmed).
    pub hash: &'a str,
}

/// A user of the file's domain, as the node looks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User<'a> {
    /// Full address, lower case (`alice@example.com`).
    pub name: String,
    /// A well-formed argon2 or bcrypt hash.
    pub hash: &'a str,
}

/// A line of a users file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    #[source]
    pub problem: LineProblem,
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("expected user:hash")]
    MissingColon,
    #[error("empty user name")]
    EmptyUser,
    #[error("user {user:?} is not in domain {domain:?}")]
    OtherDomain { user: String, domain: String },
    #[error("the hash of {user:?} is neither an argon2 PHC string nor a bcrypt hash")]
    UnknownHash { user: String },
}

/// Hashes a password as an argon2id PHC string with a random salt (argon2's default cost).
/// Slow on purpose: call it on a blocking thread.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Whether `password` matches `hash` (argon2 or bcrypt; anything else never matches). Slow on
/// purpose: call it on a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match HashScheme::of(hash) {
        Some(HashScheme::Argon2) => PasswordHash::new(hash).is_ok_and(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        }),
        Some(HashScheme::Bcrypt) => bcrypt::verify(password, hash).unwrap_or(false),
        None => false,
    }
}

/// Whether `hash` is a hash the node can check: a parseable argon2 PHC string or a bcrypt hash
/// of the right length.
pub fn is_well_formed(hash: &str) -> bool {
    match HashScheme::of(hash) {
        Some(HashScheme::Argon2) => PasswordHash::new(hash).is_ok(),
        Some(HashScheme::Bcrypt) => hash.len() == BCRYPT_LEN,
        None => false,
    }
}

/// One line of the file.
pub fn format_line(user: &str, hash: &str) -> String {
    format!("{user}:{hash}\n")
}

/// The `user:hash` lines of `text` in order, skipping comments and blank lines; a line
/// without `:` is an error. Neither the user nor the hash is checked here.
pub fn entries(text: &str) -> impl Iterator<Item = Result<Entry<'_>, LineError>> {
    text.lines().enumerate().filter_map(|(i, raw)| {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return None;
        }
        Some(match trimmed.rsplit_once(':') {
            Some((user, hash)) => Ok(Entry {
                line,
                user: user.trim(),
                hash: hash.trim(),
            }),
            None => Err(LineError {
                line,
                problem: LineProblem::MissingColon,
            }),
        })
    })
}

/// Parses the users file of `domain` as the node does: every line must be a user of that
/// domain with a well-formed hash. A bare user name is taken to be in `domain`.
pub fn parse<'a>(text: &'a str, domain: &str) -> Result<Vec<User<'a>>, LineError> {
    entries(text)
        .map(|entry| {
            let entry = entry?;
            let fail = |problem| LineError {
                line: entry.line,
                problem,
            };
            let user = entry.user.to_ascii_lowercase();
            let name = match user.rsplit_once('@') {
                Some((local, d)) if d.eq_ignore_ascii_case(domain) && !local.is_empty() => {
                    user.clone()
                }
                Some(_) => {
                    return Err(fail(LineProblem::OtherDomain {
                        user,
                        domain: domain.to_owned(),
                    }));
                }
                None if !user.is_empty() => format!("{user}@{domain}"),
                None => return Err(fail(LineProblem::EmptyUser)),
            };
            if !is_well_formed(entry.hash) {
                return Err(fail(LineProblem::UnknownHash { user: name }));
            }
            Ok(User {
                name,
                hash: entry.hash,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_operator_writes_the_node_reads_and_verifies() {
        let hash = hash_password("wonderland").unwrap();
        assert_eq!(HashScheme::of(&hash), Some(HashScheme::Argon2));
        let text = format!(
            "# rendered\n\n{}{}",
            format_line("alice@example.test", &hash),
            format_line("Bob", &bcrypt::hash("looking-glass", 4).unwrap())
        );
        let users = parse(&text, "example.test").unwrap();
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["alice@example.test", "bob@example.test"]);
        assert!(verify_password("wonderland", users[0].hash));
        assert!(!verify_password("wonderlant", users[0].hash));
        assert!(verify_password("looking-glass", users[1].hash));
        assert!(
            !verify_password("wonderland", "wonderland"),
            "plain text never matches"
        );
    }

    #[test]
    fn bad_lines_name_the_line_and_the_user_but_not_the_hash() {
        let err = parse("# c\nalice:plaintext-password\n", "example.test").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(!err.to_string().contains("plaintext-password"), "{err}");
        assert!(err.to_string().contains("alice@example.test"), "{err}");
        let err = parse("bob@other.test:$2b$04$x\n", "example.test").unwrap_err();
        assert!(
            matches!(err.problem, LineProblem::OtherDomain { .. }),
            "{err}"
        );
        let err = parse("no-colon\n", "example.test").unwrap_err();
        assert_eq!(err.problem, LineProblem::MissingColon);
        let err = parse(":$2b$04$x\n", "example.test").unwrap_err();
        assert_eq!(err.problem, LineProblem::EmptyUser);
    }

    #[test]
    fn entries_split_at_the_last_colon_and_skip_comments() {
        let got: Vec<Entry<'_>> = entries("  # x\n\"a:b\"@example.test : $2b$h \n")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            [Entry {
                line: 2,
                user: "\"a:b\"@example.test",
                hash: "$2b$h"
            }]
        );
    }
}
