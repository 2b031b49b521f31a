//! Step 9: what the call said — bodies up to a limit, the streamed completion reassembled, usage.
//!
//! The capture is a tee: chunks are forwarded first and copied second, and nothing here holds a
//! chunk back from the client. SSE is framed by `eventsource-stream`; this module only interprets
//! the events (`azure-specs.md` §1.6, §1.7).

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use eventsource_stream::{EventStream, Eventsource};
use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use serde_json::{Map, Value, json};

/// Largest non-streamed response body the gateway parses for usage, whatever the capture limit.
pub const PARSE_LIMIT: usize = 8 * 1024 * 1024;

/// Bytes kept up to a limit, with a flag when more came.
#[derive(Debug, Default)]
pub struct BodyCapture {
    limit: usize,
    kept: Vec<u8>,
    truncated: bool,
}

impl BodyCapture {
    /// A capture that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BodyCapture {
            limit,
            kept: Vec::new(),
            truncated: false,
        }
    }

    /// Appends what fits of `chunk`.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// The most bytes kept.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The kept bytes as text (`None` when the limit is 0), cut at a character boundary.
    pub fn into_text(self) -> Option<String> {
        if self.limit == 0 {
            return None;
        }
        Some(text_prefix(&self.kept))
    }
}

/// The longest valid UTF-8 prefix of `bytes` (a cut may split a character), lossy beyond.
pub fn text_prefix(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(error) if error.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..error.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Normalised token usage from a response object's `usage` (chat, completions, embeddings,
/// responses).
pub fn usage_of(response: &Value) -> Option<TokenUsage> {
    let usage = response.get("usage").filter(|u| u.is_object())?;
    let number = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| usage.get(*k).and_then(Value::as_u64))
    };
    let nested = |outer: &[&str], inner: &str| {
        outer
            .iter()
            .find_map(|k| {
                usage
                    .get(*k)
                    .and_then(|d| d.get(inner))
                    .and_then(Value::as_u64)
            })
            .unwrap_or(0)
    };
    let prompt = number(&["prompt_tokens", "input_tokens"])?;
    let completion = number(&["completion_tokens", "output_tokens"]).unwrap_or(0);
    Some(TokenUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: number(&["total_tokens"]).unwrap_or(prompt + completion),
        cached_tokens: nested(
            &["prompt_tokens_details", "input_tokens_details"],
            "cached_tokens",
        ),
        reasoning_tokens: nested(
            &["completion_tokens_details", "output_tokens_details"],
            "reasoning_tokens",
        ),
        is_estimate: false,
    })
}

/// The prompt part of a request body, as JSON text, for `RequestMessages`.
pub fn request_messages(operation: OperationId, body: &Value) -> Option<String> {
    let field = match operation {
        OperationId::ChatCompletionsCreate => "messages",
        OperationId::CompletionsCreate | OperationId::ImageGenerationsCreate => "prompt",
        OperationId::EmbeddingsCreate | OperationId::CreateResponse | OperationId::SpeechCreate => {
            "input"
        }
        _ => return None,
    };
    body.get(field).map(Value::to_string)
}

/// The completion part of a response object, as JSON text, for `ResponseMessages`.
pub fn response_messages(response: &Value) -> Option<String> {
    if let Some(output) = response.get("output").filter(|o| o.is_array()) {
        return Some(output.to_string());
    }
    let choices = response.get("choices")?.as_array()?;
    let messages: Vec<Value> = choices
        .iter()
        .filter_map(|c| c.get("message").cloned().or_else(|| c.get("text").cloned()))
        .collect();
    (!messages.is_empty()).then(|| Value::Array(messages).to_string())
}

/// Interprets an SSE response as it passes, and reassembles the answer.
pub struct SseTap {
    input: mpsc::UnboundedSender<Result<Bytes, Infallible>>,
    events: EventStream<mpsc::UnboundedReceiver<Result<Bytes, Infallible>>>,
    assembler: StreamAssembler,
}

impl std::fmt::Debug for SseTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseTap").finish_non_exhaustive()
    }
}

impl Default for SseTap {
    fn default() -> Self {
        let (input, output) = mpsc::unbounded();
        SseTap {
            input,
            events: output.eventsource(),
            assembler: StreamAssembler::default(),
        }
    }
}

impl SseTap {
    /// Feeds the next chunk of the stream as received.
    pub fn feed(&mut self, chunk: &Bytes) {
        // The receiver lives in `self`, so the send cannot fail.
        let _ = self.input.unbounded_send(Ok(chunk.clone()));
        self.drain();
    }

    /// Ends the stream and returns the reassembled answer.
    pub fn finish(mut self) -> StreamSummary {
        self.input.close_channel();
        self.drain();
        self.assembler.finish()
    }

    fn drain(&mut self) {
        // Every chunk is already queued, so the event stream is ready or needs more input.
        while let Some(Some(item)) = self.events.next().now_or_never() {
            match item {
                Ok(event) => self.assembler.event(&event.data),
                Err(error) => {
                    tracing::debug!(%error, "unparseable server-sent event skipped");
                }
            }
        }
    }
}

/// What a streamed answer amounted to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSummary {
    /// The answer as one non-streamed response object (`chat.completion`, `text_completion`, or a
    /// Responses API `response`), when the stream was recognised.
    pub response: Option<Value>,
    /// Usage from the usage chunk or `response.completed`.
    pub usage: Option<TokenUsage>,
    /// Model that answered.
    pub model: Option<String>,
    /// Whether `data: [DONE]` (or a terminal Responses event) arrived.
    pub completed: bool,
}

#[derive(Debug, Default)]
struct ChoiceSoFar {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    text: Option<String>,
    tool_calls: BTreeMap<u64, Map<String, Value>>,
    finish_reason: Value,
}

#[derive(Debug, Default)]
struct StreamAssembler {
    object: Option<String>,
    head: Map<String, Value>,
    choices: BTreeMap<u64, ChoiceSoFar>,
    usage: Option<Value>,
    final_response: Option<Value>,
    done: bool,
}

impl StreamAssembler {
    fn event(&mut self, data: &str) {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return;
        };
        // Responses API: typed events; the terminal one carries the whole response.
        if let Some(kind) = chunk.get("type").and_then(Value::as_str) {
            if matches!(
                kind,
                "response.completed" | "response.incomplete" | "response.failed"
            ) {
                self.final_response = chunk.get("response").cloned();
                self.done = true;
            }
            return;
        }
        if let Some(object) = chunk
            .get("object")
            .and_then(Value::as_str)
            .filter(|o| !o.is_empty())
        {
            self.object.get_or_insert_with(|| object.to_owned());
        }
        for key in ["id", "created", "model", "system_fingerprint"] {
            if let Some(value) = chunk.get(key).filter(|v| !is_blank(v)) {
                self.head
                    .entry(key.to_owned())
                    .or_insert_with(|| value.clone());
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        // Azure's first event has empty choices; parsers must not assume `choices[0]` exists.
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        for choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let so_far = self.choices.entry(index).or_default();
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                so_far.finish_reason = reason.clone();
            }
            if let Some(text) = choice.get("text").and_then(Value::as_str) {
                so_far.text.get_or_insert_with(String::new).push_str(text);
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                so_far.role = Some(role.to_owned());
            }
            if let Some(content) = delta.get("content").and_then(Value::as_str) {
                so_far
                    .content
                    .get_or_insert_with(String::new)
                    .push_str(content);
            }
            if let Some(refusal) = delta.get("refusal").and_then(Value::as_str) {
                so_far
                    .refusal
                    .get_or_insert_with(String::new)
                    .push_str(refusal);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let call_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let entry = so_far.tool_calls.entry(call_index).or_default();
                for key in ["id", "type"] {
                    if let Some(value) = call.get(key).filter(|v| !v.is_null()) {
                        entry.insert(key.to_owned(), value.clone());
                    }
                }
                if let Some(function) = call.get("function") {
                    let target = entry
                        .entry("function".to_owned())
                        .or_insert_with(|| json!({"name": "", "arguments": ""}));
                    for key in ["name", "arguments"] {
                        if let Some(part) = function.get(key).and_then(Value::as_str) {
                            if let Some(Value::String(existing)) = target.get_mut(key) {
                                existing.push_str(part);
                            }
                        }
                    }
                }
            }
        }
    }

    fn finish(self) -> StreamSummary {
        if let Some(response) = self.final_response {
            return StreamSummary {
                usage: usage_of(&response),
                model: response
                    .get("model")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                response: Some(response),
                completed: self.done,
            };
        }
        let Some(object) = self.object else {
            return StreamSummary {
                completed: self.done,
                ..StreamSummary::default()
            };
        };
        let is_text = object == "text_completion";
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, choice)| {
                if is_text {
                    json!({"index": index, "text": choice.text.unwrap_or_default(), "finish_reason": choice.finish_reason})
                } else {
                    let mut message = Map::new();
                    message.insert("role".to_owned(), json!(choice.role.unwrap_or_else(|| "assistant".to_owned())));
                    message.insert("content".to_owned(), choice.content.map_or(Value::Null, Value::String));
                    if let Some(refusal) = choice.refusal {
                        message.insert("refusal".to_owned(), Value::String(refusal));
                    }
                    if !choice.tool_calls.is_empty() {
                        let calls = choice.tool_calls.into_values().map(Value::Object).collect();
                        message.insert("tool_calls".to_owned(), Value::Array(calls));
                    }
                    json!({"index": index, "message": message, "finish_reason": choice.finish_reason})
                }
            })
            .collect();
        let mut response = self.head;
        response.insert(
            "object".to_owned(),
            json!(if is_text {
                "text_completion"
            } else {
                "chat.completion"
            }),
        );
        response.insert("choices".to_owned(), Value::Array(choices));
        if let Some(usage) = self.usage {
            response.insert("usage".to_owned(), usage);
        }
        let response = Value::Object(response);
        StreamSummary {
            usage: usage_of(&response),
            model: response
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned),
            response: Some(response),
            completed: self.done,
        }
    }
}

fn is_blank(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_u64() == Some(0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/azure/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Feeds a fixture in awkward 7-byte pieces, as a network might split it.
    fn tap(bytes: &[u8]) -> StreamSummary {
        let mut tap = SseTap::default();
        for piece in bytes.chunks(7) {
            tap.feed(&Bytes::copy_from_slice(piece));
        }
        tap.finish()
    }

    #[test]
    fn azure_stream_with_usage_is_reassembled() {
        let summary = tap(&fixture("chat-stream-include-usage.sse"));
        let response = summary.response.unwrap();
        assert_eq!(response["object"], "chat.completion");
        assert_eq!(response["id"], "chatcmpl-AZ1f1example");
        assert_eq!(response["model"], "gpt-4o-2024-08-06");
        assert_eq!(
            response["choices"][0]["message"]["content"],
            "The quarterly report is due on Friday."
        );
        assert_eq!(response["choices"][0]["finish_reason"], "stop");
        let usage = summary.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (27, 9, 36)
        );
        assert!(summary.completed);
    }

    #[test]
    fn stream_without_usage_has_text_but_no_usage() {
        let summary = tap(&fixture("chat-stream-no-usage.sse"));
        assert_eq!(
            summary.response.unwrap()["choices"][0]["message"]["content"],
            "The quarterly report is due on Friday."
        );
        assert_eq!(summary.usage, None);
    }

    #[test]
    fn content_filtered_stream_keeps_the_finish_reason() {
        let summary = tap(&fixture("chat-stream-content-filtered.sse"));
        assert_eq!(
            summary.response.unwrap()["choices"][0]["finish_reason"],
            "content_filter"
        );
    }

    #[test]
    fn responses_stream_takes_the_completed_response() {
        let summary = tap(&fixture("responses-stream.sse"));
        assert!(summary.completed);
        let usage = summary.usage.unwrap();
        assert!(usage.prompt_tokens > 0 && usage.total_tokens >= usage.prompt_tokens);
        assert!(summary.response.unwrap().get("output").is_some());
    }

    #[test]
    fn usage_is_normalised_across_shapes() {
        let chat: Value = serde_json::from_slice(&fixture("chat-completion.json")).unwrap();
        let usage = usage_of(&chat).unwrap();
        assert!(usage.total_tokens > 0 && !usage.is_estimate);
        let embeddings: Value = serde_json::from_slice(&fixture("embeddings.json")).unwrap();
        let usage = usage_of(&embeddings).unwrap();
        assert_eq!(usage.completion_tokens, 0);
        assert_eq!(usage.total_tokens, usage.prompt_tokens);
    }

    #[test]
    fn tool_call_arguments_are_concatenated() {
        let stream = concat!(
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Oslo\\\"}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let response = tap(stream.as_bytes()).response.unwrap();
        let call = &response["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
    }

    #[test]
    fn capture_cuts_at_the_limit_on_a_character_boundary() {
        let mut capture = BodyCapture::new(5);
        capture.push("héllo wörld".as_bytes());
        assert!(capture.truncated());
        assert_eq!(capture.into_text().unwrap(), "héll");
        assert_eq!(BodyCapture::new(0).into_text(), None);
    }
}
