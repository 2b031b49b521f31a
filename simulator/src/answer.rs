//! The simulated "model": deterministic answers and token counts that look realistic.

use serde_json::{Map, Value};

/// How many characters of the prompt an answer quotes.
const QUOTED_CHARS: usize = 40;

/// The answer to a prompt: `"<lead> <first 40 chars of the prompt>"`, the same every time.
pub(crate) fn answer_to(lead: &str, prompt: &str) -> String {
    let quoted: String = prompt.chars().take(QUOTED_CHARS).collect();
    format!("{lead}: {quoted}")
}

/// Tokens a text would take: about one per four characters, at least one.
pub(crate) fn tokens_for_chars(chars: usize) -> u64 {
    u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX).max(1)
}

/// The text of a message `content`: a string, or an array of parts whose `text` is joined.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Characters of all message contents, and the text of the last user message.
pub(crate) fn read_messages(messages: &[Value]) -> (usize, String) {
    let mut chars = 0;
    let mut last_user = String::new();
    for message in messages {
        let text = content_text(message.get("content"));
        chars += text.chars().count();
        if message.get("role").and_then(Value::as_str) == Some("user") {
            last_user = text;
        }
    }
    (chars, last_user)
}

/// Splits a text into `parts` consecutive pieces of near-equal length (some may be empty when the
/// text is short); joined again they give the text back.
pub(crate) fn split_for_stream(text: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let parts = parts.max(1);
    (0..parts)
        .map(|i| {
            chars[i * chars.len() / parts..(i + 1) * chars.len() / parts]
                .iter()
                .collect()
        })
        .collect()
}

/// A chat/completions-style `usage` object.
pub(crate) fn completion_usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    serde_json::json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

/// Azure's content filter verdict when nothing was filtered.
pub(crate) fn content_filter_results() -> Value {
    serde_json::json!({
        "hate": {"filtered": false, "severity": "safe"},
        "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"},
        "violence": {"filtered": false, "severity": "safe"},
    })
}

/// Azure's `prompt_filter_results` for one unfiltered prompt.
pub(crate) fn prompt_filter_results() -> Value {
    let mut results = content_filter_results();
    if let Some(map) = results.as_object_mut() {
        map.insert(
            "jailbreak".to_owned(),
            serde_json::json!({"filtered": false, "detected": false}),
        );
    }
    serde_json::json!([{"prompt_index": 0, "content_filter_results": results}])
}

/// Whether a streamed request asked for the final usage chunk.
pub(crate) fn wants_stream_usage(body: &Map<String, Value>) -> bool {
    body.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Whether the request asks for a streamed answer.
pub(crate) fn wants_stream(body: &Map<String, Value>) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_quotes_forty_characters_of_unicode_safely() {
        let prompt = "é".repeat(50);
        assert_eq!(answer_to("A", &prompt), format!("A: {}", "é".repeat(40)));
    }

    #[test]
    fn stream_split_reassembles() {
        for parts in [1, 3, 5, 100] {
            let pieces = split_for_stream("Simulated answer to: hello", parts);
            assert_eq!(pieces.len(), parts);
            assert_eq!(pieces.concat(), "Simulated answer to: hello");
        }
    }

    #[test]
    fn tokens_are_a_quarter_of_chars_at_least_one() {
        assert_eq!(tokens_for_chars(0), 1);
        assert_eq!(tokens_for_chars(9), 3);
        assert_eq!(tokens_for_chars(400), 100);
    }
}
