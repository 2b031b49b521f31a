//! Step 9: what the call said — bodies up to a limit, the streamed completion reassembled, usage.
//!
//! The capture is a tee: chunks are forwarded first and copied second, and nothing here holds a
//! chunk back from the client. SSE is framed here, line by line as the HTML specification frames
//! it (lines end in LF, CRLF or CR; `:` opens a comment; a blank line ends an event), and the
//! events interpreted (`azure-specs.md` §1.6, §1.7). The framing is this module's own because the
//! filter below must pass every byte it does not remove exactly as it came, comments and events
//! without data included: `eventsource-stream`, used before, gives parsed events only (it drops
//! comments and data-less events, and cannot say which bytes an event was), and panicked on a
//! stream opening with a byte order mark.
//!
//! One exception: when the gateway itself asked a stream for its usage chunk
//! (`stream_options.include_usage`, see [`crate::proxy`]), [`SseTap::removing_usage`] holds each
//! event's bytes until the event is complete and passes them on as they came, unless the event is
//! that chunk, so the client reads what it would have read without the gateway.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use serde_json::{Map, Value, json};

use crate::classify::Call;
use crate::run_stream::RunSoFar;

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
        // With a limit of 0 nothing is captured (metadata only), so nothing is cut either.
        if chunk.len() > room && self.limit > 0 {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// The most bytes kept.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether nothing was kept yet.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
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

/// `text` cut to at most `limit` bytes, at a character boundary: the messages of a record are
/// kept within the capture limit of the body they come from, whose truncation flag says that
/// they were cut (they are never longer than that body, so they are cut only with it).
pub fn within_limit(text: Option<String>, limit: usize) -> Option<String> {
    let mut text = text?;
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    Some(text)
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
        total_tokens: number(&["total_tokens"]).unwrap_or(prompt.saturating_add(completion)),
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
    // A form's prompt (an image edit's instruction, a transcription's hint), as a JSON string.
    if let Some(prompt) = &call.form_prompt {
        return serde_json::to_string(prompt).ok();
    }
    // The Assistants API's prompts: the messages a thread starts with, a run adds, or a message
    // posted to a thread, as a JSON array of messages.
    let messages_at = |pointer: &str| -> Option<String> {
        let messages = call.json()?.pointer(pointer)?;
        (messages.is_array() && !messages.as_array()?.is_empty()).then(|| messages.to_string())
    };
    match call.operation {
        OperationId::CreateThread => return messages_at("/messages"),
        OperationId::CreateThreadAndRun => return messages_at("/thread/messages"),
        OperationId::CreateRun => return messages_at("/additional_messages"),
        OperationId::CreateMessage => {
            let message = call.json()?;
            return message
                .get("content")
                .is_some()
                .then(|| Value::Array(vec![message.clone()]).to_string());
        }
        _ => {}
    }
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
    // A streamed Assistants run: the messages it wrote (see `crate::run_stream`).
    if response.get("object").and_then(Value::as_str) == Some("thread.run") {
        return response
            .get("messages")
            .and_then(Value::as_array)
            .filter(|messages| !messages.is_empty())
            .and_then(|messages| serde_json::to_string(messages).ok());
    }
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
#[derive(Default)]
pub struct SseTap {
    /// The line not yet ended, as it came.
    line: Vec<u8>,
    /// Whether the last line ended with a CR that closed a chunk: an LF opening the next chunk
    /// belongs to that line's end.
    after_cr: bool,
    /// Whether a line was read yet (the first may open with a byte order mark).
    started: bool,
    /// The event being read.
    event: EventSoFar,
    assembler: StreamAssembler,
    /// Set when the tap rewrites the stream for the client.
    filter: Option<UsageFilter>,
}

impl std::fmt::Debug for SseTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseTap").finish_non_exhaustive()
    }
}

/// The UTF-8 byte order mark, which a stream may open with.
const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

impl SseTap {
    /// A tap for a stream whose usage chunk the gateway asked for: [`SseTap::pass`] leaves out the
    /// event whose data is the chunk with `"choices": []` and a `usage` object, and drops a
    /// top-level `"usage": null` from the other chunks (OpenAI adds it to every chunk when the
    /// option is on; Azure does not), so the client reads what the backend would have sent
    /// without the option. Everything else — comments, events without data, line ends — passes
    /// byte for byte.
    pub fn removing_usage() -> SseTap {
        SseTap {
            filter: Some(UsageFilter::default()),
            ..SseTap::default()
        }
    }

    /// Feeds the next chunk of the stream as received.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some(after) = rest.strip_prefix(b"\n") {
                if let Some(filter) = &mut self.filter {
                    filter.line_end_continues();
                }
                rest = after;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let ending = match rest.get(end + 1) {
                _ if rest[end] == b'\n' => 1,
                Some(b'\n') => 2,
                Some(_) => 1,
                None => {
                    self.after_cr = true;
                    1
                }
            };
            self.line.extend_from_slice(&rest[..end + ending]);
            self.take_line(self.line.len() - ending);
            rest = &rest[end + ending..];
        }
        self.line.extend_from_slice(rest);
    }

    /// Feeds the next chunk and returns what of it goes on to the client: the chunk itself, or
    /// for a [`SseTap::removing_usage`] tap the bytes as they came of the lines it completed,
    /// less the usage the gateway asked for, with an event's lines held until the event is
    /// complete — `None` when nothing is to be sent yet (see [`SseTap::end`] for what is held at
    /// the end of the body).
    pub fn pass(&mut self, chunk: Bytes) -> Option<Bytes> {
        self.feed(&chunk);
        match &mut self.filter {
            None => Some(chunk),
            Some(filter) => filter.take_out(),
        }
    }

    /// The body is over: takes in the last line and event, though unterminated, and returns
    /// what a [`SseTap::removing_usage`] tap still held for the client, as it came (less the
    /// usage chunk, should that be the last event) — `None` when nothing was held.
    pub fn end(&mut self) -> Option<Bytes> {
        self.after_cr = false;
        if !self.line.is_empty() {
            self.take_line(self.line.len());
        }
        if self.event.has_fields {
            self.dispatch(&[]);
        }
        self.filter.as_mut().and_then(UsageFilter::take_out)
    }

    /// The id of the object the stream has just announced it created, once: a Responses API
    /// `response.created` event's response, the thread of an Assistants stream that creates one
    /// (its first `thread` object), or a chat completion's (its first chunk's `id`).
    pub fn take_created(&mut self) -> Option<String> {
        self.assembler.created.take()
    }

    /// Whether the stream has said it is over (`[DONE]`, a Responses API terminal event, a typed
    /// `*.done` event, an image stream's `image_generation.completed` or `image_edit.completed`):
    /// whatever comes after it carries no more of the answer. It is read from the member's side:
    /// bytes the tap saw may still have failed to reach a client that left.
    pub fn ended(&self) -> bool {
        self.assembler.done
    }

    /// Whether an event the tap has read carried generated output: a chat chunk whose delta has
    /// content, a refusal, reasoning, a tool call or audio (not Azure's opening prompt-filter
    /// event, nor a chunk that only names the role), a completion's text, a typed `…delta`
    /// event with something in it (Responses API, transcriptions), an image stream's partial or
    /// final image, or an Assistants message delta. An event's output counts once the event is
    /// whole (its blank line read).
    pub fn output_started(&self) -> bool {
        self.assembler.output_seen
    }

    /// Whether the stream so far is one the tap reassembles into a response object (chat,
    /// completions, Responses, an Assistants run): once it is, [`SseTap::finish`] gives one.
    pub fn recognised(&self) -> bool {
        self.assembler.recognised()
    }

    /// Ends the stream and returns the reassembled answer; what [`SseTap::end`] would have
    /// returned, if it was not called, is not sent.
    pub fn finish(mut self) -> StreamSummary {
        let _ = self.end();
        self.assembler.finish()
    }

    /// Takes in `self.line`, whose first `content` bytes precede its line end.
    fn take_line(&mut self, content: usize) {
        let line = std::mem::take(&mut self.line);
        let mut text = &line[..content];
        if !std::mem::replace(&mut self.started, true) {
            text = text.strip_prefix(BYTE_ORDER_MARK).unwrap_or(text);
        }
        if text.is_empty() {
            self.dispatch(&line);
        } else if text.starts_with(b":") {
            // A comment: outside any event when no field came before it.
            if let Some(filter) = &mut self.filter {
                filter.line(&line, self.event.has_fields);
            }
        } else {
            let (name, value) = match text.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &text[colon + 1..];
                    (&text[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (text, &[][..]),
            };
            if name == b"data" {
                self.event.data_line(value, content, self.filter.as_ref());
            }
            self.event.has_fields = true;
            if let Some(filter) = &mut self.filter {
                filter.line(&line, true);
            }
        }
        self.line = line;
        self.line.clear();
    }

    /// Ends the event being read with the blank line `ending` (empty at the end of the body).
    fn dispatch(&mut self, ending: &[u8]) {
        let mut event = std::mem::take(&mut self.event);
        let chunk = if event.data.is_empty() {
            None
        } else {
            event.data.pop();
            self.assembler.event(&event.data)
        };
        if let Some(filter) = &mut self.filter {
            filter.event_end(&event, chunk.as_ref(), ending);
        }
    }
}

/// The event being read: what its fields said so far.
#[derive(Debug, Default)]
struct EventSoFar {
    /// Whether a field line came (`data`, `event`, `id`, `retry` or another): comment lines
    /// alone make no event.
    has_fields: bool,
    /// The data buffer: each `data` line's value followed by an LF.
    data: String,
    /// Where each `data` line's value is, in `data` and in the held bytes (a usage filter's).
    data_lines: Vec<DataLine>,
    /// Whether a `data` value was not UTF-8, so that `data` does not match the bytes.
    lossy: bool,
}

impl EventSoFar {
    /// Takes in a `data` line's `value`, which ends `content` bytes into its line.
    fn data_line(&mut self, value: &[u8], content: usize, filter: Option<&UsageFilter>) {
        if let Some(filter) = filter {
            self.data_lines.push(DataLine {
                in_data: self.data.len(),
                in_held: filter.held.len() + content - value.len(),
                len: value.len(),
            });
        }
        match std::str::from_utf8(value) {
            Ok(value) => self.data.push_str(value),
            Err(_) => {
                self.lossy = true;
                self.data.push_str(&String::from_utf8_lossy(value));
            }
        }
        self.data.push('\n');
    }
}

/// Where one `data` line's value is.
#[derive(Debug)]
struct DataLine {
    /// Its offset in the event's data.
    in_data: usize,
    /// Its offset in the event's held bytes.
    in_held: usize,
    /// Its length in bytes.
    len: usize,
}

/// What a streamed answer amounted to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSummary {
    /// The answer as one non-streamed response object (`chat.completion`, `text_completion`, a
    /// Responses API `response`, or an Assistants `thread.run` with the `messages` it wrote, see
    /// [`crate::run_stream`]), when the stream was recognised. A Responses stream cut before
    /// its final event gives the response rebuilt from its events, `"status": "incomplete"`.
    pub response: Option<Value>,
    /// Usage from the usage chunk or `response.completed`.
    pub usage: Option<TokenUsage>,
    /// Model that answered.
    pub model: Option<String>,
    /// Whether `data: [DONE]` (or another event that ends a stream, see [`SseTap::ended`])
    /// arrived.
    pub completed: bool,
    /// Whether the stream carried an error event (`data: {"error": …}`, a Responses API
    /// `error` event): the backend failed part way, although its HTTP status said 200.
    pub failed: bool,
}

impl StreamSummary {
    /// The summary of the reassembled `response`, with its usage and model.
    fn of(response: Value, completed: bool) -> StreamSummary {
        StreamSummary {
            usage: usage_of(&response),
            model: response
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned),
            response: Some(response),
            completed,
            failed: false,
        }
    }
}

#[derive(Debug, Default)]
struct ChoiceSoFar {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    text: Option<String>,
    tool_calls: BTreeMap<u64, Map<String, Value>>,
    /// A legacy `function_call`: `name` and `arguments`, each joined from its pieces.
    function_call: Option<Value>,
    /// Spoken output (`modalities: ["text", "audio"]`): `id`, `expires_at` and `transcript` as a
    /// non-streamed answer's `message.audio` has them, the transcript joined from its pieces
    /// (see [`join_audio`]).
    audio: Option<Map<String, Value>>,
    /// `logprobs`, each array in it joined across chunks.
    logprobs: Option<Map<String, Value>>,
    /// Whether `logprobs` were let go (see [`LOGPROBS_KEPT_BYTES`]).
    logprobs_dropped: bool,
    /// Azure's content filter verdicts, by category, joined across chunks (see
    /// [`join_filter_results`]).
    content_filter_results: Option<Map<String, Value>>,
    finish_reason: Value,
}

impl ChoiceSoFar {
    /// The choice as a non-streamed response has it: `text` for a `text_completion`, else a
    /// `message`.
    fn into_choice(self, index: u64, is_text: bool) -> Value {
        let mut choice = Map::new();
        choice.insert("index".to_owned(), json!(index));
        if is_text {
            choice.insert(
                "text".to_owned(),
                Value::String(self.text.unwrap_or_default()),
            );
        } else {
            let mut message = Map::new();
            message.insert(
                "role".to_owned(),
                Value::String(self.role.unwrap_or_else(|| "assistant".to_owned())),
            );
            message.insert(
                "content".to_owned(),
                self.content.map_or(Value::Null, Value::String),
            );
            if let Some(refusal) = self.refusal {
                message.insert("refusal".to_owned(), Value::String(refusal));
            }
            if !self.tool_calls.is_empty() {
                let calls = self.tool_calls.into_values().map(Value::Object).collect();
                message.insert("tool_calls".to_owned(), Value::Array(calls));
            }
            if let Some(function_call) = self.function_call {
                message.insert("function_call".to_owned(), function_call);
            }
            if let Some(audio) = self.audio {
                message.insert("audio".to_owned(), Value::Object(audio));
            }
            choice.insert("message".to_owned(), Value::Object(message));
        }
        if let Some(logprobs) = self.logprobs {
            choice.insert("logprobs".to_owned(), Value::Object(logprobs));
        }
        if let Some(results) = self.content_filter_results {
            choice.insert("content_filter_results".to_owned(), Value::Object(results));
        }
        choice.insert("finish_reason".to_owned(), self.finish_reason);
        Value::Object(choice)
    }
}

/// Adds a chunk's `content_filter_results` to those so far, category by category: a later
/// verdict replaces an earlier one, except that a category once `filtered` (or `detected`, for
/// jailbreak and protected material) stays so, so that the record names what stopped the answer
/// as a non-streamed answer's single verdict does.
fn join_filter_results(so_far: &mut Map<String, Value>, piece: &Map<String, Value>) {
    let flagged = |verdict: &Value| {
        ["filtered", "detected"]
            .iter()
            .any(|key| verdict.get(*key).and_then(Value::as_bool) == Some(true))
    };
    for (category, verdict) in piece {
        if so_far.get(category).is_some_and(flagged) {
            continue;
        }
        so_far.insert(category.clone(), verdict.clone());
    }
}

/// Appends a streamed function's `name` and `arguments` pieces to those so far.
fn join_function(so_far: &mut Value, piece: &Value) {
    for key in ["name", "arguments"] {
        if let Some(part) = piece.get(key).and_then(Value::as_str)
            && let Some(Value::String(existing)) = so_far.get_mut(key)
        {
            existing.push_str(part);
        }
    }
}

/// Adds a chunk's `delta.audio` to the spoken answer so far: `transcript` pieces are appended,
/// `id` and `expires_at` (the last chunk's only member) kept as they come. The audio itself
/// (`data`, base64 of the whole recording: some 64 KB a second of `pcm16`) is left out: it would
/// hold megabytes of the answer in memory and in the record, where its transcript says what the
/// model said.
fn join_audio(so_far: &mut Map<String, Value>, piece: &Map<String, Value>) {
    let transcript = so_far
        .entry("transcript".to_owned())
        .or_insert_with(|| Value::String(String::new()));
    if let (Value::String(text), Some(part)) =
        (transcript, piece.get("transcript").and_then(Value::as_str))
    {
        text.push_str(part);
    }
    for key in ["id", "expires_at"] {
        if let Some(value) = piece.get(key).filter(|v| !v.is_null()) {
            so_far.insert(key.to_owned(), value.clone());
        }
    }
}

/// Appends a chunk's `logprobs` members to those so far: arrays (chat's `content` and
/// `refusal`; completions' `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) are
/// concatenated in order, any other member kept from its first non-null value.
fn join_logprobs(so_far: &mut Map<String, Value>, piece: &Map<String, Value>) {
    for (key, value) in piece {
        match so_far.get_mut(key) {
            Some(Value::Array(items)) => {
                if let Value::Array(more) = value {
                    items.extend(more.iter().cloned());
                }
            }
            Some(existing) if existing.is_null() => existing.clone_from(value),
            Some(_) => {}
            None => {
                so_far.insert(key.clone(), value.clone());
            }
        }
    }
}

/// A Responses API stream so far, from its typed events, for a stream cut before its final event
/// (`response.completed`, `response.incomplete`, `response.failed`): the response as
/// `response.created` or `response.in_progress` announced it, and its output items. Like the chat
/// reassembly it keeps about one copy of the answer's text: an item's pieces are let go when the
/// item comes whole (`response.output_item.done`), and everything when the final event comes.
#[derive(Debug, Default)]
struct ResponseSoFar {
    /// The response object last announced, less its `output` (empty then).
    head: Option<Map<String, Value>>,
    /// Output items by `output_index`.
    items: BTreeMap<u64, ItemSoFar>,
}

/// One output item of a Responses API stream.
#[derive(Debug)]
enum ItemSoFar {
    /// The item whole, from `response.output_item.done`.
    Done(Value),
    /// The item still being streamed.
    Streaming(PartialItem),
}

/// An output item whose `response.output_item.done` has not come: the item as
/// `response.output_item.added` gave it, with its parts joined from their deltas.
#[derive(Debug, Default)]
struct PartialItem {
    /// The item's members (for a function call, `arguments` joined so far).
    item: Map<String, Value>,
    /// Content parts by `content_index`: `output_text` with its `text`, `refusal`.
    content: BTreeMap<u64, Map<String, Value>>,
    /// Reasoning summary parts by `summary_index`.
    summary: BTreeMap<u64, Map<String, Value>>,
}

impl PartialItem {
    /// The item as a response's `output` has it, marked incomplete.
    fn into_item(self) -> Value {
        let mut item = self.item;
        for (key, parts) in [("content", self.content), ("summary", self.summary)] {
            if !parts.is_empty() {
                let parts = parts.into_values().map(Value::Object).collect();
                item.insert(key.to_owned(), Value::Array(parts));
            }
        }
        item.insert("status".to_owned(), json!("incomplete"));
        Value::Object(item)
    }
}

impl ResponseSoFar {
    /// Takes in a typed event other than the final one.
    fn event(&mut self, kind: &str, event: &Value) {
        let text = |key: &str| event.get(key).and_then(Value::as_str);
        match kind {
            "response.created" | "response.queued" | "response.in_progress" => {
                if let Some(Value::Object(response)) = event.get("response") {
                    let head = response
                        .iter()
                        .filter(|(key, _)| *key != "output")
                        .map(|(key, value)| (key.clone(), value.clone()))
                        .collect();
                    self.head = Some(head);
                }
            }
            "response.output_item.added" => {
                if let Some(Value::Object(item)) = event.get("item") {
                    self.items.entry(output_index(event)).or_insert_with(|| {
                        ItemSoFar::Streaming(PartialItem {
                            item: item.clone(),
                            ..PartialItem::default()
                        })
                    });
                }
            }
            "response.output_item.done" => {
                if let Some(item) = event.get("item").filter(|item| item.is_object()) {
                    self.items
                        .insert(output_index(event), ItemSoFar::Done(item.clone()));
                }
            }
            "response.content_part.added" | "response.content_part.done" => {
                if let Some(Value::Object(part)) = event.get("part")
                    && let Some(item) = self.streaming(event, "message")
                {
                    let index = part_index(event, "content_index");
                    if kind.ends_with(".done") || !item.content.contains_key(&index) {
                        item.content.insert(index, part.clone());
                    }
                }
            }
            "response.output_text.delta"
            | "response.output_text.done"
            | "response.refusal.delta"
            | "response.refusal.done" => {
                let (part_type, key) = if kind.starts_with("response.refusal") {
                    ("refusal", "refusal")
                } else {
                    ("output_text", "text")
                };
                let piece = if kind.ends_with(".delta") {
                    text("delta").map(Piece::More)
                } else {
                    text(key).map(Piece::Whole)
                };
                if let Some(piece) = piece
                    && let Some(item) = self.streaming(event, "message")
                {
                    let part = item
                        .content
                        .entry(part_index(event, "content_index"))
                        .or_insert_with(|| Map::from_iter([("type".to_owned(), json!(part_type))]));
                    piece.write_into(part, key);
                }
            }
            "response.function_call_arguments.delta" | "response.function_call_arguments.done" => {
                let piece = if kind.ends_with(".delta") {
                    text("delta").map(Piece::More)
                } else {
                    text("arguments").map(Piece::Whole)
                };
                if let Some(piece) = piece
                    && let Some(item) = self.streaming(event, "function_call")
                {
                    piece.write_into(&mut item.item, "arguments");
                }
            }
            "response.reasoning_summary_part.added" | "response.reasoning_summary_part.done" => {
                if let Some(Value::Object(part)) = event.get("part")
                    && let Some(item) = self.streaming(event, "reasoning")
                {
                    let index = part_index(event, "summary_index");
                    if kind.ends_with(".done") || !item.summary.contains_key(&index) {
                        item.summary.insert(index, part.clone());
                    }
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_summary_text.done" => {
                let piece = if kind.ends_with(".delta") {
                    text("delta").map(Piece::More)
                } else {
                    text("text").map(Piece::Whole)
                };
                if let Some(piece) = piece
                    && let Some(item) = self.streaming(event, "reasoning")
                {
                    let part = item
                        .summary
                        .entry(part_index(event, "summary_index"))
                        .or_insert_with(|| {
                            Map::from_iter([("type".to_owned(), json!("summary_text"))])
                        });
                    piece.write_into(part, "text");
                }
            }
            _ => {}
        }
    }

    /// The item the event is about, while it is streamed (an item of type `item_type` when no
    /// `response.output_item.added` announced it); `None` once it came whole.
    fn streaming(&mut self, event: &Value, item_type: &str) -> Option<&mut PartialItem> {
        let item = self.items.entry(output_index(event)).or_insert_with(|| {
            let mut item = Map::new();
            item.insert("type".to_owned(), json!(item_type));
            if let Some(id) = event.get("item_id").filter(|id| id.is_string()) {
                item.insert("id".to_owned(), id.clone());
            }
            if item_type == "message" {
                item.insert("role".to_owned(), json!("assistant"));
            }
            ItemSoFar::Streaming(PartialItem {
                item,
                ..PartialItem::default()
            })
        });
        match item {
            ItemSoFar::Streaming(item) => Some(item),
            ItemSoFar::Done(_) => None,
        }
    }

    /// The response rebuilt from what came, marked `"status": "incomplete"`; `None` when no
    /// typed event of a response came.
    fn into_response(self) -> Option<Value> {
        if self.head.is_none() && self.items.is_empty() {
            return None;
        }
        let mut response = self
            .head
            .unwrap_or_else(|| Map::from_iter([("object".to_owned(), json!("response"))]));
        let output = self
            .items
            .into_values()
            .map(|item| match item {
                ItemSoFar::Done(item) => item,
                ItemSoFar::Streaming(item) => item.into_item(),
            })
            .collect();
        response.insert("status".to_owned(), json!("incomplete"));
        response.insert("output".to_owned(), Value::Array(output));
        Some(Value::Object(response))
    }
}

/// A streamed text's next piece, or the whole text (a `.done` event's).
enum Piece<'a> {
    /// The next piece, appended.
    More(&'a str),
    /// The whole text, which replaces the pieces.
    Whole(&'a str),
}

impl Piece<'_> {
    /// Writes the piece into `target`'s `key`.
    fn write_into(self, target: &mut Map<String, Value>, key: &str) {
        match (self, target.get_mut(key)) {
            (Piece::More(piece), Some(Value::String(so_far))) => so_far.push_str(piece),
            (Piece::More(text) | Piece::Whole(text), _) => {
                target.insert(key.to_owned(), Value::String(text.to_owned()));
            }
        }
    }
}

/// A Responses API event's `output_index`.
fn output_index(event: &Value) -> u64 {
    part_index(event, "output_index")
}

/// A Responses API event's index `key` (0 when absent).
fn part_index(event: &Value, key: &str) -> u64 {
    event.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The events that end an image generation or edit stream (gpt-image-1 with `"stream": true`):
/// the final image, after at most `partial_images` `*.partial_image` events. Only these two: they
/// end in `.completed`, not `.done`, and no other event of those streams does.
const IMAGE_STREAM_ENDS: [&str; 2] = ["image_generation.completed", "image_edit.completed"];

/// The most stream data (the events' `data`) whose `logprobs` a reassembled answer keeps.
/// Log probabilities weigh many times their token (`top_logprobs: 20` adds some twenty
/// alternatives with their bytes to each), so a long answer asked with them would otherwise be
/// held as a tree of hundreds of megabytes for the record; past this much data the reassembled
/// answer has none (and its content whole). 8 MiB of events is some 100,000 tokens without them.
const LOGPROBS_KEPT_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
struct StreamAssembler {
    /// The events' data taken in so far, in bytes.
    data_seen: usize,
    /// [`LOGPROBS_KEPT_BYTES`], unless a test sets another.
    logprobs_kept_bytes: Option<usize>,
    object: Option<String>,
    head: Map<String, Value>,
    choices: BTreeMap<u64, ChoiceSoFar>,
    usage: Option<Value>,
    final_response: Option<Value>,
    /// A Responses API stream so far, for when its final event does not come.
    response_so_far: ResponseSoFar,
    /// An Assistants run's stream so far.
    run: RunSoFar,
    done: bool,
    /// An object the stream announced it created, until taken ([`SseTap::take_created`]).
    created: Option<String>,
    /// The error an error event carried (its `error` object, or a Responses `error` event).
    error: Option<Value>,
    /// Whether `created` was set once already.
    announced: bool,
    /// Whether an event carried generated output (see [`SseTap::output_started`]).
    output_seen: bool,
}

impl StreamAssembler {
    /// Whether [`StreamAssembler::finish`] will give a response object.
    fn recognised(&self) -> bool {
        self.object.is_some()
            || self.final_response.is_some()
            || self.response_so_far.head.is_some()
            || !self.response_so_far.items.is_empty()
            || !self.run.is_empty()
    }

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
        self.data_seen = self.data_seen.saturating_add(data.len());
        let chunk = serde_json::from_str::<Value>(data).ok()?;
        self.chunk(&chunk);
        Some(chunk)
    }

    fn chunk(&mut self, chunk: &Value) {
        // Assistants runs: the objects of `thread.run.*` and `thread.message.*` events (a run
        // step has a `type` of its own, so this comes before the typed events).
        if let Some(object) = chunk
            .get("object")
            .and_then(Value::as_str)
            .filter(|object| object.starts_with("thread."))
        {
            // A message's text or a run step's tool call, as the run writes them.
            if object == "thread.message.delta" || object == "thread.run.step.delta" {
                self.output_seen = true;
            }
            self.run.event(object, chunk);
            return;
        }
        // Responses API: typed events; the terminal one carries the whole response.
        if let Some(kind) = chunk.get("type").and_then(Value::as_str) {
            if !self.output_seen && carries_output(kind, chunk) {
                self.output_seen = true;
            }
            // A response made with `"store": false` is kept nowhere: nothing to pin.
            if kind == "response.created"
                && chunk.pointer("/response/store").and_then(Value::as_bool) != Some(false)
            {
                self.announce(chunk.pointer("/response/id"));
            }
            if matches!(
                kind,
                "response.completed" | "response.incomplete" | "response.failed"
            ) {
                self.final_response = chunk.get("response").cloned();
                self.response_so_far = ResponseSoFar::default();
                self.done = true;
            } else if kind.starts_with("response.") {
                if self.final_response.is_none() {
                    self.response_so_far.event(kind, chunk);
                }
            } else if kind == "error" {
                // A Responses API stream's error event: `{"type": "error", "code", "message", …}`.
                self.error = Some(chunk.clone());
            } else {
                // Other typed streams (a transcription's `transcript.text.done`, speech's
                // `speech.audio.done`, an image's `image_generation.completed`) carry the call's
                // usage on their last event: without it the call would count no tokens against
                // its limits.
                if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
                    self.usage = Some(usage.clone());
                }
                if kind.ends_with(".done") || IMAGE_STREAM_ENDS.contains(&kind) {
                    self.done = true;
                }
            }
            return;
        }
        // A failure part way, as OpenAI-style streams send it: `data: {"error": {…}}`.
        if let Some(error) = chunk.get("error").filter(|error| error.is_object())
            && chunk.get("choices").is_none()
        {
            self.error = Some(error.clone());
            return;
        }
        if let Some(object) = chunk
            .get("object")
            .and_then(Value::as_str)
            .filter(|o| !o.is_empty())
        {
            // Assistants: `thread.created` carries the new thread; the run's events follow
            // (a stream cut before them is kept as it came, not taken for a chat completion).
            if object == "thread" {
                self.announce(chunk.get("id"));
                return;
            }
            // A chat completion made with `"store": true` is kept under its chunks' `id` (the
            // relay pins it only for such a call).
            if object == "chat.completion.chunk" {
                self.announce(chunk.get("id"));
            }
            self.object.get_or_insert_with(|| object.to_owned());
        }
        // Azure's first event carries the prompt's filter verdicts (a non-streamed answer has
        // them at its top level too).
        for key in [
            "id",
            "created",
            "model",
            "system_fingerprint",
            "prompt_filter_results",
        ] {
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
        let keeps_logprobs =
            self.data_seen <= self.logprobs_kept_bytes.unwrap_or(LOGPROBS_KEPT_BYTES);
        for choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let so_far = self.choices.entry(index).or_default();
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                so_far.finish_reason = reason.clone();
            }
            if let Some(text) = choice.get("text").and_then(Value::as_str) {
                self.output_seen |= !text.is_empty();
                so_far.text.get_or_insert_with(String::new).push_str(text);
            }
            if let Some(Value::Object(logprobs)) = choice.get("logprobs") {
                if !keeps_logprobs {
                    so_far.logprobs = None;
                    so_far.logprobs_dropped = true;
                } else if !so_far.logprobs_dropped {
                    join_logprobs(so_far.logprobs.get_or_insert_with(Map::new), logprobs);
                }
            }
            if let Some(Value::Object(results)) = choice.get("content_filter_results")
                && !results.is_empty()
            {
                join_filter_results(
                    so_far.content_filter_results.get_or_insert_with(Map::new),
                    results,
                );
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if !self.output_seen && delta_carries_output(delta) {
                self.output_seen = true;
            }
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
                    join_function(target, function);
                }
            }
            if let Some(function) = delta.get("function_call").filter(|f| f.is_object()) {
                let target = so_far
                    .function_call
                    .get_or_insert_with(|| json!({"name": "", "arguments": ""}));
                join_function(target, function);
            }
            if let Some(Value::Object(audio)) = delta.get("audio") {
                join_audio(so_far.audio.get_or_insert_with(Map::new), audio);
            }
        }
    }

    fn finish(mut self) -> StreamSummary {
        let error = self.error.take();
        let mut summary = self.finish_answer();
        if let Some(error) = error {
            // The answer as it stood, with the error that ended it, as a non-streamed error's
            // body has it.
            if let Some(Value::Object(response)) = summary.response.as_mut() {
                response.insert("error".to_owned(), error);
            }
            summary.failed = true;
        }
        // A stream that ends with the model's work failed: a Responses API `response.failed`
        // (`"status": "failed"`, its `error`), an Assistants run `failed` or `expired`.
        let status = |object: &str| {
            summary
                .response
                .as_ref()
                .filter(|response| response.get("object").and_then(Value::as_str) == Some(object))
                .and_then(|response| response.get("status"))
                .and_then(Value::as_str)
        };
        if status("response") == Some("failed")
            || matches!(status("thread.run"), Some("failed" | "expired"))
        {
            summary.failed = true;
        }
        summary
    }

    /// The answer the stream amounted to, its error aside.
    fn finish_answer(self) -> StreamSummary {
        if let Some(response) = self
            .final_response
            .or_else(|| self.response_so_far.into_response())
        {
            return StreamSummary::of(response, self.done);
        }
        if !self.run.is_empty() {
            return StreamSummary::of(self.run.into_response(), self.done);
        }
        let Some(object) = self.object else {
            return StreamSummary {
                usage: self
                    .usage
                    .and_then(|usage| usage_of(&json!({ "usage": usage }))),
                completed: self.done,
                ..StreamSummary::default()
            };
        };
        let is_text = object == "text_completion";
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, choice)| choice.into_choice(index, is_text))
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
        StreamSummary::of(Value::Object(response), self.done)
    }
}

/// Rewrites a stream for the client without the usage the gateway asked for.
#[derive(Debug, Default)]
struct UsageFilter {
    /// What goes to the client next.
    out: Vec<u8>,
    /// The event being read, as it came from its first field line on, until it is complete.
    held: Vec<u8>,
    /// Whether the last line was left out (with the usage chunk's event).
    last_line_dropped: bool,
}

impl UsageFilter {
    /// Takes a comment or field line: held with the event it is part of, else sent.
    fn line(&mut self, line: &[u8], in_event: bool) {
        if in_event {
            self.held.extend_from_slice(line);
        } else {
            self.out.extend_from_slice(line);
        }
        self.last_line_dropped = false;
    }

    /// An LF completes the last line's CR line end: it goes where that line went.
    fn line_end_continues(&mut self) {
        if self.last_line_dropped {
            return;
        }
        // The last line is the held event's last, when one is held, else the last sent.
        if self.held.is_empty() {
            self.out.push(b'\n');
        } else {
            self.held.push(b'\n');
        }
    }

    /// The event is complete with the blank line `ending`: its bytes are sent, or left out when
    /// its data is the usage chunk; a top-level `usage` member is cut from the data of any other
    /// chunk: OpenAI's `"usage": null`, or the usage itself where a server puts it on its last
    /// chunk with choices (some models behind Azure's v1 routes) instead of a chunk of its own.
    fn event_end(&mut self, event: &EventSoFar, chunk: Option<&Value>, ending: &[u8]) {
        if chunk.is_some_and(is_usage_chunk) {
            self.held.clear();
            self.last_line_dropped = true;
            return;
        }
        if let Some(chunk) = chunk.filter(|c| c.get("usage").is_some())
            && !event.lossy
            && let Some(cut) = usage_member_cut(&event.data, chunk)
            && let Some(line) = event
                .data_lines
                .iter()
                .find(|l| l.in_data <= cut.start && cut.end <= l.in_data + l.len)
        {
            let start = line.in_held + cut.start - line.in_data;
            self.held.drain(start..start + cut.len());
        }
        self.out.append(&mut self.held);
        self.out.extend_from_slice(ending);
        self.last_line_dropped = false;
    }

    /// What is to be sent now, if anything.
    fn take_out(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.out)))
    }
}

/// Whether a typed event carries generated output: a `…delta` event with a non-empty `delta`
/// (Responses API text, refusals, arguments, reasoning summaries and audio; a transcription's
/// text), or an image stream's partial or final image.
fn carries_output(kind: &str, event: &Value) -> bool {
    if kind.ends_with(".delta") {
        return event.get("delta").is_some_and(holds_something);
    }
    kind.ends_with(".partial_image") || IMAGE_STREAM_ENDS.contains(&kind)
}

/// Whether a chat chunk's choice `delta` carries generated output: content, a refusal, reasoning
/// content, a tool or function call, or audio (its data or transcript: the chunk that only names
/// the audio's `id` holds none yet) — not a role alone.
fn delta_carries_output(delta: &Value) -> bool {
    let audio = delta.get("audio").is_some_and(|audio| {
        ["data", "transcript"]
            .into_iter()
            .any(|key| audio.get(key).is_some_and(holds_something))
    });
    audio
        || [
            "content",
            "refusal",
            "reasoning_content",
            "tool_calls",
            "function_call",
        ]
        .into_iter()
        .any(|key| delta.get(key).is_some_and(holds_something))
}

/// Whether a value is more than `null`, `""`, `[]` or `{}`.
fn holds_something(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::String(text) => !text.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(members) => !members.is_empty(),
        Value::Bool(_) | Value::Number(_) => true,
    }
}

/// The chunk `stream_options.include_usage` adds: no choices (an empty array, or none at all), a
/// usage object.
pub fn is_usage_chunk(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .is_none_or(|choices| choices.as_array().is_some_and(Vec::is_empty))
        && chunk.get("usage").is_some_and(Value::is_object)
}

/// The bytes of an event's data to cut so that its top-level `usage` member (`null` or an object)
/// goes and the rest stays byte for byte; `None` when that member cannot be told apart (the cut
/// is checked by parsing the result).
fn usage_member_cut(data: &str, chunk: &Value) -> Option<Range<usize>> {
    // Inside a JSON string every `"` is escaped, so an unescaped `"usage"` followed by `:` is a key.
    let mut found = None;
    for (start, key) in data.match_indices("\"usage\"") {
        let rest = &data[start + key.len()..];
        let Some(value) = rest.trim_start().strip_prefix(':').map(str::trim_start) else {
            continue;
        };
        // The value's extent: one JSON value read from its first byte.
        let mut values = serde_json::Deserializer::from_str(value).into_iter::<Value>();
        if !matches!(values.next(), Some(Ok(Value::Null | Value::Object(_)))) {
            continue;
        }
        if found.is_some() {
            return None;
        }
        let tail = &value[values.byte_offset()..];
        found = Some(start..data.len() - tail.len());
    }
    let member = found?;
    let before = data[..member.start].trim_end();
    let after = data[member.end..].trim_start();
    let cut = if before.ends_with(',') {
        // `…, "usage": null}` → `…}`
        before.len() - 1..member.end
    } else if let Some(after) = after.strip_prefix(',') {
        // `{"usage": null, …` → `{…`
        member.start..data.len() - after.len()
    } else {
        member
    };
    let mut expected = chunk.clone();
    if let Some(object) = expected.as_object_mut() {
        object.remove("usage");
    }
    let stripped = [&data[..cut.start], &data[cut.end..]].concat();
    match serde_json::from_str::<Value>(&stripped) {
        Ok(parsed) if parsed == expected => Some(cut),
        _ => None,
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

    /// The number of whole events the tap had read when it first said output had started.
    fn events_before_output(bytes: &[u8]) -> Option<usize> {
        let text = std::str::from_utf8(bytes).unwrap();
        let mut tap = SseTap::default();
        for (read, event) in text.split_inclusive("\n\n").enumerate() {
            assert!(!tap.output_started(), "output before event {read}");
            tap.feed(event.as_bytes());
            if tap.output_started() {
                return Some(read);
            }
        }
        None
    }

    #[test]
    fn output_starts_with_the_first_event_that_carries_some() {
        // Azure's chat stream: the prompt-filter event, the role with empty content, then "The".
        let chat = fixture("chat-stream-include-usage.sse");
        assert_eq!(events_before_output(&chat), Some(2));
        // Responses: created, in progress, then the first text delta.
        assert_eq!(
            events_before_output(&fixture("responses-stream.sse")),
            Some(2)
        );
        // A stream the content filter stopped before any text: no output.
        let filtered = "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n\
                        data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[]},\"finish_reason\":null}]}\n\n\
                        data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"content_filter\"}]}\n\n\
                        data: [DONE]\n\n";
        assert_eq!(events_before_output(filtered.as_bytes()), None);
        // A tool call, a completion's text, a transcription's delta, an image's partial image.
        for (event, expected) in [
            (
                r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"name":"f","arguments":""}}]}}]}"#,
                true,
            ),
            (
                r#"{"object":"text_completion","choices":[{"index":0,"text":"Once"}]}"#,
                true,
            ),
            (
                r#"{"object":"text_completion","choices":[{"index":0,"text":""}]}"#,
                false,
            ),
            (r#"{"type":"transcript.text.delta","delta":"Hello"}"#, true),
            (r#"{"type":"response.output_text.delta","delta":""}"#, false),
            (
                r#"{"type":"image_generation.partial_image","b64_json":"AAAA"}"#,
                true,
            ),
            (
                r#"{"object":"thread.message.delta","delta":{"content":[{"index":0,"type":"text","text":{"value":"Hi"}}]}}"#,
                true,
            ),
            (
                r#"{"object":"thread.run.step.delta","delta":{"step_details":{"type":"tool_calls","tool_calls":[{"index":0,"type":"function","function":{"arguments":"{"}}]}}}"#,
                true,
            ),
            // Audio: the chunk naming its id carries none yet, the first transcript does.
            (
                r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"audio":{"id":"audio_1"}}}]}"#,
                false,
            ),
            (
                r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"audio":{"transcript":"Hel"}}}]}"#,
                true,
            ),
        ] {
            let mut tap = SseTap::default();
            tap.feed(format!("data: {event}\n\n").as_bytes());
            assert_eq!(tap.output_started(), expected, "{event}");
        }
    }

    #[test]
    fn a_filtered_azure_stream_keeps_its_filter_verdicts() {
        let summary = tap(&fixture("chat-stream-content-filtered.sse"));
        let response = summary.response.unwrap();
        assert!(
            response["prompt_filter_results"][0]["content_filter_results"].is_object(),
            "{response}"
        );
        let choice = &response["choices"][0];
        assert_eq!(choice["finish_reason"], "content_filter");
        let verdicts = choice["content_filter_results"].as_object().unwrap();
        assert!(
            verdicts.values().any(|v| v["filtered"] == true),
            "the category that stopped the answer is named: {verdicts:?}"
        );
    }

    #[test]
    fn a_streamed_transcription_gives_its_usage() {
        // gpt-4o-transcribe with `stream=true`: deltas, then the text and the usage.
        let stream = concat!(
            "data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hi\"}\n\n",
            "data: {\"type\":\"transcript.text.done\",\"text\":\"Hi\",\"usage\":",
            "{\"type\":\"tokens\",\"input_tokens\":14,\"output_tokens\":2,\"total_tokens\":16}}\n\n",
        );
        let summary = tap(stream.as_bytes());
        let usage = summary.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (14, 2, 16)
        );
        assert!(summary.completed);
        assert!(summary.response.is_none());
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
    fn an_assistants_run_stream_gives_the_run_and_the_messages_it_wrote() {
        let summary = tap(&fixture("assistants-run-stream.sse"));
        assert!(summary.completed);
        // The run's usage, not a step's (the same here) or none.
        let usage = summary.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (131, 11, 142)
        );
        assert_eq!(summary.model.as_deref(), Some("gpt-4o"));
        let response = summary.response.unwrap();
        assert_eq!(response["object"], "thread.run");
        assert_eq!(response["status"], "completed");
        let messages = response_messages(&response).unwrap();
        let messages: Value = serde_json::from_str(&messages).unwrap();
        assert_eq!(
            messages[0]["content"][0]["text"]["value"],
            "Invoice 42 was paid on 3 March."
        );
        assert_eq!(messages.as_array().unwrap().len(), 1);
    }

    #[test]
    fn responses_stream_takes_the_completed_response() {
        let summary = tap(&fixture("responses-stream.sse"));
        assert!(summary.completed);
        let usage = summary.usage.unwrap();
        assert!(usage.prompt_tokens > 0 && usage.total_tokens >= usage.prompt_tokens);
        assert!(summary.response.unwrap().get("output").is_some());
    }

    /// The Responses fixture's events up to (not including) the first whose type is `stop_at`.
    fn responses_cut_before(stop_at: &str) -> String {
        let stream = String::from_utf8(fixture("responses-stream.sse")).unwrap();
        let marker = format!("event: {stop_at}\n");
        let cut = stream.find(&marker).unwrap();
        stream[..cut].to_owned()
    }

    #[test]
    fn a_responses_stream_cut_after_its_deltas_gives_an_incomplete_response() {
        let stream = responses_cut_before("response.output_text.done");
        assert_eq!(stream.matches("response.output_text.delta\n").count(), 3);
        let summary = tap(stream.as_bytes());
        assert!(!summary.completed);
        assert_eq!(summary.usage, None);
        assert_eq!(summary.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let response = summary.response.unwrap();
        assert_eq!(response["id"], "resp_example");
        assert_eq!(response["object"], "response");
        assert_eq!(response["created_at"], 1_733_011_203);
        assert_eq!(response["status"], "incomplete");
        let output = response["output"].as_array().unwrap();
        assert_eq!(output.len(), 1);
        assert_eq!(output[0]["type"], "message");
        assert_eq!(output[0]["id"], "msg_example");
        assert_eq!(output[0]["role"], "assistant");
        assert_eq!(output[0]["status"], "incomplete");
        assert_eq!(output[0]["content"][0]["type"], "output_text");
        assert_eq!(output[0]["content"][0]["text"], "Due Friday.");
        // The record's messages and the token estimate read the rebuilt answer.
        assert!(
            response_messages(&response)
                .unwrap()
                .contains("Due Friday.")
        );
        let work = crate::usage::TokenWork::plan(
            OperationId::CreateResponse,
            Some(&json!({"model": "gpt-4o", "input": "When is the report due?"})),
            Some(&response),
            None,
        )
        .unwrap();
        assert_eq!(work.count().completion_tokens, 3);
    }

    #[test]
    fn a_responses_stream_cut_mid_item_keeps_the_items_that_came_whole() {
        let event = |data: Value| {
            let kind = data["type"].as_str().unwrap().to_owned();
            format!("event: {kind}\ndata: {data}\n\n")
        };
        let done_message = json!({"type": "message", "id": "msg_1", "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]});
        let stream = [
            event(json!({"type": "response.created", "sequence_number": 0, "response": {
                "id": "resp_2", "object": "response", "created_at": 5, "status": "in_progress",
                "model": "gpt-4.1", "output": [], "usage": null}})),
            event(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}})),
            event(json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})),
            event(json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": "Check"})),
            event(json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": "ing."})),
            event(json!({"type": "response.output_item.done", "output_index": 0, "item": done_message})),
            event(json!({"type": "response.output_item.added", "output_index": 1,
                "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                    "arguments": "", "status": "in_progress"}})),
            event(json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1",
                "output_index": 1, "delta": "{\"city\":"})),
            event(json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1",
                "output_index": 1, "delta": "\"Oslo\""})),
            event(json!({"type": "response.output_text.delta", "item_id": "msg_2", "output_index": 2,
                "content_index": 0, "delta": "Mean"})),
            event(json!({"type": "response.refusal.delta", "item_id": "msg_2", "output_index": 2,
                "content_index": 1, "delta": "No"})),
        ]
        .concat();
        let summary = tap(stream.as_bytes());
        assert!(!summary.completed);
        assert_eq!(summary.model.as_deref(), Some("gpt-4.1"));
        let response = summary.response.unwrap();
        assert_eq!(response["status"], "incomplete");
        assert_eq!(response["id"], "resp_2");
        assert_eq!(
            response["output"],
            json!([
                done_message,
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                    "arguments": "{\"city\":\"Oslo\"", "status": "incomplete"},
                {"type": "message", "id": "msg_2", "role": "assistant", "status": "incomplete",
                    "content": [{"type": "output_text", "text": "Mean"}, {"type": "refusal", "refusal": "No"}]},
            ])
        );
    }

    #[test]
    fn a_complete_responses_stream_gives_its_final_events_response() {
        let stream = String::from_utf8(fixture("responses-stream.sse")).unwrap();
        let last = stream
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("data: "))
            .unwrap();
        let completed: Value = serde_json::from_str(last).unwrap();
        assert_eq!(completed["type"], "response.completed");
        let summary = tap(stream.as_bytes());
        assert!(summary.completed);
        assert!(!summary.failed);
        assert_eq!(summary.response.as_ref(), Some(&completed["response"]));
        assert_eq!(summary.response.unwrap()["status"], "completed");
        assert_eq!(summary.usage.unwrap().total_tokens, 16);
        assert_eq!(summary.model.as_deref(), Some("gpt-4o-2024-08-06"));
        // A final event that says less than the deltas still wins.
        let failed = format!(
            "{}event: response.failed\ndata: {}\n\n",
            responses_cut_before("response.output_text.done"),
            json!({"type": "response.failed", "response": {"id": "resp_example", "object": "response",
                "status": "failed", "model": "gpt-4o-2024-08-06", "output": [], "usage": null}})
        );
        let summary = tap(failed.as_bytes());
        assert!(summary.completed);
        // The model's work failed: the record says so (`backend_stream_error`).
        assert!(summary.failed);
        let response = summary.response.unwrap();
        assert_eq!(response["status"], "failed");
        assert_eq!(response["output"], json!([]));
    }

    #[test]
    fn a_stream_of_only_an_error_event_gives_no_response() {
        let stream = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}\n\n";
        assert_eq!(tap(stream.as_bytes()).response, None);
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
        if let Some(out) = tap.end() {
            assert!(!out.is_empty());
            client.extend_from_slice(&out);
        }
        (client, tap.finish())
    }

    /// A content chunk saying `text`, with twenty alternatives for its token.
    fn content_event_with_logprobs(text: &str) -> String {
        let top: Vec<Value> = (0..20)
            .map(|i| json!({"token": format!("t{i}"), "logprob": -1.5, "bytes": [116, 48 + i]}))
            .collect();
        let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null,
                "logprobs": {"content": [{"token": text, "logprob": -0.1, "bytes": [104], "top_logprobs": top}]}}]});
        format!("data: {chunk}\n\n")
    }

    #[test]
    fn assistants_prompts_are_the_messages_a_call_adds() {
        let prompt_of = |path: &str, body: Value| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                "application/json".parse().unwrap(),
            );
            let call = crate::classify::classify(
                &http::Method::POST,
                path,
                Some("api-version=2024-05-01-preview"),
                &headers,
                &Bytes::from(body.to_string()),
            )
            .unwrap();
            request_messages(&call).map(|text| serde_json::from_str::<Value>(&text).unwrap())
        };
        let ask = json!([{"role": "user", "content": "Summarise the Q3 report"}]);
        assert_eq!(
            prompt_of("/openai/threads", json!({"messages": ask})),
            Some(ask.clone())
        );
        assert_eq!(
            prompt_of(
                "/openai/threads/runs",
                json!({"assistant_id": "asst_1", "thread": {"messages": ask}})
            ),
            Some(ask.clone())
        );
        assert_eq!(
            prompt_of(
                "/openai/threads/thread_1/runs",
                json!({"assistant_id": "asst_1", "additional_messages": ask})
            ),
            Some(ask.clone())
        );
        assert_eq!(
            prompt_of(
                "/openai/threads/thread_1/runs",
                json!({"assistant_id": "asst_1"})
            ),
            None
        );
        assert_eq!(
            prompt_of("/openai/threads/thread_1/messages", ask[0].clone()),
            Some(ask)
        );
    }

    #[test]
    fn a_thread_and_run_stream_cut_after_its_thread_is_no_chat_completion() {
        let mut tap = SseTap::default();
        let _ = tap.pass(Bytes::from_static(
            b"event: thread.created\ndata: {\"id\":\"thread_1\",\"object\":\"thread\",\"created_at\":1,\"metadata\":{}}\n\n",
        ));
        assert_eq!(tap.take_created().as_deref(), Some("thread_1"));
        assert!(!tap.recognised(), "kept as it came");
        assert_eq!(tap.finish().response, None);
    }

    #[test]
    fn an_error_part_way_is_kept_with_the_answer_so_far() {
        let finish = |stream: String| {
            let mut tap = SseTap::default();
            let _ = tap.pass(Bytes::from(stream));
            tap.finish()
        };
        let chat = finish(format!(
            "{}data: {{\"error\":{{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\"}}}}\n\n",
            content_event("Hel")
        ));
        assert!(chat.failed);
        let response = chat.response.unwrap();
        assert_eq!(response["choices"][0]["message"]["content"], "Hel");
        assert_eq!(response["error"]["type"], "server_error");
        let responses = finish(concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null}\n\n",
        ).to_owned());
        assert!(responses.failed);
        assert_eq!(responses.response.unwrap()["error"]["message"], "boom");
        assert!(!finish(content_event("fine")).failed);
        // An Assistants run that ends failed (its `last_error`), or expired: the model's work
        // failed though the stream ended as it should.
        for (status, failed) in [("failed", true), ("expired", true), ("completed", false)] {
            let run = json!({"id": "run_1", "object": "thread.run", "status": status, "model": "gpt-4o",
                "last_error": if failed { json!({"code": "server_error", "message": "boom"}) } else { Value::Null }});
            let summary = finish(format!(
                "event: thread.run.{status}\ndata: {run}\n\nevent: done\ndata: [DONE]\n\n"
            ));
            assert_eq!(summary.failed, failed, "{status}");
        }
    }

    #[test]
    fn a_long_stream_keeps_its_logprobs_only_up_to_a_bound() {
        let tap_of = |events: usize, kept: usize| {
            let mut tap = SseTap::default();
            tap.assembler.logprobs_kept_bytes = Some(kept);
            for _ in 0..events {
                let _ = tap.pass(Bytes::from(content_event_with_logprobs("a")));
            }
            let _ = tap.pass(Bytes::from_static(b"data: [DONE]\n\n"));
            tap.finish().response.unwrap()
        };
        // Within the bound: every token's log probabilities, in order.
        let kept = tap_of(10, 1 << 20);
        assert_eq!(
            kept["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len(),
            10
        );
        assert_eq!(kept["choices"][0]["message"]["content"], "a".repeat(10));
        // Past it: none, and the content whole.
        let event = content_event_with_logprobs("a").len();
        let dropped = tap_of(100, 20 * event);
        assert!(dropped["choices"][0].get("logprobs").is_none(), "{dropped}");
        assert_eq!(dropped["choices"][0]["message"]["content"], "a".repeat(100));
    }

    /// A chunk the usage filter must leave out (Azure's framing).
    const USAGE_EVENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";

    /// A content chunk saying `text`.
    fn content_event(text: &str) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    }

    #[test]
    fn comments_and_events_without_data_reach_the_client_unchanged() {
        let before = [
            ": OPENROUTER PROCESSING\n\n".to_owned(),
            content_event("Hel"),
            ": keep-alive\n\n".to_owned(),
            "event: ping\n\n".to_owned(),
            ":\n".to_owned(),
            "id: 4\n\n".to_owned(),
            content_event("lo"),
            "retry: 300\n\n\n".to_owned(),
            ": inside an event\n".to_owned(),
            "event: message\n".to_owned(),
            content_event("!"),
        ]
        .concat();
        let after = "data: [DONE]\n\n: bye\n\n";
        let with = format!("{before}{USAGE_EVENT}{after}");
        let without = format!("{before}{after}");
        for piece in [1, 2, 7, 64, 100_000] {
            let (client, summary) = filtered(with.as_bytes(), piece);
            assert_eq!(
                String::from_utf8(client).unwrap(),
                without,
                "pieces of {piece}"
            );
            let response = summary.response.unwrap();
            assert_eq!(response["choices"][0]["message"]["content"], "Hello!");
            assert_eq!(summary.usage.unwrap().total_tokens, 7);
            assert!(summary.completed);
        }
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_sent_at_the_end() {
        for last in ["data: [DONE]\n", "data: [DONE]", "data: [DONE]\r", ": bye"] {
            let with = format!("{}{USAGE_EVENT}{last}", content_event("Hi"));
            let without = format!("{}{last}", content_event("Hi"));
            for piece in [1, 5, 100_000] {
                let (client, summary) = filtered(with.as_bytes(), piece);
                assert_eq!(
                    String::from_utf8(client).unwrap(),
                    without,
                    "{last:?} in pieces of {piece}"
                );
                assert_eq!(summary.completed, last.contains("[DONE]"), "{last:?}");
                assert_eq!(summary.usage.unwrap().total_tokens, 7);
            }
        }
        // A usage chunk left unterminated at the end is still left out.
        let with = format!("{}{}", content_event("Hi"), USAGE_EVENT.trim_end());
        let (client, summary) = filtered(with.as_bytes(), 3);
        assert_eq!(String::from_utf8(client).unwrap(), content_event("Hi"));
        assert_eq!(summary.usage.unwrap().total_tokens, 7);
    }

    #[test]
    fn crlf_and_cr_line_ends_pass_byte_for_byte() {
        for ending in ["\r\n", "\r"] {
            let frame = |text: &str| text.replace('\n', ending);
            let before = frame(&format!(
                "\u{feff}: hi\n\n{}{}",
                content_event("a"),
                content_event("b")
            ));
            let after = frame("data: [DONE]\n\n");
            let with = format!("{before}{}{after}", frame(USAGE_EVENT));
            let without = format!("{before}{after}");
            for piece in [1, 2, 3, 7, 100_000] {
                let (client, summary) = filtered(with.as_bytes(), piece);
                assert_eq!(
                    String::from_utf8(client).unwrap(),
                    without,
                    "{ending:?} in pieces of {piece}"
                );
                let response = summary.response.unwrap();
                assert_eq!(response["choices"][0]["message"]["content"], "ab");
                assert_eq!(summary.usage.unwrap().total_tokens, 7);
                assert!(summary.completed);
            }
        }
    }

    #[test]
    fn a_plain_tap_reads_a_last_event_without_its_blank_line() {
        let stream = format!("{}data: [DONE]", content_event("Hi"));
        assert!(tap(stream.as_bytes()).completed);
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
            match usage_member_cut(data, &chunk) {
                Some(cut) => [&data[..cut.start], &data[cut.end..]].concat(),
                None => data.to_owned(),
            }
        };
        assert_eq!(cut(r#"{"a":1,"usage":null}"#), r#"{"a":1}"#);
        assert_eq!(cut(r#"{"usage":null,"a":1}"#), r#"{"a":1}"#);
        assert_eq!(
            cut(r#"{"a": 1, "usage": null, "b": 2}"#),
            r#"{"a": 1, "b": 2}"#
        );
        assert_eq!(cut(r#"{"usage":null}"#), "{}");
        assert_eq!(
            cut(r#"{"a":1,"usage":{"total_tokens":3,"d":{"x":[1]}},"b":2}"#),
            r#"{"a":1,"b":2}"#
        );
        // A nested `usage: null` too: which one is top-level is not told apart, so nothing is cut.
        let nested = r#"{"x":{"usage":null},"usage":null}"#;
        assert_eq!(cut(nested), nested);
        // Text that only looks like the key stays.
        assert_eq!(
            cut(r#"{"t":"\"usage\":null","usage":null}"#),
            r#"{"t":"\"usage\":null"}"#
        );
    }

    /// Servers that put the usage they were asked for on their last chunk with choices, or on a
    /// chunk with no `choices` at all: the client sees neither, the record has the usage.
    #[test]
    fn a_usage_riding_on_a_chunk_or_alone_is_kept_from_the_client() {
        let last = r#"{"id":"c1","object":"chat.completion.chunk","model":"mistral-large","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]"#;
        let usage = r#""usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}"#;
        for (with, without) in [
            (
                format!("data: {last},{usage}}}\n\ndata: [DONE]\n\n"),
                format!("data: {last}}}\n\ndata: [DONE]\n\n"),
            ),
            (
                format!("data: {last}}}\n\ndata: {{\"id\":\"c1\",{usage}}}\n\ndata: [DONE]\n\n"),
                format!("data: {last}}}\n\ndata: [DONE]\n\n"),
            ),
        ] {
            let (client, summary) = filtered(with.as_bytes(), 7);
            assert_eq!(String::from_utf8(client).unwrap(), without);
            assert_eq!(summary.usage.unwrap().total_tokens, 12);
        }
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
    fn a_streamed_function_call_is_joined() {
        let stream = concat!(
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"function_call\":{\"name\":\"get_weather\",\"arguments\":\"\"}},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"function_call\":{\"arguments\":\"{\\\"city\\\":\"}},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"function_call\":{\"arguments\":\"\\\"Oslo\\\"}\"}},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"function_call\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let response = tap(stream.as_bytes()).response.unwrap();
        let choice = &response["choices"][0];
        assert_eq!(
            choice["message"]["function_call"],
            json!({"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"})
        );
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(choice["finish_reason"], "function_call");
    }

    #[test]
    fn streamed_audio_keeps_its_transcript_id_and_expiry_but_not_its_data() {
        // gpt-4o-audio-preview with `modalities: ["text", "audio"]`, `audio: {format: "pcm16"}`:
        // the answer comes as `delta.audio` pieces, its `content` stays null.
        let chunk = |delta: Value, finish: Value| {
            let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-audio-preview-2024-12-17",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            format!("data: {chunk}\n\n")
        };
        let stream = [
            chunk(
                json!({"role": "assistant", "content": null, "refusal": null}),
                Value::Null,
            ),
            chunk(
                json!({"audio": {"id": "audio_1", "transcript": "The report"}}),
                Value::Null,
            ),
            chunk(json!({"audio": {"data": "AAABAAIA"}}), Value::Null),
            chunk(json!({"audio": {"transcript": " is due"}}), Value::Null),
            chunk(json!({"audio": {"data": "AwAEAAUA"}}), Value::Null),
            chunk(json!({"audio": {"transcript": " Friday."}}), Value::Null),
            chunk(
                json!({"audio": {"expires_at": 1_729_018_505}}),
                json!("stop"),
            ),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let summary = tap(stream.as_bytes());
        assert!(summary.completed);
        let response = summary.response.unwrap();
        let message = &response["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(
            message["audio"],
            json!({"id": "audio_1", "expires_at": 1_729_018_505,
                "transcript": "The report is due Friday."}),
            "the audio's data is left out"
        );
        assert_eq!(response["choices"][0]["finish_reason"], "stop");
        // The record's messages show what the model said.
        let messages = response_messages(&response).unwrap();
        assert!(messages.contains("The report is due Friday."), "{messages}");
        assert!(!messages.contains("AAABAAIA"), "{messages}");
    }

    #[test]
    fn an_image_stream_ends_with_its_completed_event() {
        // gpt-image-1 with `"stream": true, "partial_images": 2`: partial images, then the final
        // one with the call's usage.
        for operation in ["image_generation", "image_edit"] {
            let event = |data: Value| {
                let kind = data["type"].as_str().unwrap().to_owned();
                format!("event: {kind}\ndata: {data}\n\n")
            };
            let partial = |index: u64| {
                event(
                    json!({"type": format!("{operation}.partial_image"), "b64_json": "iVBORw0K",
                    "created_at": 1, "size": "1024x1024", "quality": "low", "background": "opaque",
                    "output_format": "png", "partial_image_index": index}),
                )
            };
            let completed = event(json!({"type": format!("{operation}.completed"),
                "b64_json": "iVBORw0KGgo", "created_at": 2, "size": "1024x1024", "quality": "low",
                "background": "opaque", "output_format": "png",
                "usage": {"input_tokens": 50, "output_tokens": 272, "total_tokens": 322,
                    "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}}));
            let partials = [partial(0), partial(1)].concat();

            let cut = tap(partials.as_bytes());
            assert!(
                !cut.completed,
                "{operation}: a partial image does not end it"
            );

            let summary = tap([partials, completed].concat().as_bytes());
            assert!(summary.completed, "{operation}");
            let usage = summary.usage.unwrap();
            assert_eq!(
                (
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.total_tokens
                ),
                (50, 272, 322)
            );
        }
    }

    #[test]
    fn chat_logprobs_are_joined_across_chunks() {
        let chunk = |delta: Value, logprobs: Value| {
            let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": null}]});
            format!("data: {chunk}\n\n")
        };
        let token =
            |t: &str, p: f64| json!({"token": t, "logprob": p, "bytes": [], "top_logprobs": []});
        let stream = [
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(
                json!({"content": "Hi"}),
                json!({"content": [token("Hi", -0.1)], "refusal": null}),
            ),
            chunk(
                json!({"content": " there"}),
                json!({"content": [token(" there", -0.2)], "refusal": null}),
            ),
            chunk(
                json!({"refusal": "No"}),
                json!({"content": null, "refusal": [token("No", -0.3)]}),
            ),
            chunk(
                json!({"refusal": "."}),
                json!({"content": null, "refusal": [token(".", -0.4)]}),
            ),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let response = tap(stream.as_bytes()).response.unwrap();
        assert_eq!(
            response["choices"][0]["logprobs"],
            json!({
                "content": [token("Hi", -0.1), token(" there", -0.2)],
                "refusal": [token("No", -0.3), token(".", -0.4)],
            })
        );
    }

    #[test]
    fn completion_logprobs_are_joined_across_chunks() {
        let chunk = |text: &str, offset: u64, logprob: f64| {
            let chunk = json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": text, "finish_reason": null, "logprobs": {
                    "tokens": [text], "token_logprobs": [logprob],
                    "top_logprobs": [{text: logprob}], "text_offset": [offset]}}]});
            format!("data: {chunk}\n\n")
        };
        let stream =
            [chunk("Due", 10, -0.5), chunk(" Friday", 13, -0.25)].concat() + "data: [DONE]\n\n";
        let response = tap(stream.as_bytes()).response.unwrap();
        assert_eq!(response["object"], "text_completion");
        assert_eq!(response["choices"][0]["text"], "Due Friday");
        assert_eq!(
            response["choices"][0]["logprobs"],
            json!({
                "tokens": ["Due", " Friday"],
                "token_logprobs": [-0.5, -0.25],
                "top_logprobs": [{"Due": -0.5}, {" Friday": -0.25}],
                "text_offset": [10, 13],
            })
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
