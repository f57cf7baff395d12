//! Encoding of the commands a client sends: EHLO/HELO (RFC 5321 §4.1.1.1), LHLO (RFC 2033
//! §4.1), MAIL and RCPT with their ESMTP parameters, DATA, BDAT (RFC 3030), RSET, NOOP, QUIT,
//! STARTTLS (RFC 3207) and AUTH PLAIN / LOGIN (RFC 4954, RFC 4616). It is the inverse of the
//! server's parser in [`crate::command`], and uses its parameter types: whatever this module
//! writes, that parser reads back to the same command (tested).
//!
//! Arguments come from the queue and the configuration, so they are checked before anything is
//! written: a CR or LF in a host name or a path would end the command line early and make the
//! rest of it a command of its own, a `>` would end a path early and turn the rest of it into
//! parameters, and a space in a parameter value would add a parameter. Paths must therefore
//! parse with our own path parser (which admits no control characters), and parameter values
//! must be what the server side accepts; anything else is an [`EncodeError`] and nothing is
//! written. Credentials go out base64-encoded, so nothing in them can break the line, and
//! [`ClientCommand`]'s `Debug` never shows them.

use std::fmt;

use base64::Engine as _;

use crate::address::{AddressError, parse_forward_path, parse_reverse_path};
use crate::command::{
    BodyType, MAX_AUTH_PARAM, MAX_ENVID, MAX_ORCPT, MailParams, RcptParams, is_valid_notify,
    is_valid_orcpt, is_xtext,
};

/// A command as a client sends it. Paths are written without their angle brackets; an empty
/// MAIL path is the null reverse-path `<>`.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientCommand<'a> {
    /// `EHLO <name>`.
    Ehlo(&'a str),
    /// `LHLO <name>` (LMTP).
    Lhlo(&'a str),
    /// `HELO <name>`, for servers that refuse EHLO.
    Helo(&'a str),
    /// `MAIL FROM:<path> [params]`.
    Mail {
        from: &'a str,
        params: &'a MailParams,
    },
    /// `RCPT TO:<path> [params]`.
    Rcpt { to: &'a str, params: &'a RcptParams },
    /// `DATA`.
    Data,
    /// `BDAT <size> [LAST]`; the chunk's `size` octets follow the command line.
    Bdat { size: u64, last: bool },
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `STARTTLS`.
    StartTls,
    /// `AUTH PLAIN <initial response>` with an empty authorization identity (RFC 4616 §2:
    /// the server derives it from the authentication identity).
    AuthPlain {
        username: &'a str,
        password: &'a str,
    },
    /// `AUTH LOGIN`, answered by `334` challenges for the username and then the password.
    AuthLogin,
    /// One answer to a `334` challenge of the LOGIN exchange, base64-encoded on the wire.
    AuthLoginResponse(&'a str),
}

/// Why a command cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the {verb} host name is empty or contains spaces or control characters")]
    InvalidHelloName { verb: &'static str },
    #[error("the {verb} path cannot be written as a command: {source}")]
    InvalidPath {
        verb: &'static str,
        #[source]
        source: AddressError,
    },
    #[error("invalid value for the {keyword} parameter")]
    InvalidParameter { keyword: &'static str },
    #[error("AUTH PLAIN credentials contain a NUL character")]
    NulInCredentials,
}

impl ClientCommand<'_> {
    /// Appends the command line, CRLF included, to `out`; on error nothing is appended.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.write(out);
        match result {
            Ok(()) => out.extend_from_slice(b"\r\n"),
            Err(_) => out.truncate(start),
        }
        result
    }

    /// The command line, CRLF included.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// The verb, for logs and spans (never the arguments, which may carry credentials).
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Ehlo(_) => "EHLO",
            Self::Lhlo(_) => "LHLO",
            Self::Helo(_) => "HELO",
            Self::Mail { .. } => "MAIL",
            Self::Rcpt { .. } => "RCPT",
            Self::Data => "DATA",
            Self::Bdat { .. } => "BDAT",
            Self::Rset => "RSET",
            Self::Noop => "NOOP",
            Self::Quit => "QUIT",
            Self::StartTls => "STARTTLS",
            Self::AuthPlain { .. } | Self::AuthLogin | Self::AuthLoginResponse(_) => "AUTH",
        }
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        match self {
            Self::Ehlo(name) | Self::Lhlo(name) | Self::Helo(name) => {
                let verb = self.verb();
                if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(EncodeError::InvalidHelloName { verb });
                }
                push(out, &[verb, " ", name]);
            }
            Self::Mail { from, params } => {
                if !from.is_empty() {
                    // SMTPUTF8 is the caller's decision (it knows the server's extensions);
                    // here only the syntax counts, so UTF-8 is allowed.
                    parse_reverse_path(from, true).map_err(|source| EncodeError::InvalidPath {
                        verb: "MAIL",
                        source,
                    })?;
                }
                push(out, &["MAIL FROM:<", from, ">"]);
                write_mail_params(out, params)?;
            }
            Self::Rcpt { to, params } => {
                parse_forward_path(to, true).map_err(|source| EncodeError::InvalidPath {
                    verb: "RCPT",
                    source,
                })?;
                push(out, &["RCPT TO:<", to, ">"]);
                write_rcpt_params(out, params)?;
            }
            Self::Data => push(out, &["DATA"]),
            Self::Bdat { size, last } => {
                push(out, &["BDAT ", &size.to_string()]);
                if *last {
                    push(out, &[" LAST"]);
                }
            }
            Self::Rset => push(out, &["RSET"]),
            Self::Noop => push(out, &["NOOP"]),
            Self::Quit => push(out, &["QUIT"]),
            Self::StartTls => push(out, &["STARTTLS"]),
            Self::AuthPlain { username, password } => {
                // RFC 4616 §2: NUL separates the fields, so it cannot be inside one.
                if username.contains('\0') || password.contains('\0') {
                    return Err(EncodeError::NulInCredentials);
                }
                let token = b64.encode(format!("\0{username}\0{password}"));
                push(out, &["AUTH PLAIN ", &token]);
            }
            Self::AuthLogin => push(out, &["AUTH LOGIN"]),
            Self::AuthLoginResponse(text) => push(out, &[&b64.encode(text)]),
        }
        Ok(())
    }
}

impl fmt::Debug for ClientCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ehlo(n) | Self::Lhlo(n) | Self::Helo(n) => {
                f.debug_tuple(self.verb()).field(n).finish()
            }
            Self::Mail { from, params } => f
                .debug_struct("Mail")
                .field("from", from)
                .field("params", params)
                .finish(),
            Self::Rcpt { to, params } => f
                .debug_struct("Rcpt")
                .field("to", to)
                .field("params", params)
                .finish(),
            Self::Bdat { size, last } => f
                .debug_struct("Bdat")
                .field("size", size)
                .field("last", last)
                .finish(),
            Self::AuthPlain { username, .. } => f
                .debug_struct("AuthPlain")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            // The LOGIN answers are the username and the password; neither is shown.
            Self::AuthLoginResponse(_) => f.write_str("AuthLoginResponse(<redacted>)"),
            Self::Data => f.write_str("Data"),
            Self::Rset => f.write_str("Rset"),
            Self::Noop => f.write_str("Noop"),
            Self::Quit => f.write_str("Quit"),
            Self::StartTls => f.write_str("StartTls"),
            Self::AuthLogin => f.write_str("AuthLogin"),
        }
    }
}

fn push(out: &mut Vec<u8>, parts: &[&str]) {
    for part in parts {
        out.extend_from_slice(part.as_bytes());
    }
}

/// MAIL parameters in a fixed order: SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH.
fn write_mail_params(out: &mut Vec<u8>, params: &MailParams) -> Result<(), EncodeError> {
    if let Some(size) = params.size {
        push(out, &[" SIZE=", &size.to_string()]);
    }
    if let Some(body) = params.body {
        let body = match body {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        };
        push(out, &[" BODY=", body]);
    }
    if params.smtputf8 {
        push(out, &[" SMTPUTF8"]);
    }
    if params.requiretls {
        push(out, &[" REQUIRETLS"]);
    }
    if let Some(ret) = &params.ret {
        let ret = ret.to_ascii_uppercase();
        if ret != "FULL" && ret != "HDRS" {
            return Err(EncodeError::InvalidParameter { keyword: "RET" });
        }
        push(out, &[" RET=", &ret]);
    }
    if let Some(envid) = &params.envid {
        if envid.len() > MAX_ENVID || !is_xtext(envid) {
            return Err(EncodeError::InvalidParameter { keyword: "ENVID" });
        }
        push(out, &[" ENVID=", envid]);
    }
    if let Some(auth) = &params.auth {
        if auth != "<>" && (auth.len() > MAX_AUTH_PARAM || !is_xtext(auth)) {
            return Err(EncodeError::InvalidParameter { keyword: "AUTH" });
        }
        push(out, &[" AUTH=", auth]);
    }
    Ok(())
}

/// RCPT parameters in a fixed order: NOTIFY, ORCPT.
fn write_rcpt_params(out: &mut Vec<u8>, params: &RcptParams) -> Result<(), EncodeError> {
    if let Some(notify) = &params.notify {
        let notify = notify.to_ascii_uppercase();
        if !is_valid_notify(&notify) {
            return Err(EncodeError::InvalidParameter { keyword: "NOTIFY" });
        }
        push(out, &[" NOTIFY=", &notify]);
    }
    if let Some(orcpt) = &params.orcpt {
        if orcpt.len() > MAX_ORCPT || !is_valid_orcpt(orcpt) {
            return Err(EncodeError::InvalidParameter { keyword: "ORCPT" });
        }
        push(out, &[" ORCPT=", orcpt]);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::{Command, parse_command};

    fn line(cmd: &ClientCommand<'_>) -> String {
        String::from_utf8(cmd.to_bytes().unwrap()).unwrap()
    }

    #[test]
    fn vectors() {
        let none = MailParams::default();
        let sized = MailParams {
            size: Some(20),
            body: Some(BodyType::EightBitMime),
            smtputf8: true,
            ..MailParams::default()
        };
        let dsn = MailParams {
            ret: Some("hdrs".into()),
            envid: Some("QQ+2B1".into()),
            auth: Some("<>".into()),
            ..MailParams::default()
        };
        let no_rcpt_params = RcptParams::default();
        let notify = RcptParams {
            notify: Some("success,failure".into()),
            orcpt: Some("rfc822;bob@example.test".into()),
        };
        let cases: Vec<(ClientCommand<'_>, &str)> = vec![
            (
                ClientCommand::Ehlo("mx.example.test"),
                "EHLO mx.example.test\r\n",
            ),
            (
                ClientCommand::Lhlo("mx.example.test"),
                "LHLO mx.example.test\r\n",
            ),
            (ClientCommand::Helo("[192.0.2.1]"), "HELO [192.0.2.1]\r\n"),
            (
                ClientCommand::Mail {
                    from: "alice@example.test",
                    params: &none,
                },
                "MAIL FROM:<alice@example.test>\r\n",
            ),
            (
                ClientCommand::Mail {
                    from: "",
                    params: &none,
                },
                "MAIL FROM:<>\r\n",
            ),
            (
                ClientCommand::Mail {
                    from: "j\u{f6}rg@example.test",
                    params: &sized,
                },
                "MAIL FROM:<j\u{f6}rg@example.test> SIZE=20 BODY=8BITMIME SMTPUTF8\r\n",
            ),
            (
                ClientCommand::Mail {
                    from: "alice@example.test",
                    params: &dsn,
                },
                "MAIL FROM:<alice@example.test> RET=HDRS ENVID=QQ+2B1 AUTH=<>\r\n",
            ),
            (
                ClientCommand::Rcpt {
                    to: "bob@example.test",
                    params: &no_rcpt_params,
                },
                "RCPT TO:<bob@example.test>\r\n",
            ),
            (
                ClientCommand::Rcpt {
                    to: "\"a b\"@example.test",
                    params: &notify,
                },
                "RCPT TO:<\"a b\"@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.test\r\n",
            ),
            (
                ClientCommand::Rcpt {
                    to: "Postmaster",
                    params: &no_rcpt_params,
                },
                "RCPT TO:<Postmaster>\r\n",
            ),
            (ClientCommand::Data, "DATA\r\n"),
            (
                ClientCommand::Bdat {
                    size: 1024,
                    last: false,
                },
                "BDAT 1024\r\n",
            ),
            (
                ClientCommand::Bdat {
                    size: 0,
                    last: true,
                },
                "BDAT 0 LAST\r\n",
            ),
            (ClientCommand::Rset, "RSET\r\n"),
            (ClientCommand::Noop, "NOOP\r\n"),
            (ClientCommand::Quit, "QUIT\r\n"),
            (ClientCommand::StartTls, "STARTTLS\r\n"),
            (
                ClientCommand::AuthPlain {
                    username: "user",
                    password: "pass",
                },
                "AUTH PLAIN AHVzZXIAcGFzcw==\r\n",
            ),
            (ClientCommand::AuthLogin, "AUTH LOGIN\r\n"),
            (ClientCommand::AuthLoginResponse("user"), "dXNlcg==\r\n"),
            (ClientCommand::AuthLoginResponse(""), "\r\n"),
        ];
        for (cmd, want) in cases {
            assert_eq!(line(&cmd), want, "{cmd:?}");
        }
    }

    /// The error's variant and verb, for comparing without the path parser's detail.
    fn kind(e: &EncodeError) -> String {
        match e {
            EncodeError::InvalidHelloName { verb } => format!("hello name {verb}"),
            EncodeError::InvalidPath { verb, .. } => format!("path {verb}"),
            EncodeError::InvalidParameter { keyword } => format!("parameter {keyword}"),
            EncodeError::NulInCredentials => "NUL".to_owned(),
        }
    }

    #[test]
    fn refuses_what_would_inject_commands_or_parameters() {
        let none = MailParams::default();
        let no_rcpt_params = RcptParams::default();
        let cases: Vec<(ClientCommand<'_>, &str)> = vec![
            (
                ClientCommand::Ehlo("mx.test\r\nMAIL FROM:<x@y>"),
                "hello name EHLO",
            ),
            (ClientCommand::Lhlo("two words"), "hello name LHLO"),
            (ClientCommand::Helo(""), "hello name HELO"),
            (
                ClientCommand::Mail {
                    from: "a@b.test>\r\nRCPT TO:<victim@c.test",
                    params: &none,
                },
                "path MAIL",
            ),
            (
                ClientCommand::Mail {
                    from: "a@b.test> BODY=BINARYMIME",
                    params: &none,
                },
                "path MAIL",
            ),
            (
                ClientCommand::Rcpt {
                    to: "bob@example.test\n",
                    params: &no_rcpt_params,
                },
                "path RCPT",
            ),
            (
                ClientCommand::Rcpt {
                    to: "",
                    params: &no_rcpt_params,
                },
                "path RCPT",
            ),
            (
                ClientCommand::Rcpt {
                    to: "bob\0@example.test",
                    params: &no_rcpt_params,
                },
                "path RCPT",
            ),
            (
                ClientCommand::AuthPlain {
                    username: "admin\0root",
                    password: "x",
                },
                "NUL",
            ),
        ];
        for (cmd, want) in cases {
            let mut out = b"kept".to_vec();
            let err = cmd.encode(&mut out).unwrap_err();
            assert_eq!(kind(&err), want, "{cmd:?}: {err}");
            assert_eq!(out, b"kept", "nothing written for {cmd:?}");
        }
    }

    #[test]
    fn refuses_parameter_values_the_server_side_would_refuse() {
        let mail = |params: MailParams| {
            ClientCommand::Mail {
                from: "a@b.test",
                params: &params,
            }
            .to_bytes()
            .unwrap_err()
        };
        let rcpt = |params: RcptParams| {
            ClientCommand::Rcpt {
                to: "a@b.test",
                params: &params,
            }
            .to_bytes()
            .unwrap_err()
        };
        let invalid = |keyword| EncodeError::InvalidParameter { keyword };
        let envid = |v: &str| MailParams {
            envid: Some(v.into()),
            ..MailParams::default()
        };
        assert_eq!(mail(envid("two words")), invalid("ENVID"));
        assert_eq!(mail(envid("a=b")), invalid("ENVID"));
        assert_eq!(mail(envid(&"x".repeat(101))), invalid("ENVID"));
        assert_eq!(
            mail(MailParams {
                ret: Some("FULL SMTPUTF8".into()),
                ..MailParams::default()
            }),
            invalid("RET")
        );
        assert_eq!(
            mail(MailParams {
                auth: Some("a@b\r\nQUIT".into()),
                ..MailParams::default()
            }),
            invalid("AUTH")
        );
        assert_eq!(
            rcpt(RcptParams {
                notify: Some("NEVER,SUCCESS".into()),
                orcpt: None,
            }),
            invalid("NOTIFY")
        );
        assert_eq!(
            rcpt(RcptParams {
                notify: None,
                orcpt: Some("rfc822;a b@c".into()),
            }),
            invalid("ORCPT")
        );
    }

    #[test]
    fn the_server_side_parser_reads_back_what_we_write() {
        let mail_params = [
            MailParams::default(),
            MailParams {
                size: Some(12345),
                body: Some(BodyType::BinaryMime),
                smtputf8: true,
                auth: Some("alice+40example.test".into()),
                envid: Some("id+2B1".into()),
                ret: Some("FULL".into()),
                requiretls: true,
            },
            MailParams {
                body: Some(BodyType::SevenBit),
                ..MailParams::default()
            },
        ];
        for params in mail_params {
            let wire = line(&ClientCommand::Mail {
                from: "alice@example.test",
                params: &params,
            });
            match parse_command(wire.trim_end().as_bytes()) {
                Ok(Command::Mail { from, params: got }) => {
                    assert_eq!(from.to_string(), "alice@example.test");
                    assert_eq!(got, params, "{wire}");
                }
                other => panic!("{wire}: {other:?}"),
            }
        }
        let rcpt_params = [
            RcptParams::default(),
            RcptParams {
                notify: Some("NEVER".into()),
                orcpt: Some("rfc822;bob+40example.test".into()),
            },
        ];
        for params in rcpt_params {
            let wire = line(&ClientCommand::Rcpt {
                to: "bob@example.test",
                params: &params,
            });
            match parse_command(wire.trim_end().as_bytes()) {
                Ok(Command::Rcpt { to, params: got }) => {
                    assert_eq!(to.to_string(), "bob@example.test");
                    assert_eq!(got, params, "{wire}");
                }
                other => panic!("{wire}: {other:?}"),
            }
        }
        let simple = [
            (
                ClientCommand::Ehlo("client.test"),
                Command::Ehlo("client.test".into()),
            ),
            (
                ClientCommand::Helo("client.test"),
                Command::Helo("client.test".into()),
            ),
            (ClientCommand::Data, Command::Data),
            (
                ClientCommand::Bdat {
                    size: 7,
                    last: true,
                },
                Command::Bdat {
                    size: 7,
                    last: true,
                },
            ),
            (ClientCommand::Rset, Command::Rset),
            (ClientCommand::Noop, Command::Noop),
            (ClientCommand::Quit, Command::Quit),
            (ClientCommand::StartTls, Command::StartTls),
            (
                ClientCommand::AuthLogin,
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial_response: None,
                },
            ),
        ];
        for (cmd, want) in simple {
            let wire = line(&cmd);
            assert_eq!(
                parse_command(wire.trim_end().as_bytes()),
                Ok(want),
                "{wire}"
            );
        }
        // AUTH PLAIN decodes, on the server side, to the credentials we encoded.
        let wire = line(&ClientCommand::AuthPlain {
            username: "alice",
            password: "p\u{e4}ss word",
        });
        let Ok(Command::Auth {
            initial_response: Some(token),
            ..
        }) = parse_command(wire.trim_end().as_bytes())
        else {
            panic!("{wire}")
        };
        let creds = crate::decode_plain(&token).unwrap();
        assert_eq!(
            (creds.authcid.as_str(), creds.password.as_str()),
            ("alice", "p\u{e4}ss word")
        );
    }

    #[test]
    fn debug_never_shows_credentials() {
        let shown = format!(
            "{:?} {:?}",
            ClientCommand::AuthPlain {
                username: "alice",
                password: "hunter2",
            },
            ClientCommand::AuthLoginResponse("hunter2"),
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }
}
