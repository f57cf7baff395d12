//! JSON log lines written without parsing what was already written.
//!
//! The lines have the shape of `tracing-subscriber`'s JSON format with the current span
//! and the span list: `{"timestamp", "level", "fields": {...}, "target", "span": {...,
//! "name"}, "spans": [{..., "name"}, ...]}`. That format keeps each span's fields as a JSON
//! text, parses it again for every value recorded on the span (to merge the new value in)
//! and, for every line, once for the current span and once more for each span of the list.
//! A mail transaction records seven values and logs a line per accepted message, so that
//! parsing was most of what a node spent on logging.
//!
//! Here a span's fields are kept as a JSON object text too ([`SpanFields`]), but a new value
//! is appended before its closing brace, and a line copies the text as it is. The one case
//! that still merges is a field recorded twice on one span: the later value replaces the
//! earlier one, as before.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How a span's fields are kept: a JSON object text.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpanFields;

/// The event formatter of JSON lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut object = ObjectWriter::new(&mut writer);
        fields.record(&mut object);
        object.finish()
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let text = &mut current.fields;
        let Some(old_len) = object_body(text).map(str::len) else {
            // Not an object (cannot happen with this formatter): keep the new values.
            let mut added = String::new();
            let mut object = ObjectWriter::new(&mut added);
            fields.record(&mut object);
            object.finish()?;
            *text = added;
            return Ok(());
        };
        // `{old}` becomes `{old,new}` in place.
        text.pop();
        let start = text.len();
        let mut object = ObjectWriter::continuing(text, old_len == 0);
        fields.record(&mut object);
        let names = std::mem::take(&mut object.names);
        object.finish()?;
        let (old, new) = (&text[1..start], &text[start..text.len() - 1]);
        if !old.is_empty() && names.may_be_in(old) {
            // A key recorded again: the later value replaces the earlier one.
            let merged = merge(&format!("{{{old}}}"), &format!("{{{}}}", &new[1..]));
            *text = merged;
        }
        Ok(())
    }
}

impl<S> FormatEvent<S, SpanFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, SpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\",\"fields\":", meta.level())?;
        {
            let mut object = ObjectWriter::new(&mut writer);
            event.record(&mut object);
            object.finish()?;
        }
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<_> = scope.from_root().collect();
            if let Some(current) = spans.last() {
                writer.write_str(",\"span\":")?;
                write_span(&mut writer, current)?;
                writer.write_str(",\"spans\":[")?;
                for (i, span) in spans.iter().enumerate() {
                    if i > 0 {
                        writer.write_char(',')?;
                    }
                    write_span(&mut writer, span)?;
                }
                writer.write_char(']')?;
            }
        }
        writer.write_str("}\n")
    }
}

/// `{<the span's fields>,"name":"<its name>"}`.
fn write_span<S>(
    writer: &mut Writer<'_>,
    span: &tracing_subscriber::registry::SpanRef<'_, S>,
) -> fmt::Result
where
    S: for<'a> LookupSpan<'a>,
{
    writer.write_char('{')?;
    let extensions = span.extensions();
    let body = extensions
        .get::<FormattedFields<SpanFields>>()
        .and_then(|f| object_body(&f.fields));
    if let Some(body) = body.filter(|b| !b.is_empty()) {
        writer.write_str(body)?;
        writer.write_char(',')?;
    }
    writer.write_str("\"name\":")?;
    write_json_str(writer, span.metadata().name())?;
    writer.write_char('}')
}

/// What is between the braces of a JSON object text.
fn object_body(text: &str) -> Option<&str> {
    text.strip_prefix('{')?.strip_suffix('}')
}

/// The field names an [`ObjectWriter`] wrote, as many as fit without an allocation.
#[derive(Default)]
struct Names {
    names: [&'static str; 8],
    len: usize,
    /// More than fit: [`Names::may_be_in`] then says yes.
    overflow: bool,
}

impl Names {
    fn push(&mut self, name: &'static str) {
        match self.names.get_mut(self.len) {
            Some(slot) => {
                *slot = name;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }

    /// Whether one of the names may be a key of `old` (an object body this module wrote):
    /// whether `"name":` occurs in it. A value that contains that text makes it say yes too,
    /// which only costs a merge.
    fn may_be_in(&self, old: &str) -> bool {
        let old = old.as_bytes();
        self.overflow
            || self.names[..self.len].iter().any(|name| {
                // A name that JSON escapes is looked up by a merge.
                name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
                    || memchr::memmem::find_iter(old, name.as_bytes()).any(|at| {
                        old[..at].ends_with(b"\"") && old[at + name.len()..].starts_with(b"\":")
                    })
            })
    }
}

/// `current` with the values of `added`, a later value replacing an earlier one.
fn merge(current: &str, added: &str) -> String {
    let parse = |text: &str| match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let mut map = parse(current);
    map.extend(parse(added));
    serde_json::Value::Object(map).to_string()
}

/// Writes the fields it visits as one JSON object.
struct ObjectWriter<'a, W: fmt::Write> {
    out: &'a mut W,
    first: bool,
    result: fmt::Result,
    /// The names written so far.
    names: Names,
}

impl<'a, W: fmt::Write> ObjectWriter<'a, W> {
    fn new(out: &'a mut W) -> Self {
        let result = out.write_char('{');
        Self {
            out,
            first: true,
            result,
            names: Names::default(),
        }
    }

    /// Goes on writing an object whose `{` (and `first` or more fields) are already in `out`.
    fn continuing(out: &'a mut W, first: bool) -> Self {
        Self {
            out,
            first,
            result: Ok(()),
            names: Names::default(),
        }
    }

    fn finish(self) -> fmt::Result {
        self.result?;
        self.out.write_char('}')
    }

    /// Writes `"name":` (after a comma unless first); false when the field is skipped.
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.names.push(name);
        let separator = if self.first { "" } else { "," };
        self.first = false;
        self.result = self
            .out
            .write_str(separator)
            .and_then(|()| write_json_str(self.out, name))
            .and_then(|()| self.out.write_char(':'));
        self.result.is_ok()
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.key(field) {
            self.result = self.out.write_fmt(value);
        }
    }
}

impl<W: fmt::Write> Visit for ObjectWriter<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            self.raw(field, format_args!("null"));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            self.result = write_json_str(self.out, value);
        }
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        if self.key(field) {
            let mut result = self.out.write_char('[');
            for (i, b) in value.iter().enumerate() {
                let separator = if i == 0 { "" } else { "," };
                result = result.and_then(|()| write!(self.out, "{separator}{b}"));
            }
            self.result = result.and_then(|()| self.out.write_char(']'));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.result = self.out.write_char('"').and_then(|()| {
                write!(Escaper(self.out), "{value:?}").and_then(|()| self.out.write_char('"'))
            });
        }
    }
}

/// Writes `s` as a JSON string (quotes included).
fn write_json_str(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaper(out).write_str(s)?;
    out.write_char('"')
}

/// Escapes what is written through it for the inside of a JSON string.
struct Escaper<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            // Eight bytes at a time while none of them needs an escape (most text).
            if let Some(chunk) = bytes
                .get(i..i + 8)
                .and_then(|c| <[u8; 8]>::try_from(c).ok())
                && !may_need_escape(u64::from_le_bytes(chunk))
            {
                i += 8;
                continue;
            }
            let escaped = match bytes[i] {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => {
                    i += 1;
                    continue;
                }
            };
            self.0.write_str(&s[start..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{:04x}", bytes[i])?;
            } else {
                self.0.write_str(escaped)?;
            }
            i += 1;
            start = i;
        }
        self.0.write_str(&s[start..])
    }
}

/// Whether one of the eight bytes of `v` may be a quote, a backslash or a control character
/// (below 0x20). A byte just above one of those can make it say yes too; never no wrongly.
fn may_need_escape(v: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below n (n <= 0x80) sets its high bit in `(v - n*ONES) & !v & HIGH`.
    let below = |v: u64, n: u64| v.wrapping_sub(n * ONES) & !v & HIGH;
    (below(v, 0x20)
        | below(v ^ (u64::from(b'"') * ONES), 1)
        | below(v ^ (u64::from(b'\\') * ONES), 1))
        != 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn parsed(&self) -> Vec<Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    /// Runs `f` with this module's layer and with `tracing-subscriber`'s own JSON layer
    /// (current span and span list), and returns the lines of each.
    fn both(f: impl Fn()) -> (Vec<Value>, Vec<Value>) {
        let ours = Lines::default();
        let theirs = Lines::default();
        let (o, t) = (ours.clone(), theirs.clone());
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(SpanFields)
                    .event_format(JsonLines)
                    .with_writer(move || o.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(move || t.clone()),
            );
        tracing::subscriber::with_default(subscriber, f);
        (ours.parsed(), theirs.parsed())
    }

    /// The text this module's layer writes while `f` runs.
    fn ours_text(f: impl Fn()) -> String {
        let ours = Lines::default();
        let o = ours.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(SpanFields)
                .event_format(JsonLines)
                .with_writer(move || o.clone()),
        );
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(ours.0.lock().unwrap().clone()).unwrap()
    }

    fn without_timestamp(mut v: Value) -> Value {
        let ts = v["timestamp"].take();
        assert!(ts.as_str().is_some_and(|t| t.ends_with('Z')), "{ts}");
        v
    }

    #[test]
    fn lines_say_what_the_json_format_of_tracing_subscriber_says() {
        let (ours, theirs) = both(|| {
            let session = tracing::info_span!(
                "smtp.session",
                id = 7u64,
                listener = "mx",
                remote_ip = %"127.0.0.1",
                trace_id = tracing::field::Empty,
            );
            let _s = session.enter();
            tracing::info!("connected");
            session.record("trace_id", "4411c547");
            let tx = tracing::info_span!(
                "smtp.transaction",
                queue_id = %"01a2",
                smtp.helo = "client \"quoted\"\n",
                smtp.rcpt_count = tracing::field::Empty,
                smtp.outcome = tracing::field::Empty,
                ok = true,
                ratio = 0.5,
                delta = -3i64,
            );
            tx.record("smtp.rcpt_count", 2u64);
            tx.record("smtp.outcome", "queued");
            tx.in_scope(|| tracing::warn!(size = 5120u64, why = ?Some("x"), "queued"));
            tracing::info!(r#type = "raw", "outside the transaction");
        });
        assert_eq!(ours.len(), 3);
        assert_eq!(theirs.len(), 3);
        for (o, t) in ours.into_iter().zip(theirs) {
            assert_eq!(without_timestamp(o), without_timestamp(t));
        }
    }

    #[test]
    fn a_field_recorded_twice_keeps_the_later_value() {
        let record = || {
            let span = tracing::info_span!(
                "s",
                a = 1u64,
                outcome = tracing::field::Empty,
                b = tracing::field::Empty,
                c = tracing::field::Empty,
                looks = "like \"c\":",
            );
            span.record("c", 3u64);
            span.record("outcome", "first");
            span.record("b", "x");
            span.record("outcome", "second");
            span.in_scope(|| tracing::info!("line"));
        };
        // Once in `span`, once in `spans`: a key written twice would show four times.
        let text = ours_text(record);
        assert_eq!(text.matches(r#""outcome":"#).count(), 2, "{text}");
        let (ours, theirs) = both(record);
        assert_eq!(
            ours[0]["span"],
            json!({"a": 1, "b": "x", "c": 3, "looks": "like \"c\":", "outcome": "second", "name": "s"})
        );
        assert_eq!(
            without_timestamp(ours[0].clone()),
            without_timestamp(theirs[0].clone())
        );
    }

    #[test]
    fn values_recorded_together_read_as_if_recorded_one_by_one() {
        let record = || {
            let span = tracing::info_span!(
                "smtp.transaction",
                queue_id = %"01a2",
                smtp.rcpt_count = tracing::field::Empty,
                smtp.rcpt_to = tracing::field::Empty,
                smtp.message_size = tracing::field::Empty,
                smtp.reply_code = tracing::field::Empty,
                smtp.outcome = tracing::field::Empty,
            );
            crate::record_all(
                &span,
                [
                    ("smtp.rcpt_count", &2u64),
                    ("no.such.field", &"skipped"),
                    ("smtp.rcpt_to", &"a@x.test,b@x.test"),
                    ("smtp.message_size", &5120u64),
                ],
            );
            crate::record_all(
                &span,
                [("smtp.reply_code", &451i64), ("smtp.outcome", &"x")],
            );
            // Recorded again, together with a new one: the later values win.
            crate::record_all(
                &span,
                [("smtp.outcome", &"queued"), ("smtp.reply_code", &250i64)],
            );
            span.in_scope(|| tracing::info!("queued"));
        };
        let text = ours_text(record);
        assert_eq!(text.matches(r#""smtp.outcome":"#).count(), 2, "{text}");
        let (ours, theirs) = both(record);
        assert_eq!(
            ours[0]["span"],
            json!({
                "queue_id": "01a2", "smtp.rcpt_count": 2, "smtp.rcpt_to": "a@x.test,b@x.test",
                "smtp.message_size": 5120, "smtp.reply_code": 250, "smtp.outcome": "queued",
                "name": "smtp.transaction",
            })
        );
        assert_eq!(
            without_timestamp(ours[0].clone()),
            without_timestamp(theirs[0].clone())
        );
    }

    #[test]
    fn more_names_than_kept_still_merge_a_repeated_one() {
        let record = || {
            let span = tracing::info_span!(
                "s",
                a = 0u64,
                f1 = tracing::field::Empty,
                f2 = tracing::field::Empty,
                f3 = tracing::field::Empty,
                f4 = tracing::field::Empty,
                f5 = tracing::field::Empty,
                f6 = tracing::field::Empty,
                f7 = tracing::field::Empty,
                f8 = tracing::field::Empty,
            );
            crate::record_all(
                &span,
                [
                    ("f1", &1u64),
                    ("f2", &2u64),
                    ("f3", &3u64),
                    ("f4", &4u64),
                    ("f5", &5u64),
                    ("f6", &6u64),
                    ("f7", &7u64),
                    ("f8", &8u64),
                    ("a", &9u64),
                ],
            );
            span.in_scope(|| tracing::info!("line"));
        };
        // Once in `span`, once in `spans`: a key written twice would show four times.
        let text = ours_text(record);
        assert_eq!(text.matches(r#""a":"#).count(), 2, "{text}");
        let (ours, theirs) = both(record);
        assert_eq!(ours[0]["span"]["a"], 9);
        assert_eq!(ours[0]["span"]["f8"], 8);
        assert_eq!(
            without_timestamp(ours[0].clone()),
            without_timestamp(theirs[0].clone())
        );
    }

    #[test]
    fn a_line_outside_any_span_has_neither_span_nor_spans() {
        let (ours, _) = both(|| tracing::info!(n = 1u64, "alone"));
        assert!(ours[0].get("span").is_none() && ours[0].get("spans").is_none());
        assert_eq!(ours[0]["fields"], json!({"message": "alone", "n": 1}));
        assert_eq!(ours[0]["level"], "INFO");
    }

    #[test]
    fn every_byte_that_needs_it_is_escaped_wherever_it_stands() {
        // Each special character at every offset of a long string, so that it falls at each
        // place of an eight-byte chunk and in the bytes after the last whole chunk.
        for special in [
            '"', '\\', '\n', '\r', '\t', '\u{1}', '\u{1f}', '\u{7f}', 'é', ' ', '!',
        ] {
            for at in 0..20 {
                let mut text: String = "abcdefghijklmnopqrs".chars().take(at).collect();
                text.push(special);
                text.push_str("xyz0123456789");
                let mut out = String::new();
                write_json_str(&mut out, &text).unwrap();
                assert_eq!(out, serde_json::to_string(&text).unwrap(), "{text:?}");
            }
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut out = String::new();
        write_json_str(&mut out, "a\u{1}b\"c\\d\te").unwrap();
        assert_eq!(out, r#""a\u0001b\"c\\d\te""#);
        assert_eq!(
            serde_json::from_str::<String>(&out).unwrap(),
            "a\u{1}b\"c\\d\te"
        );
    }
}
