//! How a call's captured prompt and completion read: the JSON the gateway keeps
//! (`RequestMessages`, `ResponseMessages`, see `gatehouse_gateway::capture`) turned into
//! messages of a speaker and a text, for people to read. Everything stays text: the page shows
//! it as text, never as markup.
//!
//! The shapes read are the APIs' own: chat messages (`role`, `content` as a string or a list of
//! parts, `tool_calls`, `refusal`), Responses input and output items (`message`,
//! `function_call`, `function_call_output`, `reasoning`), Assistants messages (text parts whose
//! `text` holds a `value`), completion choices' text, and plain strings (a completion's prompt,
//! an embedding's input, a form's prompt). Anything else is shown as its JSON.

use gatehouse_schema::audit::BackendAttempt;
use serde_json::Value;

/// One message of a transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptEntry {
    /// Who speaks (`user`, `assistant`, `system`, `tool`) or what the item is
    /// (`function_call`, `reasoning`); empty when the capture does not say.
    pub label: String,
    /// What it says.
    pub text: String,
}

/// A captured prompt or completion, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transcript {
    /// Messages in order.
    Entries(Vec<TranscriptEntry>),
    /// Text that is no list of messages (not JSON, or JSON of another shape), pretty-printed
    /// when it is JSON.
    Text(String),
}

/// Reads a captured prompt or completion.
pub fn transcript(captured: &str) -> Transcript {
    let Ok(value) = serde_json::from_str::<Value>(captured) else {
        return Transcript::Text(captured.to_owned());
    };
    match &value {
        Value::String(text) => Transcript::Entries(vec![TranscriptEntry {
            label: String::new(),
            text: text.clone(),
        }]),
        Value::Array(items) if items.iter().all(|i| i.is_string() || i.is_object()) => {
            Transcript::Entries(items.iter().map(entry).collect())
        }
        _ => Transcript::Text(pretty_json(&value)),
    }
}

fn pretty_json(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn entry(item: &Value) -> TranscriptEntry {
    let Value::Object(message) = item else {
        return TranscriptEntry {
            label: String::new(),
            text: item.as_str().unwrap_or_default().to_owned(),
        };
    };
    let text_of = |key: &str| message.get(key).and_then(Value::as_str);
    let label = text_of("role")
        .or_else(|| text_of("type"))
        .unwrap_or_default()
        .to_owned();
    // Every field is shown: those read here as text, the others as their JSON after them (but
    // an output item's own `id` and `status`, which say nothing of what was said).
    let mut read = vec!["role", "type", "content", "id", "status"];
    let mut lines = Vec::new();
    match message.get("content") {
        Some(Value::String(text)) => lines.push(text.clone()),
        Some(Value::Array(parts)) => lines.extend(parts.iter().map(part_text)),
        Some(Value::Null) | None => {}
        Some(other) => lines.push(other.to_string()),
    }
    match text_of("type") {
        Some("function_call" | "custom_tool_call") => {
            read.extend(["name", "arguments", "input"]);
            let arguments = message
                .get("arguments")
                .or_else(|| message.get("input"))
                .map(text_or_json)
                .unwrap_or_default();
            lines.push(format!(
                "{}({arguments})",
                text_of("name").unwrap_or_default()
            ));
        }
        Some("function_call_output" | "custom_tool_call_output") => {
            read.push("output");
            lines.push(message.get("output").map(text_or_json).unwrap_or_default());
        }
        Some("reasoning") => {
            read.push("summary");
            lines.extend(
                message
                    .get("summary")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(part_text),
            );
        }
        _ => {}
    }
    if let Some(text) = text_of("text") {
        read.push("text");
        lines.push(text.to_owned());
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        read.push("tool_calls");
        lines.extend(calls.iter().map(tool_call));
    }
    if let Some(refusal) = text_of("refusal") {
        read.push("refusal");
        if !refusal.is_empty() {
            lines.push(format!("refusal: {refusal}"));
        }
    }
    if let Some(rest) = unread(message, &read) {
        lines.push(rest);
    }
    TranscriptEntry {
        label,
        text: lines.join("\n"),
    }
}

/// A tool call of a chat message: `→ name(arguments)` for a function, `→ name(input)` for a
/// custom tool, its JSON for any other.
fn tool_call(call: &Value) -> String {
    for (kind, argument) in [("function", "arguments"), ("custom", "input")] {
        if let Some(tool) = call.get(kind).and_then(Value::as_object) {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or_default();
            let argument = tool.get(argument).map(text_or_json).unwrap_or_default();
            return format!("→ {name}({argument})");
        }
    }
    format!("→ {call}")
}

/// A string as it is, anything else as its JSON.
fn text_or_json(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

/// The fields of `object` not in `read` that hold something, as one JSON object.
fn unread(object: &serde_json::Map<String, Value>, read: &[&str]) -> Option<String> {
    let rest: serde_json::Map<String, Value> = object
        .iter()
        .filter(|(key, value)| {
            !read.contains(&key.as_str())
                && !value.is_null()
                && value.as_array().is_none_or(|items| !items.is_empty())
                && value.as_str().is_none_or(|text| !text.is_empty())
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    (!rest.is_empty()).then(|| Value::Object(rest).to_string())
}

/// The text of one part of a message's content, and after it the part's other fields as JSON
/// (an image's URL, a file's id, annotations).
fn part_text(part: &Value) -> String {
    let Value::Object(fields) = part else {
        return text_or_json(part);
    };
    let mut read = vec!["type"];
    let mut text = match fields.get("text") {
        Some(Value::String(text)) => {
            read.push("text");
            Some(text.clone())
        }
        // Assistants: `{"type": "text", "text": {"value": …, "annotations": […]}}`.
        Some(Value::Object(inner)) if inner.get("value").is_some_and(Value::is_string) => {
            read.push("text");
            let value = inner
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or_default();
            Some(match unread(inner, &["value"]) {
                Some(rest) => format!("{value}\n{rest}"),
                None => value.to_owned(),
            })
        }
        _ => None,
    };
    if text.is_none()
        && let Some(transcript) = fields.get("transcript").and_then(Value::as_str)
    {
        // A Realtime session's audio, by its transcript.
        read.push("transcript");
        text = Some(format!("[audio] {transcript}"));
    }
    if text.is_none()
        && let Some(refusal) = fields.get("refusal").and_then(Value::as_str)
    {
        read.push("refusal");
        text = Some(format!("refusal: {refusal}"));
    }
    let text = text.unwrap_or_else(|| {
        match fields.get("type").and_then(Value::as_str) {
            Some("image_url" | "input_image" | "image_file") => "[image]",
            Some("input_audio" | "audio" | "output_audio") => "[audio]",
            Some("input_file" | "file") => "[file]",
            _ => "",
        }
        .to_owned()
    });
    match unread(fields, &read) {
        Some(rest) if text.is_empty() => rest,
        Some(rest) => format!("{text} {rest}"),
        None => text,
    }
}

/// The attempts of a call, when `attempts` is the JSON array the gateway writes.
pub fn attempt_rows(attempts: &str) -> Option<Vec<BackendAttempt>> {
    serde_json::from_str(attempts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(captured: &str) -> Vec<(String, String)> {
        match transcript(captured) {
            Transcript::Entries(entries) => {
                entries.into_iter().map(|e| (e.label, e.text)).collect()
            }
            Transcript::Text(text) => panic!("read as text: {text}"),
        }
    }

    fn pair(label: &str, text: &str) -> (String, String) {
        (label.to_owned(), text.to_owned())
    }

    #[test]
    fn chat_messages_read_as_speakers_and_text() {
        let captured = r#"[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"What is <b>this</b>?"},{"type":"image_url","image_url":{"url":"data:…"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"lookup","arguments":"{\"q\":1}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}]"#;
        assert_eq!(
            entries(captured),
            [
                pair("system", "Be brief."),
                pair(
                    "user",
                    "What is <b>this</b>?\n[image] {\"image_url\":{\"url\":\"data:…\"}}"
                ),
                pair("assistant", "→ lookup({\"q\":1})"),
                pair("tool", "42\n{\"tool_call_id\":\"c1\"}"),
            ]
        );
        // A completion's message with a refusal.
        assert_eq!(
            entries(r#"[{"content":null,"refusal":"I can't help with that.","role":"assistant"}]"#),
            [pair("assistant", "refusal: I can't help with that.")]
        );
    }

    #[test]
    fn responses_and_assistants_items_read_too() {
        let output = r#"[{"type":"reasoning","summary":[{"type":"summary_text","text":"Thinking."}]},
            {"type":"function_call","name":"weather","arguments":"{}","call_id":"c"},
            {"type":"message","role":"assistant","content":[{"type":"output_text","text":"Sunny."}]}]"#;
        assert_eq!(
            entries(output),
            [
                pair("reasoning", "Thinking."),
                pair("function_call", "weather({})\n{\"call_id\":\"c\"}"),
                pair("assistant", "Sunny."),
            ]
        );
        let thread = r#"[{"role":"assistant","content":[{"type":"text","text":{"value":"Invoice 42 was paid.","annotations":[]}}]}]"#;
        assert_eq!(entries(thread), [pair("assistant", "Invoice 42 was paid.")]);
        // Plain strings: a prompt, completion choices' text.
        assert_eq!(entries(r#""Describe a cat""#), [pair("", "Describe a cat")]);
        assert_eq!(
            entries(r#"["one","two"]"#),
            [pair("", "one"), pair("", "two")]
        );
    }

    #[test]
    fn other_shapes_are_shown_as_they_are() {
        assert_eq!(
            transcript("not json <b>"),
            Transcript::Text("not json <b>".to_owned())
        );
        assert_eq!(
            transcript("[1,2]"),
            Transcript::Text("[\n  1,\n  2\n]".to_owned())
        );
        // The fields of an item not read as text keep their JSON.
        assert_eq!(
            entries(r#"[{"role":"user","weird":true}]"#),
            [pair("user", r#"{"weird":true}"#)]
        );
    }

    #[test]
    fn nothing_captured_is_left_out() {
        // A Realtime answer's audio by its transcript, a custom tool call, an image's URL, a
        // citation, a message's name: each shown.
        let captured = r#"[{"role":"assistant","content":[{"type":"audio","transcript":"Hello there."}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"custom","custom":{"name":"grep","input":"needle"}}]},
            {"role":"user","name":"ops-bot","content":[{"type":"image_url","image_url":{"url":"https://example.test/a.png"}}]},
            {"role":"assistant","content":[{"type":"text","text":{"value":"Paid.","annotations":[{"type":"file_citation","text":"[1]"}]}}]}]"#;
        assert_eq!(
            entries(captured),
            [
                pair("assistant", "[audio] Hello there."),
                pair("assistant", "→ grep(needle)"),
                pair(
                    "user",
                    "[image] {\"image_url\":{\"url\":\"https://example.test/a.png\"}}\n{\"name\":\"ops-bot\"}"
                ),
                pair(
                    "assistant",
                    "Paid.\n{\"annotations\":[{\"text\":\"[1]\",\"type\":\"file_citation\"}]}"
                ),
            ]
        );
        assert_eq!(entries("[]"), []);
    }

    #[test]
    fn attempts_read_as_rows() {
        let rows = attempt_rows(
            r#"[{"BackendId":"east","Status":429,"ElapsedMs":12,"Error":"throttled"},{"BackendId":"west","Status":200,"ElapsedMs":80,"Error":null}]"#,
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].status, Some(429));
        assert_eq!(rows[0].error.as_deref(), Some("throttled"));
        assert_eq!(rows[1].backend_id, "west");
        assert_eq!(rows[1].elapsed_ms, 80);
        assert_eq!(attempt_rows("not json"), None);
        assert_eq!(attempt_rows("[{\"Status\":1}]"), None);
    }
}
