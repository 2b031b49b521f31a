//! Step 9: what the call said — bodies up to a limit, the streamed completion reassembled, usage.
//!
//! The capture is a tee: chunks are forwarded first and copied second, and nothing here holds a
//! chunk back from the client. SSE is framed by `eventsource-stream`; this module only interprets
//! the events (`azure-specs.md` §1.6, §1.7).
//!
//! One exception: when the gateway itself asked a stream for its usage chunk
//! (`stream_options.include_usage`, see [`crate::proxy`]), [`SseTap::removing_usage`] passes the
//! stream on event by event and leaves that chunk out, so the client reads what it would have read
//! without the gateway.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;

use bytes::Bytes;
use eventsource_stream::{Event, EventStream, Eventsource};
use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use serde_json::{Map, Value, json};

use crate::classify::Call;

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

/// The prompt part of a call's JSON body, as JSON text, for `RequestMessages`: the member that
/// holds it, as the client wrote it less the whitespace between tokens, read without parsing the
/// body into a tree ([`crate::peek::member_json`]) unless only the tree can judge the body.
pub fn request_messages(call: &Call) -> Option<String> {
    let field = match call.operation {
        OperationId::ChatCompletionsCreate => "messages",
        OperationId::CompletionsCreate | OperationId::ImageGenerationsCreate => "prompt",
        OperationId::EmbeddingsCreate | OperationId::CreateResponse | OperationId::SpeechCreate => {
            "input"
        }
        _ => return None,
    };
    match crate::peek::member_json(call.json_bytes()?, field) {
        Some(member) => member,
        None => call.json()?.get(field).map(Value::to_string),
    }
}

/// The completion part of a response object, as JSON text, for `ResponseMessages` (of a streamed
/// answer, reassembled; a non-streamed one is read without the tree, see
/// [`crate::peek::ResponsePeek::read_with_messages`]).
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
    /// Set when the tap rewrites the stream for the client.
    filter: Option<UsageFilter>,
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
            filter: None,
        }
    }
}

impl SseTap {
    /// A tap for a stream whose usage chunk the gateway asked for: [`SseTap::pass`] leaves out the
    /// chunk with `"choices": []` and a `usage` object, and drops a top-level `"usage": null`
    /// from the other chunks (OpenAI adds it to every chunk when the option is on; Azure does
    /// not), so the client reads what the backend would have sent without the option.
    pub fn removing_usage() -> SseTap {
        SseTap {
            filter: Some(UsageFilter::default()),
            ..SseTap::default()
        }
    }

    /// Feeds the next chunk of the stream as received.
    pub fn feed(&mut self, chunk: &Bytes) {
        // The receiver lives in `self`, so the send cannot fail.
        let _ = self.input.unbounded_send(Ok(chunk.clone()));
        self.drain();
    }

    /// Feeds the next chunk and returns what of it goes on to the client: the chunk itself, or
    /// for a [`SseTap::removing_usage`] tap the events it completed that pass, each written again
    /// as `data: …` lines (with its `event:`, `id:` and `retry:` fields) — `None` when nothing is
    /// to be sent yet.
    pub fn pass(&mut self, chunk: Bytes) -> Option<Bytes> {
        self.feed(&chunk);
        match &mut self.filter {
            None => Some(chunk),
            Some(filter) if filter.out.is_empty() => None,
            Some(filter) => Some(Bytes::from(std::mem::take(&mut filter.out))),
        }
    }

    /// The id of the object the stream has just announced it created, once: a Responses API
    /// `response.created` event's response, or the thread of an Assistants stream that creates
    /// one (its first `thread` object).
    pub fn take_created(&mut self) -> Option<String> {
        self.assembler.created.take()
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
                Ok(event) => {
                    let chunk = self.assembler.event(&event.data);
                    if let Some(filter) = &mut self.filter {
                        filter.event(&event, chunk.as_ref());
                    }
                }
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
    /// An object the stream announced it created, until taken ([`SseTap::take_created`]).
    created: Option<String>,
    /// Whether `created` was set once already.
    announced: bool,
}

impl StreamAssembler {
    /// Notes the first created object's id the stream names.
    fn announce(&mut self, id: Option<&Value>) {
        if self.announced {
            return;
        }
        if let Some(id) = id.and_then(Value::as_str).filter(|id| !id.is_empty()) {
            self.created = Some(id.to_owned());
            self.announced = true;
        }
    }

    /// Takes in one event's data; returns it parsed, when it is JSON.
    fn event(&mut self, data: &str) -> Option<Value> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return None;
        }
        let chunk = serde_json::from_str::<Value>(data).ok()?;
        self.chunk(&chunk);
        Some(chunk)
    }

    fn chunk(&mut self, chunk: &Value) {
        // Responses API: typed events; the terminal one carries the whole response.
        if let Some(kind) = chunk.get("type").and_then(Value::as_str) {
            if kind == "response.created" {
                self.announce(chunk.pointer("/response/id"));
            }
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
            // Assistants: `thread.created` carries the new thread.
            if object == "thread" {
                self.announce(chunk.get("id"));
            }
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
                        if let Some(part) = function.get(key).and_then(Value::as_str)
                            && let Some(Value::String(existing)) = target.get_mut(key)
                        {
                            existing.push_str(part);
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

/// Rewrites a stream for the client without the usage the gateway asked for.
#[derive(Debug, Default)]
struct UsageFilter {
    /// What goes to the client next.
    out: Vec<u8>,
    /// The last event id written out (the SSE last-event-id carries over between events).
    last_id: String,
}

impl UsageFilter {
    fn event(&mut self, event: &Event, chunk: Option<&Value>) {
        let mut data = Cow::Borrowed(event.data.as_str());
        if let Some(chunk) = chunk {
            if is_usage_chunk(chunk) {
                return;
            }
            if chunk.get("usage").is_some_and(Value::is_null) {
                data = without_null_usage(&event.data, chunk);
            }
        }
        let mut text = String::with_capacity(data.len() + 16);
        if event.event != "message" {
            let _ = writeln!(text, "event: {}", event.event);
        }
        if event.id != self.last_id {
            let _ = writeln!(text, "id: {}", event.id);
            self.last_id.clone_from(&event.id);
        }
        if let Some(retry) = event.retry {
            let _ = writeln!(text, "retry: {}", retry.as_millis());
        }
        for line in data.split('\n') {
            let _ = writeln!(text, "data: {line}");
        }
        text.push('\n');
        self.out.extend_from_slice(text.as_bytes());
    }
}

/// The chunk `stream_options.include_usage` adds: no choices, a usage object.
pub fn is_usage_chunk(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(Value::is_object)
}

/// The event's data without its top-level `"usage": null` member, the rest byte for byte; the data
/// unchanged when that member cannot be told apart (the cut is checked by parsing the result).
fn without_null_usage<'a>(data: &'a str, chunk: &Value) -> Cow<'a, str> {
    // Inside a JSON string every `"` is escaped, so an unescaped `"usage"` followed by `:` is a key.
    let mut found = None;
    for (start, key) in data.match_indices("\"usage\"") {
        let rest = &data[start + key.len()..];
        let after_colon = rest.trim_start().strip_prefix(':').map(str::trim_start);
        if let Some(tail) = after_colon.and_then(|r| r.strip_prefix("null")) {
            if found.is_some() {
                return Cow::Borrowed(data);
            }
            found = Some((start, data.len() - tail.len()));
        }
    }
    let Some((start, end)) = found else {
        return Cow::Borrowed(data);
    };
    let before = data[..start].trim_end();
    let after = data[end..].trim_start();
    let stripped = if let Some(before) = before.strip_suffix(',') {
        // `…, "usage": null}` → `…}`
        format!("{before}{}", &data[end..])
    } else if let Some(after) = after.strip_prefix(',') {
        // `{"usage": null, …` → `{…`
        format!("{}{after}", &data[..start])
    } else {
        format!("{}{}", &data[..start], &data[end..])
    };
    let mut expected = chunk.clone();
    if let Some(object) = expected.as_object_mut() {
        object.remove("usage");
    }
    match serde_json::from_str::<Value>(&stripped) {
        Ok(parsed) if parsed == expected => Cow::Owned(stripped),
        _ => Cow::Borrowed(data),
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

    /// Feeds a stream through a usage-removing tap in awkward pieces; returns what the client got.
    fn filtered(bytes: &[u8], piece: usize) -> (Vec<u8>, StreamSummary) {
        let mut tap = SseTap::removing_usage();
        let mut client = Vec::new();
        for piece in bytes.chunks(piece) {
            if let Some(out) = tap.pass(Bytes::copy_from_slice(piece)) {
                assert!(!out.is_empty());
                client.extend_from_slice(&out);
            }
        }
        (client, tap.finish())
    }

    #[test]
    fn the_asked_for_usage_chunk_is_removed_and_read() {
        let without = fixture("chat-stream-no-usage.sse");
        for piece in [1, 7, 64, 100_000] {
            let (client, summary) = filtered(&fixture("chat-stream-include-usage.sse"), piece);
            assert_eq!(
                String::from_utf8(client).unwrap(),
                String::from_utf8(without.clone()).unwrap(),
                "pieces of {piece}"
            );
            let usage = summary.usage.unwrap();
            assert_eq!((usage.prompt_tokens, usage.total_tokens), (27, 36));
            assert!(!usage.is_estimate);
        }
    }

    #[test]
    fn a_stream_without_a_usage_chunk_passes_unchanged() {
        let stream = fixture("chat-stream-content-filtered.sse");
        let (client, summary) = filtered(&stream, 13);
        assert_eq!(client, stream);
        assert_eq!(summary.usage, None);
    }

    #[test]
    fn a_plain_tap_passes_chunks_as_they_are() {
        let mut tap = SseTap::default();
        let chunk =
            Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n");
        assert_eq!(tap.pass(chunk.clone()), Some(chunk));
        assert!(tap.pass(Bytes::from_static(b"data: [DO")).is_some());
    }

    #[test]
    fn openai_framing_loses_its_null_usage_and_keeps_everything_else() {
        // OpenAI with include_usage: every chunk carries `"usage":null`, then the usage chunk.
        let with = concat!(
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"say \\\"usage\\\":null\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":4,\"total_tokens\":16}}\n\n",
            "data: [DONE]\n\n",
        );
        let without = concat!(
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"say \\\"usage\\\":null\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let (client, summary) = filtered(with.as_bytes(), 5);
        assert_eq!(String::from_utf8(client).unwrap(), without);
        assert_eq!(summary.usage.unwrap().total_tokens, 16);
    }

    #[test]
    fn null_usage_is_cut_only_where_it_is_unambiguous() {
        let cut = |data: &str| {
            let chunk: Value = serde_json::from_str(data).unwrap();
            without_null_usage(data, &chunk).into_owned()
        };
        assert_eq!(cut(r#"{"a":1,"usage":null}"#), r#"{"a":1}"#);
        assert_eq!(cut(r#"{"usage":null,"a":1}"#), r#"{"a":1}"#);
        assert_eq!(
            cut(r#"{"a": 1, "usage": null, "b": 2}"#),
            r#"{"a": 1, "b": 2}"#
        );
        assert_eq!(cut(r#"{"usage":null}"#), "{}");
        // A nested `usage: null` too: which one is top-level is not told apart, so nothing is cut.
        let nested = r#"{"x":{"usage":null},"usage":null}"#;
        assert_eq!(cut(nested), nested);
        // Text that only looks like the key stays.
        assert_eq!(
            cut(r#"{"t":"\"usage\":null","usage":null}"#),
            r#"{"t":"\"usage\":null"}"#
        );
    }

    #[test]
    fn named_events_and_ids_survive_the_rewrite() {
        let stream = "event: thread.message.delta\nid: 7\ndata: {\"a\":1}\n\ndata: {\"b\":2}\n\nretry: 500\ndata: x\ndata: y\n\n";
        let (client, _) = filtered(stream.as_bytes(), 3);
        assert_eq!(
            String::from_utf8(client).unwrap(),
            "event: thread.message.delta\nid: 7\ndata: {\"a\":1}\n\ndata: {\"b\":2}\n\nretry: 500\ndata: x\ndata: y\n\n"
        );
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
