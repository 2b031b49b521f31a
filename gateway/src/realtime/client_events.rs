//! Judging a client's Realtime event before it is passed on: the audio append read without
//! parsing it (the fast path), every other event parsed whole, and the `error` event that
//! answers one the gateway cannot judge (see the module above, "one JSON object that gives no
//! member twice").

use serde_json::Value;

use super::error_event;

/// Whether an event's text opens with a `type` member whose value `matches`: `{"type":"…"`,
/// with or without spaces. An event that puts its `type` later is parsed whole instead.
pub(super) fn leading_type_is(text: &str, matches: impl Fn(&str) -> bool) -> bool {
    let rest = text.trim_start();
    let Some(rest) = rest.strip_prefix('{') else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix("\"type\"") else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix(':') else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix('"') else {
        return false;
    };
    // Event types hold no escapes; one that did is not matched.
    match rest.find(['"', '\\']) {
        Some(end) if rest.as_bytes()[end] == b'"' => matches(&rest[..end]),
        _ => false,
    }
}

/// Whether a client's event is an audio append the gateway may pass on without parsing it: an
/// object whose members are all strings written without escapes or control characters, its first
/// member `type`, of `input_audio_buffer.append`, none given twice, and nothing after it. Any other
/// text is parsed whole ([`read_client_event`]), so that no second `type` hides behind the first
/// (base64 audio holds no `"` nor `\`: an append as the SDKs write it is told here, reading each
/// byte once and building nothing).
pub(super) fn is_plain_audio_append(text: &str) -> bool {
    /// Skips JSON's whitespace (not all of Unicode's, which a JSON parser refuses).
    fn skip_space(text: &str) -> &str {
        text.trim_start_matches([' ', '\t', '\n', '\r'])
    }
    /// A string at the start of `text` written without escapes or control characters: its
    /// content and what follows it.
    fn plain_string(text: &str) -> Option<(&str, &str)> {
        let rest = text.strip_prefix('"')?;
        let end = memchr::memchr2(b'"', b'\\', rest.as_bytes())?;
        let (content, after) = (rest.get(..end)?, rest.get(end..)?);
        let after = after.strip_prefix('"')?;
        if content.bytes().any(|byte| byte < 0x20) {
            return None;
        }
        Some((content, after))
    }
    let Some(mut rest) = skip_space(text).strip_prefix('{') else {
        return false;
    };
    // An append has two or three members (`type`, `audio`, `event_id`); more are parsed whole.
    let mut names = [""; 4];
    let mut count = 0;
    loop {
        let Some((name, after)) = plain_string(skip_space(rest)) else {
            return false;
        };
        let Some(after) = skip_space(after).strip_prefix(':') else {
            return false;
        };
        let Some((value, after)) = plain_string(skip_space(after)) else {
            return false;
        };
        let known = names.get(..count).unwrap_or_default();
        if (count == 0 && (name, value) != ("type", "input_audio_buffer.append"))
            || known.contains(&name)
        {
            return false;
        }
        let Some(slot) = names.get_mut(count) else {
            return false;
        };
        *slot = name;
        count += 1;
        let after = skip_space(after);
        if let Some(next) = after.strip_prefix(',') {
            rest = next;
        } else {
            return after
                .strip_prefix('}')
                .is_some_and(|end| skip_space(end).is_empty());
        }
    }
}

/// A client's event as the gateway judges it: its text parsed as one JSON object in which no
/// object gives a member twice. Otherwise the `error` event that answers it instead: of a member
/// given twice, the gateway reads the last and the member may read the first (a `type` of
/// `input_audio_buffer.append` then `response.create` would pass the limits as audio and run a
/// response), and text the gateway cannot parse (nesting deeper than it reads, a lone surrogate
/// that other parsers take) it cannot judge at all.
pub(super) fn read_client_event(text: &str) -> Result<Value, String> {
    let event = match serde_json::from_str::<Value>(text) {
        Ok(event) if event.is_object() => event,
        Ok(_) => return Err(unreadable_event("it is not a JSON object")),
        Err(error) => {
            return Err(unreadable_event(&format!(
                "it is not JSON the gateway reads: {error}"
            )));
        }
    };
    let Some(name) = crate::peek::duplicate_member(text.as_bytes()) else {
        return Ok(event);
    };
    tracing::info!("a Realtime client event that gives a member twice was not passed on");
    // Its id, unless that is what it gives twice.
    let event_id = match name.as_str() {
        "event_id" => Value::Null,
        _ => event.get("event_id").cloned().unwrap_or(Value::Null),
    };
    let shown: String = name.chars().take(64).collect();
    let message = format!(
        "The event gives `{shown}` more than once in one object, so it was not sent on: send \
         each member once (servers differ in which one they take)."
    );
    Err(error_event("duplicate_member", &message, event_id))
}

/// The `error` event for a client's message the gateway cannot read as an event (`why`): it is
/// not passed on.
pub(super) fn unreadable_event(why: &str) -> String {
    tracing::info!(
        why,
        "a Realtime client message that is not an event was not passed on"
    );
    let message = format!(
        "The event was not sent on: {why}. Send each client event as one JSON object in a text \
         message."
    );
    error_event("invalid_json", &message, Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leading_type_is_read_without_parsing() {
        let delta = |kind: &str| kind.ends_with(".delta");
        assert!(leading_type_is(
            r#"{"type":"response.audio.delta","delta":"AAAA"}"#,
            delta
        ));
        assert!(leading_type_is(
            r#" { "type" : "response.text.delta" }"#,
            delta
        ));
        assert!(!leading_type_is(r#"{"type":"response.done"}"#, delta));
        // Later, escaped or absent: not told here (the event is parsed whole).
        assert!(!leading_type_is(
            r#"{"event_id":"e","type":"response.audio.delta"}"#,
            delta
        ));
        assert!(!leading_type_is(r#"{"type":"x.\u0064elta"}"#, delta));
        assert!(!leading_type_is("not json", delta));
    }

    #[test]
    fn only_an_append_nothing_could_read_otherwise_skips_parsing() {
        for plain in [
            r#"{"type":"input_audio_buffer.append","audio":"AAAA/+=="}"#,
            r#" { "type" : "input_audio_buffer.append" , "event_id" : "e1", "audio": "AA" }
"#,
        ] {
            assert!(is_plain_audio_append(plain), "{plain}");
        }
        for judged in [
            // A second `type`, which a parser taking the last would read.
            r#"{"type":"input_audio_buffer.append","type":"response.create"}"#,
            r#"{"type":"input_audio_buffer.append","t\u0079pe":"response.create"}"#,
            r#"{"type":"input_audio_buffer.append","audio":"AA","audio":"BB"}"#,
            // Escapes, other values, more after the object, not first.
            r#"{"type":"input_audio_buffer.append","audio":"A\"A"}"#,
            r#"{"type":"input_audio_buffer.append","audio":"AA","n":1}"#,
            r#"{"type":"input_audio_buffer.append","audio":"AA"}{"type":"response.create"}"#,
            r#"{"audio":"AA","type":"input_audio_buffer.append"}"#,
            r#"{"type":"response.create"}"#,
            "{\"type\":\"input_audio_buffer.append\",\"audio\":\"A\u{1}\"}",
            // Unicode whitespace no JSON parser takes.
            "{\u{a0}\"type\":\"input_audio_buffer.append\"}",
            r#"{"type":"input_audio_buffer.append","a":"","b":"","c":"","d":""}"#,
            r#"{"type":"input_audio_buffer.append""#,
        ] {
            assert!(!is_plain_audio_append(judged), "{judged}");
        }
    }

    #[test]
    fn a_client_event_the_gateway_cannot_judge_is_answered_not_read() {
        let refusal = |text: &str| -> Value {
            serde_json::from_str(&read_client_event(text).unwrap_err()).unwrap()
        };
        let twice = refusal(
            r#"{"type":"input_audio_buffer.append","type":"response.create","event_id":"e7"}"#,
        );
        assert_eq!(twice["type"], "error");
        assert_eq!(twice["error"]["type"], "invalid_request_error");
        assert_eq!(twice["error"]["code"], "duplicate_member");
        assert_eq!(twice["error"]["event_id"], "e7");
        assert!(
            twice["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`type`"),
            "{twice}"
        );
        // Nested, or the id itself given twice (then not echoed).
        let nested = refusal(
            r#"{"type":"session.update","event_id":"e8","session":{"tools":[{"type":"mcp","type":"function"}]}}"#,
        );
        assert_eq!(nested["error"]["event_id"], "e8");
        let ids = refusal(r#"{"type":"response.create","event_id":"a","event_id":"b"}"#);
        assert_eq!(ids["error"]["event_id"], Value::Null);

        let deep = format!(
            r#"{{"type":"response.create","x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for unreadable in [
            r#"{"type":"response.create","response":{"instructions":"\ud800"}}"#,
            deep.as_str(),
            r#"[{"type":"response.create"}]"#,
            "response.create",
        ] {
            let refused = refusal(unreadable);
            assert_eq!(refused["error"]["code"], "invalid_json", "{unreadable}");
            assert_eq!(refused["error"]["event_id"], Value::Null);
        }
        assert_eq!(
            read_client_event(r#"{"type":"response.create","event_id":"e9"}"#).unwrap()["event_id"],
            "e9"
        );
    }
}
