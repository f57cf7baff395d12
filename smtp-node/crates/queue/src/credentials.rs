//! The NATS credentials file (`.creds`) the operator writes and the node reads: a user JWT and
//! the user's NKey seed, each between marker lines, in the layout `nsc` writes.

/// Why a credentials file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("the credentials file has no user JWT")]
    MissingJwt,
    #[error("the credentials file has no user NKey seed")]
    MissingSeed,
}

const JWT_BEGIN: &str = "-----BEGIN NATS USER JWT-----";
const JWT_END: &str = "------END NATS USER JWT------";
const SEED_BEGIN: &str = "-----BEGIN USER NKEY SEED-----";
const SEED_END: &str = "------END USER NKEY SEED------";

/// The credentials file of a user: `jwt` and its NKey `seed` (`SU...`).
pub fn render(jwt: &str, seed: &str) -> String {
    format!(
        "{JWT_BEGIN}\n{jwt}\n{JWT_END}\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         {SEED_BEGIN}\n{seed}\n{SEED_END}\n\n\
         *************************************************************\n"
    )
}

/// The user JWT and the seed of a credentials file.
pub fn parse(text: &str) -> Result<(String, String), CredentialsError> {
    let jwt = between(text, "NATS USER JWT").ok_or(CredentialsError::MissingJwt)?;
    let seed = between(text, "USER NKEY SEED").ok_or(CredentialsError::MissingSeed)?;
    Ok((jwt, seed))
}

/// The first non-empty line after the line `---BEGIN <what>---`.
fn between(text: &str, what: &str) -> Option<String> {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| l.starts_with("---") && l.contains(&format!("BEGIN {what}")))?;
    lines
        .find(|l| !l.is_empty())
        .filter(|l| !l.starts_with("---"))
        .map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_parts() {
        let text = render("eyJhbGciOi.x.y", "SUAXYZ");
        assert_eq!(
            parse(&text).unwrap(),
            ("eyJhbGciOi.x.y".to_owned(), "SUAXYZ".to_owned())
        );
        assert_eq!(
            parse("-----BEGIN NATS USER JWT-----\nabc\n"),
            Err(CredentialsError::MissingSeed)
        );
        assert_eq!(parse(""), Err(CredentialsError::MissingJwt));
        // Windows line endings, as a hand-edited file may have.
        assert!(parse(&text.replace('\n', "\r\n")).is_ok());
    }
}
