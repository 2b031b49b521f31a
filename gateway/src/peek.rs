//! Reading the few fields the hot path needs from a JSON body without building its tree.
//!
//! A request body is classified by `model`, `stream` and `stream_options`; a non-streamed answer
//! is recorded by `model` and `usage`. Parsing a whole `serde_json::Value` (a map and a string per
//! member) for that costs more than the rest of the call's bookkeeping, so these visitors read
//! the document once, skip what they do not need, and keep the same meaning as the `Value`
//! accessors they replace (`get(..).and_then(Value::as_str)`, `as_bool`, `as_u64`, the last of
//! duplicate members wins). Everything else still parses the tree, on demand.

use std::fmt;

use gatehouse_schema::audit::TokenUsage;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What classification and routing read from a JSON request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestPeek {
    /// Top-level `model`, when it is a string.
    pub model: Option<String>,
    /// Top-level `stream`, when it is a boolean.
    pub stream: Option<bool>,
    /// Top-level `stream_options`.
    pub stream_options: StreamOptions,
    /// Whether the body has a member that names a stateful object (`input_file_id`,
    /// `assistant_id`, `file_ids`, …), so that routing must look at it.
    pub references: bool,
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

/// Request members that name a stateful object (see `proxy::referenced_objects`).
pub const REFERENCE_KEYS: &[&str] = &[
    "input_file_id",
    "training_file",
    "validation_file",
    "previous_response_id",
    "assistant_id",
    "file_id",
    "thread_id",
    "file_ids",
];

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
            references: REFERENCE_KEYS.iter().any(|key| body.get(*key).is_some()),
        }
    }
}

impl ResponsePeek {
    /// Reads an answer body; `None` when it is not a JSON object or when the `Value` parser could
    /// judge it differently.
    pub fn read(body: &[u8]) -> Option<ResponsePeek> {
        let text = exact_text(body)?;
        serde_json::from_str(text).ok()
    }
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
    Usage,
    IncludeUsage,
    Reference,
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
                    "usage" => Key::Usage,
                    "include_usage" => Key::IncludeUsage,
                    key if REFERENCE_KEYS.contains(&key) => Key::Reference,
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

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The visitor methods for the kinds of value a peek does not look into.
macro_rules! other_values {
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
                        map.next_value::<IgnoredAny>()?;
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
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Model => peek.model = map.next_value::<Scalar>()?.into_str(),
                        Key::Stream => peek.stream = map.next_value::<Scalar>()?.as_bool(),
                        Key::StreamOptions => peek.stream_options = map.next_value()?,
                        Key::Reference => {
                            peek.references = true;
                            map.next_value::<IgnoredAny>()?;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
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
            total_tokens: total.unwrap_or(prompt + completion),
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
                    map.next_value::<IgnoredAny>()?;
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
                        map.next_value::<IgnoredAny>()?;
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
                            map.next_value::<IgnoredAny>()?;
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

impl<'de> de::Deserialize<'de> for ResponsePeek {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ResponseVisitor;
        impl<'de> Visitor<'de> for ResponseVisitor {
            type Value = ResponsePeek;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResponsePeek, A::Error> {
                let mut model = None;
                let mut usage = UsageFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Model => model = map.next_value::<Scalar>()?.into_str(),
                        Key::Usage => usage = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ResponsePeek {
                    model,
                    usage: usage.usage(),
                })
            }
        }
        deserializer.deserialize_map(ResponseVisitor)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

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
        ] {
            let tree: Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                RequestPeek::read(body.as_bytes()),
                Some(RequestPeek::of_tree(&tree)),
                "{body}"
            );
        }
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
            assert_eq!(ResponsePeek::read(body), None);
        }
        // An escaped backslash before `u` is not an escape.
        assert!(RequestPeek::read(br#"{"a":"\\ud800"}"#).is_some());
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
        ] {
            let text = body.to_string();
            let peek = ResponsePeek::read(text.as_bytes()).unwrap();
            assert_eq!(peek.usage, crate::capture::usage_of(&body), "{text}");
            assert_eq!(
                peek.model.as_deref(),
                body.get("model").and_then(Value::as_str),
                "{text}"
            );
        }
    }
}
