//! AUTH PLAIN and LOGIN (RFC 4954) on submission listeners.
//!
//! Refused before TLS where the listener requires it (`530 5.7.0`, credentials not looked
//! at), after a successful AUTH and inside a transaction (`503 5.5.1`), and while the client
//! or the user name is over its failure budget or no password check slot is free in time
//! (`454 4.7.0`, the password not checked). A
//! failure is `535 5.7.8`; after `auth.maxFailuresPerSession` failures the session ends with
//! `421 4.7.0`. Neither the payload, the password nor a user name that failed is ever logged,
//! and none counts as a protocol error.

use tokio::io::{AsyncRead, AsyncWrite};

use super::io::SaslLine;
use super::{End, Next, Session};
use crate::auth::{AuthOutcome, LimitedBy};
use crate::metrics::ResultLabels;
use crate::protocol::{
    EnhancedCode, Reply, SaslError, decode_login_step, decode_plain, login_challenge_password,
    login_challenge_username,
};

/// Credentials gathered from the exchange (never `Debug`, never logged).
struct Credentials {
    user: String,
    password: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn handle_auth(
        &mut self,
        mechanism: String,
        initial: Option<String>,
    ) -> Result<Next, End> {
        let listener = self.conn.listener.clone();
        if !listener.requires_auth() {
            self.error_reply(Reply::not_implemented("AUTH not available on this port"))?;
            return Ok(Next::Continue);
        }
        if !self.esmtp() {
            self.error_reply(Reply::bad_sequence("Send EHLO first"))?;
            return Ok(Next::Continue);
        }
        if listener.requires_tls() && self.tls.is_none() {
            self.error_reply(Reply::new(
                530,
                EnhancedCode(5, 7, 0),
                "Must issue a STARTTLS command first",
            ))?;
            return Ok(Next::Continue);
        }
        if self.user.is_some() {
            self.error_reply(Reply::bad_sequence("Already authenticated"))?;
            return Ok(Next::Continue);
        }
        if self.tx.is_some() {
            self.error_reply(Reply::bad_sequence(
                "AUTH not allowed during a mail transaction",
            ))?;
            return Ok(Next::Continue);
        }
        let credentials = match mechanism.as_str() {
            "PLAIN" => self.sasl_plain(initial).await?,
            "LOGIN" => self.sasl_login(initial).await?,
            _ => {
                self.error_reply(Reply::auth_mechanism_not_supported())?;
                return Ok(Next::Continue);
            }
        };
        let credentials = match credentials {
            Ok(c) => c,
            Err(reply) => {
                self.error_reply(reply)?;
                return Ok(Next::Continue);
            }
        };
        let ip = self.conn.remote.ip();
        let outcome = self
            .ctx
            .auth
            .authenticate(ip, &credentials.user, &credentials.password)
            .await;
        drop(credentials);
        let m = &self.ctx.metrics;
        match outcome {
            AuthOutcome::Success(user) => {
                m.auth
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                tracing::info!(user = %user.name, "authenticated");
                self.user = Some(user);
                self.reply(Reply::auth_succeeded());
                Ok(Next::Continue)
            }
            AuthOutcome::RateLimited(by) => {
                // The client-IP label keeps its old name; the per-user limit gets its own.
                let (result, scope) = match by {
                    LimitedBy::ClientIp => ("rate_limited", "client IP"),
                    LimitedBy::User => ("user_rate_limited", "user name"),
                };
                m.auth.get_or_create(&ResultLabels { result }).inc();
                tracing::warn!("authentication failure limit reached for this {scope}");
                self.reply(Reply::new(
                    454,
                    EnhancedCode(4, 7, 0),
                    "Temporary authentication failure, try again later",
                ));
                Ok(Next::Continue)
            }
            AuthOutcome::Busy => {
                m.auth.get_or_create(&ResultLabels { result: "busy" }).inc();
                tracing::warn!("no free password check slot; AUTH refused for now");
                self.reply(Reply::new(
                    454,
                    EnhancedCode(4, 7, 0),
                    "Temporary authentication failure, try again later",
                ));
                Ok(Next::Continue)
            }
            AuthOutcome::Failure => {
                m.auth
                    .get_or_create(&ResultLabels { result: "failure" })
                    .inc();
                self.auth_failures += 1;
                tracing::info!(failures = self.auth_failures, "authentication failed");
                self.reply(Reply::auth_failed());
                if self.auth_failures >= self.ctx.config.auth.max_failures_per_session {
                    self.reply(Reply::new(
                        421,
                        EnhancedCode(4, 7, 0),
                        "Too many authentication failures",
                    ));
                    return Err(End::Closed);
                }
                Ok(Next::Continue)
            }
        }
    }

    async fn sasl_plain(
        &mut self,
        initial: Option<String>,
    ) -> Result<Result<Credentials, Reply>, End> {
        let response = match initial {
            Some(r) => r,
            None => match self.challenge("").await? {
                Ok(r) => r,
                Err(reply) => return Ok(Err(reply)),
            },
        };
        Ok(match decode_plain(&response) {
            // An authorization identity other than the user itself would let one user act
            // as another; we do not support proxy authorization.
            Ok(c) if !c.authzid.is_empty() && c.authzid != c.authcid => Err(Reply::auth_failed()),
            Ok(c) => Ok(Credentials {
                user: c.authcid,
                password: c.password,
            }),
            Err(e) => Err(e.reply()),
        })
    }

    async fn sasl_login(
        &mut self,
        initial: Option<String>,
    ) -> Result<Result<Credentials, Reply>, End> {
        let user = match initial {
            Some(r) => r,
            None => match self.challenge(login_challenge_username()).await? {
                Ok(r) => r,
                Err(reply) => return Ok(Err(reply)),
            },
        };
        let user = match decode_login_step(&user) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e.reply())),
        };
        let password = match self.challenge(login_challenge_password()).await? {
            Ok(r) => r,
            Err(reply) => return Ok(Err(reply)),
        };
        Ok(match decode_login_step(&password) {
            Ok(password) => Ok(Credentials { user, password }),
            Err(e) => Err(e.reply()),
        })
    }

    /// Sends a `334` challenge and reads the client's response line.
    async fn challenge(&mut self, text: &str) -> Result<Result<String, Reply>, End> {
        self.reply(Reply::auth_challenge(text));
        Ok(match self.read_sasl_line().await? {
            SaslLine::Line(line) => match std::str::from_utf8(&line) {
                Ok("*") => Err(SaslError::Cancelled.reply()),
                Ok(s) => Ok(s.trim().to_owned()),
                Err(_) => Err(SaslError::BadBase64.reply()),
            },
            SaslLine::TooLong => Err(Reply::auth_line_too_long()),
            SaslLine::Bad => Err(SaslError::Malformed.reply()),
        })
    }
}
