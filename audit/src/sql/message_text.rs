//! The text that full-text search covers: what a prompt or a completion says, read out of the
//! JSON the gateway records (`RequestMessages`, `ResponseMessages`).
//!
//! The JSON text itself is not what an auditor searches. Its escapes glue words together — a
//! line break is `\n`, so the word after it was indexed as `nword` and a search for `word` missed
//! every line but the first — and its structure adds words no one means (`role`, `content`,
//! `user`, the base64 of an image). So the index gets the *string values* of the JSON, unescaped,
//! one per line, without:
//!
//! - object keys (`role`, `content`, `tool_calls`, …);
//! - the values of keys that name structure rather than say anything: [`STRUCTURAL_KEYS`]
//!   (`"role": "user"`, `"type": "text"`, ids, statuses) and encoded media (`data`);
//! - `data:` URLs (an image or a file inlined as base64), and bare base64 of 256 characters or more
//!   (a generated image's `result`, a reasoning item's `encrypted_content`);
//! - numbers, booleans and nulls (a prompt given as token ids says nothing searchable).
//!
//! What a message says stays whole: the text of a message or a content part, a tool's name and
//! its arguments (a JSON string, searched as text), a refusal, an image's URL. JSON cut off at
//! the capture limit (a prompt longer than it) is closed where it was cut and read the same way,
//! the message it was cut in up to the cut. Other text that is not JSON (it never is, from the
//! gateway) is indexed as it is.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Keys whose values are left out of the searchable text: they name a message's structure
/// (who speaks, which kind of part, an object's id and state) or hold encoded media.
pub(super) const STRUCTURAL_KEYS: &[&str] = &[
    "role", "type", "id", "object", "status", "detail", "format", "data",
];

/// The searchable text of `json`, a prompt or a completion as the gateway records it; see the
/// module's documentation.
pub(super) fn searchable(json: &str) -> String {
    let mut text = String::with_capacity(json.len());
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let read = Collect { text: &mut text }
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    match read {
        Ok(()) => text,
        // Cut off at the capture limit: the JSON closed where it was cut, and read again.
        Err(error) if error.is_eof() => {
            let mut closed_text = String::with_capacity(json.len());
            let closed = closed(json);
            let mut deserializer = serde_json::Deserializer::from_str(&closed);
            let read = Collect {
                text: &mut closed_text,
            }
            .deserialize(&mut deserializer)
            .and_then(|()| deserializer.end());
            // (Closing always makes JSON of what was read; if not, what was read whole.)
            if read.is_ok() { closed_text } else { text }
        }
        Err(_) => json.to_owned(),
    }
}

/// `json` cut off at its end, closed into JSON that says what it said up to the cut: the string
/// it was cut in ended (an escape the cut split left out; a key given a `null` value), a
/// number or literal cut short and a dangling `,` or `:` dropped or completed, then every open
/// array and object closed.
fn closed(json: &str) -> String {
    let mut closers = Vec::new();
    let mut string_start = None;
    let mut escaped = false;
    let mut expect_key = false;
    let mut in_key = false;
    for (at, byte) in json.bytes().enumerate() {
        if string_start.is_some() {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => string_start = None,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => {
                string_start = Some(at + 1);
                in_key = expect_key;
                expect_key = false;
            }
            b'{' => {
                closers.push('}');
                expect_key = true;
            }
            b'[' => {
                closers.push(']');
                expect_key = false;
            }
            b'}' | b']' => {
                closers.pop();
                expect_key = false;
            }
            b',' => expect_key = closers.last() == Some(&'}'),
            b':' => expect_key = false,
            _ => {}
        }
    }
    let mut out = String::with_capacity(json.len() + closers.len() + 8);
    match string_start {
        Some(start) => {
            out.push_str(&json[..start]);
            out.push_str(whole_escapes(&json[start..]));
            out.push('"');
            if in_key {
                out.push_str(":null");
            }
        }
        None => {
            // A number or literal cut short says nothing searchable: it goes.
            let kept = json.trim_end_matches(|c: char| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') || c.is_whitespace()
            });
            out.push_str(kept.strip_suffix(',').unwrap_or(kept));
            if out.ends_with(':') {
                out.push_str("null");
            }
        }
    }
    out.extend(closers.iter().rev());
    out
}

/// The longest start of a JSON string's text (without its quotes) that is whole: an escape split
/// by a cut (`\`, `\u00`, the first half of a surrogate pair) left out.
fn whole_escapes(text: &str) -> &str {
    let mut text = text;
    // At most `\uXXXX\uXXX` (a surrogate pair cut in its second half) is not whole.
    for _ in 0..16 {
        if serde_json::from_str::<String>(&format!("\"{text}\"")).is_ok() {
            return text;
        }
        let Some((last, _)) = text.char_indices().next_back() else {
            break;
        };
        text = &text[..last];
    }
    ""
}

/// Appends the string values of a JSON value to `text`, one per line.
struct Collect<'a> {
    text: &'a mut String,
}

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        if !value.is_empty() && !is_data_url(value) && !is_base64_blob(value) {
            if !self.text.is_empty() {
                self.text.push('\n');
            }
            self.text.push_str(value);
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Collect {
                text: &mut *self.text,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(structural) = map.next_key_seed(IsStructural)? {
            if structural {
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(Collect {
                    text: &mut *self.text,
                })?;
            }
        }
        Ok(())
    }
}

/// Reads an object key and says whether it is one of [`STRUCTURAL_KEYS`], without copying it.
struct IsStructural;

impl<'de> DeserializeSeed<'de> for IsStructural {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for IsStructural {
    type Value = bool;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(STRUCTURAL_KEYS.contains(&key))
    }
}

/// Whether `value` is a `data:` URL carrying base64 (an inlined image, audio clip or file).
/// Whether `value` is encoded media given bare: a long run of base64 (or base64url) without a
/// space, as a Responses API `image_generation_call` gives its image in `result`, or a
/// reasoning item its `encrypted_content`. No one searches for it, and it would fill the index.
fn is_base64_blob(value: &str) -> bool {
    const SHORTEST: usize = 256;
    value.len() >= SHORTEST
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

fn is_data_url(value: &str) -> bool {
    value
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"))
        && value.as_bytes()[..value.len().min(256)]
            .windows(8)
            .any(|window| window == b";base64,")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn line_breaks_and_quotes_in_a_message_separate_words_as_in_the_text() {
        let json = json!([{"role": "user", "content": "first line\nsecond\tthird \"quoted\""}])
            .to_string();
        assert!(json.contains("\\nsecond"), "{json}");
        assert_eq!(searchable(&json), "first line\nsecond\tthird \"quoted\"");
    }

    #[test]
    fn keys_roles_types_ids_and_media_are_left_out() {
        let json = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}
        ])
        .to_string();
        assert_eq!(
            searchable(&json),
            // (`json!` orders an object's keys.)
            "Be brief.\nWhat is in this picture?\nhttps://example.com/cat.png\n\
             {\"city\":\"Paris\"}\nget_weather\n18 degrees\ncall_1"
        );
    }

    #[test]
    fn a_prompt_given_as_a_string_or_as_token_ids() {
        assert_eq!(searchable("\"Once upon\\na time\""), "Once upon\na time");
        assert_eq!(searchable("[[1234, 5678], 9, true, null]"), "");
    }

    #[test]
    fn a_prompt_cut_at_the_capture_limit_is_searched_as_text_not_json() {
        let json = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first line\nBudget for \"2025\" \u{e9}t\u{e9}"}
        ])
        .to_string();
        // Cut in the middle of the last message, and inside each kind of escape.
        let cut = json.find("2025").unwrap() + 2;
        assert_eq!(
            searchable(&json[..cut]),
            "Be brief.\nfirst line\nBudget for \"20"
        );
        let escape = json.find("\\nBudget").unwrap() + 1;
        assert_eq!(searchable(&json[..escape]), "Be brief.\nfirst line");
        assert_eq!(searchable(r#"["a", "Caf\u00e9 \ud83d\ude"#), "a\nCafé ");
        assert_eq!(searchable("[\"unfinished"), "unfinished");
        // Cut in a key, a structural value, a literal or between values: what was read whole.
        assert_eq!(searchable(r#"[{"role":"user","cont"#), "");
        assert_eq!(searchable(r#"[{"content":"hi"},{"role":"us"#), "hi");
        assert_eq!(searchable(r#"[{"content":"hi"},"#), "hi");
        assert_eq!(searchable(r#"[{"content":"hi","n":tr"#), "hi");
        assert_eq!(searchable(r#"[{"content":"hi","n": "#), "hi");
        assert_eq!(searchable(r#"[{"content":"hi","text""#), "hi");
        // Inlined media cut short stays out.
        assert_eq!(
            searchable(r#"[{"content":"hi","url":"data:image/png;base64,iVBO"#),
            "hi"
        );
    }

    #[test]
    fn unicode_escapes_are_decoded() {
        assert_eq!(searchable(r#"["Caf\u00e9 \ud83d\ude00"]"#), "Café 😀");
    }

    #[test]
    fn text_that_is_not_json_is_searched_as_it_is() {
        assert_eq!(searchable("plain words"), "plain words");
        assert_eq!(searchable("\"one\" \"two\""), "\"one\" \"two\"");
    }

    #[test]
    fn bare_base64_is_media_and_long_words_are_not() {
        let image = "iVBORw0KGgoAAAANSUhEUgAA".repeat(20);
        let json = json!([
            {"type": "image_generation_call", "result": image},
            {"type": "reasoning", "encrypted_content": format!("gAAAAAB{}", "x_Y-z9".repeat(60))},
            {"type": "message", "content": [{"type": "output_text", "text": "Here is your cat."}]}
        ])
        .to_string();
        assert_eq!(searchable(&json), "Here is your cat.");
        // Text with spaces, or a short token, stays searchable.
        let text = "word ".repeat(100);
        assert_eq!(searchable(&json!([text]).to_string()), text);
        assert_eq!(searchable(r#"["INV-2024-0042"]"#), "INV-2024-0042");
    }

    #[test]
    fn only_base64_data_urls_are_media() {
        assert!(is_data_url("data:image/png;base64,AAAA"));
        assert!(is_data_url("DATA:application/pdf;base64,JVBER"));
        assert!(!is_data_url("data: the quarterly numbers"));
        assert!(!is_data_url("database"));
        assert!(!is_data_url("dé"));
    }
}
