//! Reading the few fields the hot path needs from a JSON body without building its tree.
//!
//! A request body is classified by `model`, `stream` and `stream_options`; a non-streamed answer
//! is recorded by `model` and `usage`. Parsing a whole `serde_json::Value` (a map and a string per
//! member) for that costs more than the rest of the call's bookkeeping, so these visitors read
//! the document once, skip what they do not need, and keep the same meaning as the `Value`
//! accessors they replace (`get(..).and_then(Value::as_str)`, `as_bool`, `as_u64`, the last of
//! duplicate members wins). Everything else still parses the tree, on demand.
//!
//! Capture reads the prompt and the completion the same way: the member that holds them is taken
//! as the JSON text it was sent as ([`RawValue`]), with the whitespace between tokens left out
//! ([`compact_json`]), instead of being parsed into a tree and written out again.

use std::fmt;

use gatehouse_schema::audit::TokenUsage;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// What classification and routing read from a JSON request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestPeek {
    /// Top-level `model`, when it is a string.
    pub model: Option<String>,
    /// Top-level `stream`, when it is a boolean.
    pub stream: Option<bool>,
    /// Top-level `stream_options`.
    pub stream_options: StreamOptions,
    /// Top-level `store`, when it is a boolean (a chat completion kept by its member).
    pub store: Option<bool>,
    /// Whether the body has a member that names a stateful object (`input_file_id`,
    /// `assistant_id`, `file_ids`, …), so that routing must look at it.
    pub references: bool,
    /// A member the gateway judges the call by (`model`, `stream`, `stream_options`) that the
    /// object gives more than once: the gateway reads the last, a backend may read the first.
    pub duplicate: Option<&'static str>,
    /// Whether the body carries a credential for a service the model calls (`data_sources`, a
    /// tool of type `mcp`), which the record's copy leaves out (see
    /// [`crate::body_credentials`]).
    pub credentials: bool,
}

/// The shape of a request's `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamOptions {
    /// No such member.
    #[default]
    Absent,
    /// `null`.
    Null,
    /// An object, with its `include_usage` when that is a boolean.
    Object {
        /// `include_usage`.
        include_usage: Option<bool>,
    },
    /// Anything else.
    Other,
}

/// Request members whose string value is the id of a stateful object (see
/// `proxy::referenced_objects`).
pub const REFERENCE_ID_KEYS: &[&str] = &[
    "input_file_id",
    "training_file",
    "validation_file",
    "previous_response_id",
    // A response's conversation: its id, or an object holding it (`{"id": …}`).
    "conversation",
    "assistant_id",
    "file_id",
    "thread_id",
    "vector_store_id",
    // A Responses code interpreter tool's container: its id, or a new one's settings.
    "container",
];

/// Request members whose array value holds ids of stateful objects.
pub const REFERENCE_LIST_KEYS: &[&str] = &["file_ids", "vector_store_ids"];

/// Whether a request member names stateful objects.
pub fn is_reference_key(key: &str) -> bool {
    REFERENCE_ID_KEYS.contains(&key) || REFERENCE_LIST_KEYS.contains(&key)
}

/// Whether a JSON body holds a member named as one that names stateful objects, at any depth:
/// the quoted name found in its bytes, so that a body without one is not parsed into a tree to
/// look for them. (A name written with escapes is not found; its call is then not pinned.)
pub fn mentions_reference_key(body: &[u8]) -> bool {
    REFERENCE_ID_KEYS
        .iter()
        .chain(REFERENCE_LIST_KEYS)
        .any(|key| mentions_key(body, key))
}

/// Whether a JSON body has a string `"file_id"` anywhere (a chat message's file part), judged
/// as [`mentions_reference_key`] judges.
pub fn mentions_file_id(body: &[u8]) -> bool {
    mentions_key(body, "file_id")
}

/// Whether `key` appears in `body` between quotes (a member name, or a string equal to it: the
/// caller parses the body to tell).
fn mentions_key(body: &[u8], key: &str) -> bool {
    memchr::memmem::find_iter(body, key.as_bytes())
        .any(|at| at > 0 && body[at - 1] == b'"' && body.get(at + key.len()) == Some(&b'"'))
}

/// The first member name given twice in one object of the JSON text `body`, at any depth (names
/// compared after their escapes are read); `None` when every object's names are unique, or when
/// `body` is not JSON (its parser says so elsewhere).
pub fn duplicate_member(body: &[u8]) -> Option<String> {
    let found = std::cell::RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let _ = UniqueMembers(&found).deserialize(&mut deserializer);
    found.into_inner()
}

/// Walks a JSON value, noting in its cell the first member name an object gives twice (and
/// stopping there).
struct UniqueMembers<'a>(&'a std::cell::RefCell<Option<String>>);

impl<'de> DeserializeSeed<'de> for UniqueMembers<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueMembers<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
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
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(UniqueMembers(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut names = std::collections::HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !names.insert(name.clone()) {
                *self.0.borrow_mut() = Some(name);
                return Err(de::Error::custom("a member given twice"));
            }
            map.next_value_seed(UniqueMembers(self.0))?;
        }
        Ok(())
    }
}

/// What the record reads from a non-streamed JSON answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponsePeek {
    /// Top-level `model`, when it is a string.
    pub model: Option<String>,
    /// `usage`, read as [`crate::capture::usage_of`] reads it.
    pub usage: Option<TokenUsage>,
}

impl RequestPeek {
    /// Reads a request body; `None` when it is not a JSON object or when the `Value` parser could
    /// judge it differently (then the caller parses the tree and reports its error).
    pub fn read(body: &[u8]) -> Option<RequestPeek> {
        let text = exact_text(body)?;
        serde_json::from_str(text).ok()
    }
}

impl RequestPeek {
    /// The same fields read from a parsed body.
    pub fn of_tree(body: &serde_json::Value) -> RequestPeek {
        use serde_json::Value;
        let stream_options = match body.get("stream_options") {
            None => StreamOptions::Absent,
            Some(Value::Null) => StreamOptions::Null,
            Some(Value::Object(options)) => StreamOptions::Object {
                include_usage: options.get("include_usage").and_then(Value::as_bool),
            },
            Some(_) => StreamOptions::Other,
        };
        RequestPeek {
            model: body.get("model").and_then(Value::as_str).map(str::to_owned),
            stream: body.get("stream").and_then(Value::as_bool),
            stream_options,
            store: body.get("store").and_then(Value::as_bool),
            references: body
                .as_object()
                .is_some_and(|members| members.keys().any(|key| is_reference_key(key))),
            // The tree kept the last of each; the bytes tell (see `RequestPeek::duplicate_in`).
            duplicate: None,
            credentials: crate::body_credentials::carries_credentials(body),
        }
    }

    /// The first member judged by the gateway that `body`, a JSON object, gives more than once.
    pub fn duplicate_in(body: &[u8]) -> Option<&'static str> {
        serde_json::from_slice::<RequestPeek>(body)
            .ok()
            .and_then(|peek| peek.duplicate)
    }
}

impl ResponsePeek {
    /// Reads an answer body and, when `messages`, its completion part as JSON text, as
    /// `capture::response_messages` writes it from the tree: the `output` array (responses), or the
    /// `message` (else `text`) of every choice as an array (chat, completions). `None` when the
    /// body is not a JSON object or when the `Value` parser could judge it differently.
    pub fn read_with_messages(
        body: &[u8],
        messages: bool,
    ) -> Option<(ResponsePeek, Option<String>)> {
        let text = exact_text(body)?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parts = ResponseSeed { messages }
            .deserialize(&mut deserializer)
            .ok()?;
        deserializer.end().ok()?;
        let completion = match (parts.output, parts.choices) {
            (Some(output), _) => Some(compact_json(output.get())),
            (None, Some(choices)) if !choices.is_empty() => {
                let mut text = Vec::with_capacity(
                    choices.iter().map(|c| c.get().len() + 1).sum::<usize>() + 1,
                );
                text.push(b'[');
                for (index, choice) in choices.iter().enumerate() {
                    if index > 0 {
                        text.push(b',');
                    }
                    push_compact(&mut text, choice.get());
                }
                text.push(b']');
                Some(into_text(text))
            }
            _ => None,
        };
        let peek = ResponsePeek {
            model: parts.model,
            usage: parts.usage.usage(),
        };
        Some((peek, completion))
    }
}

impl ResponsePeek {
    /// Reads `model` and `usage` from the last bytes of an answer too large to parse whole
    /// (an embeddings batch of thousands of vectors): answers put both at the end, after the data,
    /// and as object keys they cannot be mistaken for text (a quote inside a JSON string is
    /// escaped). The last occurrence of each key wins, as the top-level one comes last.
    pub fn read_tail(tail: &[u8]) -> ResponsePeek {
        let usage = value_after_last_key(tail, b"\"usage\"")
            .filter(serde_json::Value::is_object)
            .and_then(|usage| crate::capture::usage_of(&serde_json::json!({ "usage": usage })));
        let model = value_after_last_key(tail, b"\"model\"").and_then(|model| match model {
            serde_json::Value::String(model) => Some(model),
            _ => None,
        });
        ResponsePeek { model, usage }
    }
}

/// The JSON value after the last `key` (a quoted name) followed by `:` in `bytes`.
fn value_after_last_key(bytes: &[u8], key: &[u8]) -> Option<serde_json::Value> {
    let mut end = bytes.len();
    while let Some(at) = memchr::memmem::rfind(&bytes[..end], key) {
        let rest = &bytes[at + key.len()..];
        let rest = rest.trim_ascii_start();
        if let Some(value) = rest.strip_prefix(b":") {
            let mut values = serde_json::Deserializer::from_slice(value).into_iter();
            return values.next()?.ok();
        }
        end = at;
    }
    None
}

/// The member `field` of a JSON object as JSON text ([`compact_json`]): `Some(None)` when the
/// object has no such member, `None` when `body` is not a JSON object or when the `Value` parser
/// could judge it differently (the caller then asks the tree). The last of duplicate members wins.
pub fn member_json(body: &[u8], field: &str) -> Option<Option<String>> {
    let text = exact_text(body)?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let member = MemberSeed(field).deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    Some(member.map(|raw| compact_json(raw.get())))
}

/// The string member `field` of a JSON object whose text may be cut off after it: the start of
/// an answer too large to read whole (a Responses object opens with its `id`). The first such
/// member counts; `None` when the text does not reach it or it is not a string.
pub fn leading_member_str(prefix: &[u8], field: &str) -> Option<String> {
    let mut found = None;
    let mut deserializer = serde_json::Deserializer::from_slice(prefix);
    // The read stops with an error at the cut, or once the member is found: what it found stays.
    let _ = LeadingSeed {
        field,
        found: &mut found,
    }
    .deserialize(&mut deserializer);
    found
}

/// Reads an object's members up to `field`, setting `found` to its value if it is a string;
/// stops there with an error, so that the rest is not read.
struct LeadingSeed<'f, 'o> {
    field: &'f str,
    found: &'o mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for LeadingSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LeadingSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(named) = map.next_key_seed(KeyIs(self.field))? {
            if named {
                *self.found = map.next_value::<String>().ok();
                return Err(de::Error::custom("found"));
            }
            map.next_value::<Skip>()?;
        }
        Ok(())
    }
}

/// A JSON text without the whitespace between its tokens, as `serde_json` writes a value: the
/// text inside strings, escapes included, is kept as it came. `raw` must be valid JSON (a
/// [`RawValue`]'s text).
pub fn compact_json(raw: &str) -> String {
    let mut out = Vec::with_capacity(raw.len());
    push_compact(&mut out, raw);
    into_text(out)
}

/// Appends [`compact_json`]'s text of `raw` to `out`.
fn push_compact(out: &mut Vec<u8>, raw: &str) {
    let bytes = raw.as_bytes();
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b' ' | b'\n' | b'\t' | b'\r' => at += 1,
            b'"' => {
                // Copy the string through its closing quote; inside it, only `"` and `\\` matter.
                let start = at;
                at += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[at.min(bytes.len())..]) {
                        Some(found) if bytes[at + found] == b'\\' => at += found + 2,
                        Some(found) => {
                            at += found + 1;
                            break;
                        }
                        None => {
                            at = bytes.len();
                            break;
                        }
                    }
                }
                out.extend_from_slice(&bytes[start..at.min(bytes.len())]);
            }
            _ => {
                out.push(byte);
                at += 1;
            }
        }
    }
}

/// The text [`push_compact`] wrote: only ASCII whitespace outside strings was left out of UTF-8
/// input, so it is still UTF-8.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// The body as text when skipping members is as strict as parsing them: valid UTF-8 and no
/// `\uD800`–`\uDFFF` escape (a lone surrogate fails a `Value` but passes a skip).
fn exact_text(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let bytes = text.as_bytes();
    let mut from = 0;
    // memchr reads a word (or a vector) at a time: this scan runs over every request and answer
    // body, and byte by byte it cost ≈ 5 instructions per byte.
    while let Some(at) = memchr::memchr(b'\\', &bytes[from..]) {
        let at = from + at;
        if bytes.get(at + 1) == Some(&b'u')
            && matches!(bytes.get(at + 2), Some(b'd' | b'D'))
            && matches!(
                bytes.get(at + 3),
                Some(b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
            )
        {
            return None;
        }
        // Skip the escaped character, so that `\\u` is not read as an escape.
        from = at + 2;
        if from >= bytes.len() {
            break;
        }
    }
    Some(text)
}

/// A member's key, as far as the peeks care.
enum Key {
    Model,
    Stream,
    StreamOptions,
    Store,
    Usage,
    IncludeUsage,
    Reference,
    DataSources,
    Tools,
    Choices,
    Output,
    Message,
    Text,
    Other(Option<UsageKey>),
}

/// Keys inside `usage`.
#[derive(Clone, Copy)]
enum UsageKey {
    PromptTokens,
    InputTokens,
    CompletionTokens,
    OutputTokens,
    TotalTokens,
    PromptDetails,
    InputDetails,
    CompletionDetails,
    OutputDetails,
    CachedTokens,
    ReasoningTokens,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "model" => Key::Model,
                    "stream" => Key::Stream,
                    "stream_options" => Key::StreamOptions,
                    "store" => Key::Store,
                    "usage" => Key::Usage,
                    "include_usage" => Key::IncludeUsage,
                    key if is_reference_key(key) => Key::Reference,
                    "data_sources" | "dataSources" => Key::DataSources,
                    "tools" => Key::Tools,
                    "choices" => Key::Choices,
                    "output" => Key::Output,
                    "message" => Key::Message,
                    "text" => Key::Text,
                    "prompt_tokens" => Key::Other(Some(UsageKey::PromptTokens)),
                    "input_tokens" => Key::Other(Some(UsageKey::InputTokens)),
                    "completion_tokens" => Key::Other(Some(UsageKey::CompletionTokens)),
                    "output_tokens" => Key::Other(Some(UsageKey::OutputTokens)),
                    "total_tokens" => Key::Other(Some(UsageKey::TotalTokens)),
                    "prompt_tokens_details" => Key::Other(Some(UsageKey::PromptDetails)),
                    "input_tokens_details" => Key::Other(Some(UsageKey::InputDetails)),
                    "completion_tokens_details" => Key::Other(Some(UsageKey::CompletionDetails)),
                    "output_tokens_details" => Key::Other(Some(UsageKey::OutputDetails)),
                    "cached_tokens" => Key::Other(Some(UsageKey::CachedTokens)),
                    "reasoning_tokens" => Key::Other(Some(UsageKey::ReasoningTokens)),
                    _ => Key::Other(None),
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A JSON value seen as `Value::as_str` / `as_bool` / `as_u64` see it.
enum Scalar {
    Str(String),
    Bool(bool),
    U64(u64),
    Other,
}

impl Scalar {
    fn into_str(self) -> Option<String> {
        match self {
            Scalar::Str(value) => Some(value),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(value) => Some(*value),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::U64(value) => Some(*value),
            _ => None,
        }
    }
}

/// A value the peeks do not look into, skipped as strictly as `serde_json::Value` parses it:
/// nesting deeper than serde_json's recursion limit (128) and numbers out of `f64`'s range fail
/// here too. (`IgnoredAny` lets both pass: a body the peek read would then be one the tree
/// parser refuses, and everything that reads the tree — renaming `model`, checking what a run
/// runs, estimating tokens — would silently see no body while the backend reads one.)
struct Skip;

impl<'de> de::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SkipVisitor;
        impl<'de> Visitor<'de> for SkipVisitor {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
                skip_seq(seq)?;
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Skip, A::Error> {
                skip_map(map)?;
                Ok(Skip)
            }
        }
        deserializer.deserialize_any(SkipVisitor)
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Skip>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<Skip, Skip>()?.is_some() {}
    Ok(())
}

/// The visitor methods for the scalars a peek does not look into.
macro_rules! other_scalars {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

/// A request's `tools`, read for whether a tool has a member that holds a credential
/// ([`crate::body_credentials::TOOL_SECRETS`]); any value is taken, as [`Skip`] takes it.
struct ToolCredentials(bool);

impl<'de> de::Deserialize<'de> for ToolCredentials {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ToolsVisitor;
        impl<'de> Visitor<'de> for ToolsVisitor {
            type Value = ToolCredentials;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            other_scalars!(ToolCredentials(false));
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ToolCredentials(false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut found = false;
                while let Some(tool) = seq.next_element::<ToolCredentials>()? {
                    found |= tool.0;
                }
                Ok(ToolCredentials(found))
            }
            /// One tool: whether it has a member named in `TOOL_SECRETS`.
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = false;
                while let Some(SecretName(secret)) = map.next_key()? {
                    found |= secret;
                    map.next_value::<Skip>()?;
                }
                Ok(ToolCredentials(found))
            }
        }
        deserializer.deserialize_any(ToolsVisitor)
    }
}

/// A member name, read for whether it is one of a tool's credentials.
struct SecretName(bool);

impl<'de> de::Deserialize<'de> for SecretName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = SecretName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<SecretName, E> {
                Ok(SecretName(
                    crate::body_credentials::TOOL_SECRETS.contains(&name),
                ))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// The visitor methods for the kinds of value a peek does not look into: scalars and arrays.
macro_rules! other_values {
    ($other:expr) => {
        other_scalars!($other);
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            skip_seq(seq)?;
            Ok($other)
        }
    };
}

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(value))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Scalar, E> {
                Ok(Scalar::U64(value))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(value.to_owned()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
                skip_seq(seq)?;
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
                skip_map(map)?;
                Ok(Scalar::Other)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

impl<'de> de::Deserialize<'de> for StreamOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OptionsVisitor;
        impl<'de> Visitor<'de> for OptionsVisitor {
            type Value = StreamOptions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            other_values!(StreamOptions::Other);
            fn visit_unit<E: de::Error>(self) -> Result<StreamOptions, E> {
                Ok(StreamOptions::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StreamOptions, A::Error> {
                let mut include_usage = None;
                while let Some(key) = map.next_key::<Key>()? {
                    if matches!(key, Key::IncludeUsage) {
                        include_usage = map.next_value::<Scalar>()?.as_bool();
                    } else {
                        map.next_value::<Skip>()?;
                    }
                }
                Ok(StreamOptions::Object { include_usage })
            }
        }
        deserializer.deserialize_any(OptionsVisitor)
    }
}

impl<'de> de::Deserialize<'de> for RequestPeek {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RequestVisitor;
        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = RequestPeek;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestPeek, A::Error> {
                let mut peek = RequestPeek::default();
                let mut seen = [false; 4];
                let mut once = |peek: &mut RequestPeek, index: usize, name: &'static str| {
                    if std::mem::replace(&mut seen[index], true) && peek.duplicate.is_none() {
                        peek.duplicate = Some(name);
                    }
                };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Model => {
                            once(&mut peek, 0, "model");
                            peek.model = map.next_value::<Scalar>()?.into_str();
                        }
                        Key::Stream => {
                            once(&mut peek, 1, "stream");
                            peek.stream = map.next_value::<Scalar>()?.as_bool();
                        }
                        Key::StreamOptions => {
                            once(&mut peek, 2, "stream_options");
                            peek.stream_options = map.next_value()?;
                        }
                        Key::Store => {
                            once(&mut peek, 3, "store");
                            peek.store = map.next_value::<Scalar>()?.as_bool();
                        }
                        Key::Reference => {
                            peek.references = true;
                            map.next_value::<Skip>()?;
                        }
                        Key::DataSources => {
                            peek.credentials = true;
                            map.next_value::<Skip>()?;
                        }
                        Key::Tools => {
                            if map.next_value::<ToolCredentials>()?.0 {
                                peek.credentials = true;
                            }
                        }
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(peek)
            }
        }
        deserializer.deserialize_map(RequestVisitor)
    }
}

/// `usage` members as numbers, each the last one given.
#[derive(Default)]
struct UsageFields {
    is_object: bool,
    numbers: [Option<u64>; 5],
    /// `cached_tokens` of `prompt_tokens_details` / `input_tokens_details`.
    cached: [Option<u64>; 2],
    /// `reasoning_tokens` of `completion_tokens_details` / `output_tokens_details`.
    reasoning: [Option<u64>; 2],
}

impl UsageFields {
    /// The same figures as [`crate::capture::usage_of`] reads from the tree.
    fn usage(&self) -> Option<TokenUsage> {
        if !self.is_object {
            return None;
        }
        let [prompt, input, completion, output, total] = self.numbers;
        let prompt = prompt.or(input)?;
        let completion = completion.or(output).unwrap_or(0);
        Some(TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total.unwrap_or(prompt.saturating_add(completion)),
            cached_tokens: self.cached[0].or(self.cached[1]).unwrap_or(0),
            reasoning_tokens: self.reasoning[0].or(self.reasoning[1]).unwrap_or(0),
            is_estimate: false,
        })
    }
}

/// One `*_tokens_details` object's member `wanted`, when it is a number.
struct Detail(Option<u64>);

struct DetailVisitor(UsageKey);

impl<'de> de::DeserializeSeed<'de> for DetailVisitor {
    type Value = Detail;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Detail, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DetailVisitor {
    type Value = Detail;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    other_values!(Detail(None));
    fn visit_unit<E: de::Error>(self) -> Result<Detail, E> {
        Ok(Detail(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Detail, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Key>()? {
            match (key, self.0) {
                (Key::Other(Some(UsageKey::CachedTokens)), UsageKey::CachedTokens)
                | (Key::Other(Some(UsageKey::ReasoningTokens)), UsageKey::ReasoningTokens) => {
                    found = map.next_value::<Scalar>()?.as_u64();
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Detail(found))
    }
}

impl<'de> de::Deserialize<'de> for UsageFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UsageVisitor;
        impl<'de> Visitor<'de> for UsageVisitor {
            type Value = UsageFields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            other_values!(UsageFields::default());
            fn visit_unit<E: de::Error>(self) -> Result<UsageFields, E> {
                Ok(UsageFields::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageFields, A::Error> {
                let mut fields = UsageFields {
                    is_object: true,
                    ..UsageFields::default()
                };
                while let Some(key) = map.next_key::<Key>()? {
                    let Key::Other(Some(key)) = key else {
                        map.next_value::<Skip>()?;
                        continue;
                    };
                    let number = match key {
                        UsageKey::PromptTokens => 0,
                        UsageKey::InputTokens => 1,
                        UsageKey::CompletionTokens => 2,
                        UsageKey::OutputTokens => 3,
                        UsageKey::TotalTokens => 4,
                        UsageKey::PromptDetails | UsageKey::InputDetails => {
                            let slot = usize::from(matches!(key, UsageKey::InputDetails));
                            fields.cached[slot] = map
                                .next_value_seed(DetailVisitor(UsageKey::CachedTokens))?
                                .0;
                            continue;
                        }
                        UsageKey::CompletionDetails | UsageKey::OutputDetails => {
                            let slot = usize::from(matches!(key, UsageKey::OutputDetails));
                            fields.reasoning[slot] = map
                                .next_value_seed(DetailVisitor(UsageKey::ReasoningTokens))?
                                .0;
                            continue;
                        }
                        UsageKey::CachedTokens | UsageKey::ReasoningTokens => {
                            map.next_value::<Skip>()?;
                            continue;
                        }
                    };
                    fields.numbers[number] = map.next_value::<Scalar>()?.as_u64();
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_any(UsageVisitor)
    }
}

/// What a response's visitor takes from it: the peek's fields and, when messages are wanted, the
/// completion's members as text.
struct ResponseParts<'de> {
    model: Option<String>,
    usage: UsageFields,
    /// `output`, when it is an array.
    output: Option<&'de RawValue>,
    /// The `message` (else `text`) of each choice that has one, when `choices` is an array.
    choices: Option<Vec<&'de RawValue>>,
}

/// Reads a response object; `messages` says whether to take its completion too.
struct ResponseSeed {
    messages: bool,
}

impl<'de> DeserializeSeed<'de> for ResponseSeed {
    type Value = ResponseParts<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ResponseSeed {
    type Value = ResponseParts<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut parts = ResponseParts {
            model: None,
            usage: UsageFields::default(),
            output: None,
            choices: None,
        };
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Model => parts.model = map.next_value::<Scalar>()?.into_str(),
                Key::Usage => parts.usage = map.next_value()?,
                Key::Output if self.messages => {
                    let output: &RawValue = map.next_value()?;
                    parts.output = Some(output).filter(|o| o.get().starts_with('['));
                }
                Key::Choices if self.messages => {
                    parts.choices = map.next_value::<Choices<'de>>()?.0;
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(parts)
    }
}

/// `choices`: the completion of each choice that has one, when it is an array.
struct Choices<'de>(Option<Vec<&'de RawValue>>);

impl<'de> de::Deserialize<'de> for Choices<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoicesVisitor;
        impl<'de> Visitor<'de> for ChoicesVisitor {
            type Value = Choices<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            other_scalars!(Choices(None));
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Choices(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map)?;
                Ok(Choices(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut completions = Vec::new();
                while let Some(choice) = seq.next_element::<Choice<'de>>()? {
                    completions.extend(choice.0);
                }
                Ok(Choices(Some(completions)))
            }
        }
        deserializer.deserialize_any(ChoicesVisitor)
    }
}

/// One choice's `message`, else its `text` (`null` included, as `Value::get` finds it); nothing
/// for a choice that is not an object or has neither.
struct Choice<'de>(Option<&'de RawValue>);

impl<'de> de::Deserialize<'de> for Choice<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor;
        impl<'de> Visitor<'de> for ChoiceVisitor {
            type Value = Choice<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            other_values!(Choice(None));
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Choice(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut message, mut text) = (None, None);
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Message => message = Some(map.next_value()?),
                        Key::Text => text = Some(map.next_value()?),
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(Choice(message.or(text)))
            }
        }
        deserializer.deserialize_any(ChoiceVisitor)
    }
}

/// Reads the member named `.0` of a JSON object as raw text.
struct MemberSeed<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for MemberSeed<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MemberSeed<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(named) = map.next_key_seed(KeyIs(self.0))? {
            if named {
                found = Some(map.next_value()?);
            } else {
                map.next_value::<Skip>()?;
            }
        }
        Ok(found)
    }
}

/// Whether a member's key is `.0`.
struct KeyIs<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_leading_member_is_read_from_a_cut_off_object() {
        use super::leading_member_str as leading;
        let answer = br#"{"id":"resp_1","object":"response","output":[{"type":"image_generation_call","result":"iVBORw0KGgoAAAANSUhEUgAA"#;
        assert_eq!(leading(answer, "id").as_deref(), Some("resp_1"));
        assert_eq!(leading(answer, "object").as_deref(), Some("response"));
        let later = br#"{"object":"response","created_at":1,"id" : "resp_2","output":["#;
        assert_eq!(leading(later, "id").as_deref(), Some("resp_2"));
        // Not reached before the cut, not a string, not an object.
        assert_eq!(
            leading(br#"{"object":"response","output":[{"x":"#, "id"),
            None
        );
        assert_eq!(leading(br#"{"id":7,"#, "id"), None);
        assert_eq!(leading(br#"["id","resp_1"]"#, "id"), None);
        assert_eq!(leading(br#"{"id":"resp_"#, "id"), None);
    }

    #[test]
    fn a_reference_key_is_found_at_any_depth_and_only_as_a_member_name() {
        use super::mentions_reference_key as mentions;
        assert!(mentions(
            br#"{"tool_resources":{"file_search":{"vector_store_ids":["vs_1"]}}}"#
        ));
        assert!(mentions(
            br#"{"messages":[{"attachments":[{"file_id":"file-1"}]}]}"#
        ));
        assert!(!mentions(br#"{"input":"what is a file_id?","model":"m"}"#));
        assert!(!mentions(
            br#"{"input":"x","tools":[{"type":"web_search"}]}"#
        ));
        assert!(!mentions(br#""file_id"#));
    }

    #[test]
    fn the_tail_of_a_huge_embeddings_answer_gives_its_model_and_usage() {
        let vector = format!("[{}]", vec!["-0.0123456"; 64].join(","));
        let data = (0..50)
            .map(|i| format!(r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let answer = format!(
            r#"{{"object":"list","data":[{data}],"model":"text-embedding-3-large","usage":{{"prompt_tokens":812,"total_tokens":812}}}}"#
        );
        let tail = &answer.as_bytes()[answer.len() - 300..];
        let peek = super::ResponsePeek::read_tail(tail);
        assert_eq!(peek.model.as_deref(), Some("text-embedding-3-large"));
        let usage = peek.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.total_tokens), (812, 812));
        assert!(!usage.is_estimate);
        // A quoted key inside text is escaped, and a key cut off by the tail's start is passed by.
        let chat = br#"nt":"say "usage": {} and "model":1"}}],"model":"gpt-4o","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let peek = super::ResponsePeek::read_tail(chat);
        assert_eq!(peek.model.as_deref(), Some("gpt-4o"));
        assert_eq!(peek.usage.unwrap().completion_tokens, 2);
        let cut = super::ResponsePeek::read_tail(
            br#"sage":{"prompt_tokens":9,"total_tokens":9},"model":"gpt-4o"}"#,
        );
        assert_eq!(cut.model.as_deref(), Some("gpt-4o"));
        assert!(
            cut.usage.is_none(),
            "a key cut by the tail's start is not read"
        );
    }

    use serde_json::{Value, json};

    use super::*;

    /// A member name given twice in one object is found at any depth, its escapes read; names
    /// repeated in different objects are not duplicates.
    #[test]
    fn a_member_given_twice_in_one_object_is_found() {
        assert_eq!(
            duplicate_member(br#"{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}"#),
            None
        );
        assert_eq!(
            duplicate_member(br#"{"tools":[{"type":"image_generation","type":"function"}]}"#),
            Some("type".to_owned())
        );
        assert_eq!(
            duplicate_member(br#"{"m":{"model":"a","mod\u0065l":"b"}}"#),
            Some("model".to_owned())
        );
        assert_eq!(duplicate_member(b"not json"), None);
    }

    #[test]
    fn request_peek_reads_what_the_tree_reads() {
        for body in [
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi \"x\" \u00e9"}]}"#,
            r#"{"model":7,"stream":"yes","stream_options":{"include_usage":true,"x":[1,{"a":null}]}}"#,
            r#"{"model":"a","model":"b\n","stream":true,"stream":false,"stream_options":null}"#,
            r#"{"stream_options":[1,2],"input_file_id":"file-1","n":-1,"t":1.5e3}"#,
            r#"{"stream_options":{"include_usage":1},"file_ids":["f"],"model":null}"#,
            r#"{"model":{"name":"x"},"stream":[true]}"#,
            r#"{}"#,
            r#"{"data_sources":[{"type":"azure_search"}],"messages":[]}"#,
            r#"{"tools":[{"type":"function","name":"f"},{"type":"m\u0063p","headers":{"a":"b"}}]}"#,
            r#"{"tools":[{"type":"function"},{"name":"no type"}],"dataSources":null}"#,
            r#"{"tools":null}"#,
        ] {
            let tree: Value = serde_json::from_str(body).unwrap();
            let read = RequestPeek::read(body.as_bytes()).unwrap();
            // The tree keeps the last of a repeated member; the bytes say it was repeated.
            assert_eq!(
                read.duplicate.is_some(),
                body.starts_with(r#"{"model":"a","model""#)
            );
            assert_eq!(
                RequestPeek {
                    duplicate: None,
                    ..read
                },
                RequestPeek::of_tree(&tree),
                "{body}"
            );
        }
        // What the record leaves out is found; tools read without a credential are not.
        let credentials = |body: &str| RequestPeek::read(body.as_bytes()).unwrap().credentials;
        assert!(credentials(r#"{"data_sources":[]}"#));
        assert!(credentials(
            r#"{"tools":[{"type":"mcp","he\u0061ders":{"a":"b"}}]}"#
        ));
        assert!(credentials(r#"{"tools":[1,{"authorization":"t"}]}"#));
        assert!(!credentials(r#"{"tools":[{"type":"function"}],"data":1}"#));
        let repeated = br#"{"model":"a","model":"b\n","stream":true,"stream":false}"#;
        assert_eq!(RequestPeek::duplicate_in(repeated), Some("model"));
        assert_eq!(
            RequestPeek::duplicate_in(br#"{"stream":1,"stream":2}"#),
            Some("stream")
        );
        assert_eq!(
            RequestPeek::duplicate_in(br#"{"model":"a","x":{"model":"b"}}"#),
            None
        );
    }

    #[test]
    fn what_the_tree_refuses_is_left_to_the_tree() {
        for body in [
            &b"[1]"[..],
            b"\"x\"",
            b"{\"a\":1",
            b"{\"a\":1}x",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":\"\xff\"}",
            b"",
        ] {
            assert_eq!(
                RequestPeek::read(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(ResponsePeek::read_with_messages(body, true), None);
        }
        // An escaped backslash before `u` is not an escape.
        assert!(RequestPeek::read(br#"{"a":"\\ud800"}"#).is_some());
        // What the tree parser refuses deep inside a member the peek skips: a number out of
        // range, nesting past serde_json's recursion limit (128).
        let deep = format!(
            r#"{{"model":"o1","x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let shallow = format!(
            r#"{{"model":"o1","x":{}1{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        for body in [
            r#"{"model":"o1","x":1e400}"#.to_owned(),
            r#"{"model":"o1","x":{"y":[-1e309]}}"#.to_owned(),
            deep,
        ] {
            assert!(serde_json::from_str::<Value>(&body).is_err());
            assert_eq!(RequestPeek::read(body.as_bytes()), None, "{body}");
            assert_eq!(
                ResponsePeek::read_with_messages(body.as_bytes(), true),
                None
            );
        }
        assert!(serde_json::from_str::<Value>(&shallow).is_ok());
        assert!(RequestPeek::read(shallow.as_bytes()).is_some());
    }

    #[test]
    fn response_peek_reads_usage_as_the_tree_does() {
        for body in [
            json!({"model": "gpt-4o-mini", "usage": {"prompt_tokens": 212, "completion_tokens": 64, "total_tokens": 276, "prompt_tokens_details": {"cached_tokens": 5}, "completion_tokens_details": {"reasoning_tokens": 7}}}),
            json!({"model": "m", "usage": {"input_tokens": 3, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 1}, "output_tokens_details": {"reasoning_tokens": 2}}}),
            json!({"usage": {"prompt_tokens": 3, "input_tokens": 9, "prompt_tokens_details": [1], "input_tokens_details": {"cached_tokens": 4}}}),
            json!({"usage": {"prompt_tokens": -3, "input_tokens": 2.5}}),
            json!({"usage": {"prompt_tokens": 1, "total_tokens": "x", "completion_tokens_details": null}}),
            json!({"usage": null, "model": 5}),
            json!({"usage": [1, 2]}),
            json!({"choices": [{"message": {"content": "usage"}}]}),
            // A member's absurd counts without a total: saturated, never an overflow.
            json!({"usage": {"prompt_tokens": u64::MAX, "completion_tokens": 2}}),
        ] {
            let text = body.to_string();
            let (peek, _) = ResponsePeek::read_with_messages(text.as_bytes(), false).unwrap();
            assert_eq!(peek.usage, crate::capture::usage_of(&body), "{text}");
            assert_eq!(
                peek.model.as_deref(),
                body.get("model").and_then(Value::as_str),
                "{text}"
            );
        }
        let absurd = json!({"usage": {"prompt_tokens": u64::MAX, "completion_tokens": 2}});
        assert_eq!(
            crate::capture::usage_of(&absurd).map(|usage| usage.total_tokens),
            Some(u64::MAX)
        );
    }

    #[test]
    fn the_completion_is_read_as_the_tree_writes_it() {
        for body in [
            json!({"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "say \"hi\"\n é \\ {x: [1, 2]}"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}),
            json!({"choices": [{"text": "one"}, {"message": null, "text": "two"}, 7, {"neither": 1}, {"text": {"a": [true, null, 1.5]}}]}),
            json!({"choices": []}),
            json!({"choices": {"message": "not a list"}}),
            json!({"choices": "x", "output": [{"type": "message", "content": [{"type": "output_text", "text": "from output"}]}]}),
            json!({"output": "not a list", "choices": [{"message": {"content": "from choices"}}]}),
            json!({"data": [{"embedding": [0.1, -2]}]}),
        ] {
            // Pretty-printed, so that the whitespace between tokens has to be left out.
            let text = serde_json::to_string_pretty(&body).unwrap();
            let (peek, messages) = ResponsePeek::read_with_messages(text.as_bytes(), true).unwrap();
            assert_eq!(messages, crate::capture::response_messages(&body), "{text}");
            assert_eq!(peek.usage, crate::capture::usage_of(&body), "{text}");
            let (_, none) = ResponsePeek::read_with_messages(text.as_bytes(), false).unwrap();
            assert_eq!(none, None, "messages are read only when wanted");
        }
        // The last of duplicate members wins, as in the tree.
        let twice = br#"{"choices":[{"message":"a"}],"choices":[{"text":"b","text":"c"}]}"#;
        let (_, messages) = ResponsePeek::read_with_messages(twice, true).unwrap();
        assert_eq!(messages.as_deref(), Some(r#"["c"]"#));
    }

    #[test]
    fn a_member_is_read_as_the_tree_writes_it() {
        let body = json!({"model": "m", "messages": [{"role": "system", "content": "be \"brief\"\t\u{1F600} \\"}, {"role": "user", "content": ["a", {"type": "image_url", "image_url": {"url": "data:,x y"}}]}], "input": 5, "prompt": null});
        let text = serde_json::to_string_pretty(&body).unwrap();
        for field in ["messages", "input", "prompt", "absent"] {
            assert_eq!(
                member_json(text.as_bytes(), field),
                Some(body.get(field).map(Value::to_string)),
                "{field}"
            );
        }
        assert_eq!(
            member_json(br#"{"input":1,"input" : [ "x" ] }"#, "input"),
            Some(Some(r#"["x"]"#.to_owned()))
        );
        for refused in [&b"[1]"[..], b"{\"input\":\"\\ud800\"}", b"{\"a\":1", b"{}x"] {
            assert_eq!(member_json(refused, "input"), None, "left to the tree");
        }
    }

    #[test]
    fn compacting_keeps_the_text_of_strings() {
        assert_eq!(
            compact_json("[ {\"a b\" :\t\"c \\\" d\\\\\" } ,\n 1 ]"),
            r#"[{"a b":"c \" d\\"},1]"#
        );
        assert_eq!(compact_json(r#""\u00e9 x""#), r#""\u00e9 x""#);
        assert_eq!(compact_json("\"unterminated \\"), "\"unterminated \\");
    }
}
