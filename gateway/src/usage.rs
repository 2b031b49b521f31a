//! Step 9, continued: token counts the gateway works out itself when the backend reports none.
//!
//! Backends report usage in the answer's `usage`, in the last chunk of a stream that asked for it
//! (`stream_options.include_usage`, which the proxy adds when the backend supports it), or in the
//! Responses API's `response.completed` (`azure-specs.md` §1.6, §1.7). When none arrives — an
//! api-version before `2024-09-01-preview`, a stream cut short or stopped by the content filter, a
//! hung-up client whose stream could not be drained to its end — the record gets this module's
//! estimate, flagged [`TokenUsage::is_estimate`].
//!
//! Counting uses the model's tiktoken encoding (`o200k_base` for gpt-4o, gpt-4.1, gpt-5 and the
//! o-series; `cl100k_base` for gpt-4, gpt-3.5 and the embedding models; `o200k_base` when the
//! name says nothing). The BPE ranks are embedded in the `tiktoken-rs` crate, so nothing is
//! downloaded at run time; each encoding is loaded once, on first use (about a tenth of a second
//! of CPU, done on a blocking thread).
//!
//! Chat prompts are counted the way OpenAI's cookbook counts them ("How to count tokens with
//! tiktoken",
//! <https://github.com/openai/openai-cookbook/blob/main/examples/How_to_count_tokens_with_tiktoken.ipynb>):
//! 3 tokens per message, the tokens of each of its string values (role, content, name, …), 1 more
//! for a `name`, and 3 that prime the reply (`<|start|>assistant<|message|>`). Image parts, tool
//! definitions and the Responses API's items are approximations; hidden reasoning tokens cannot be
//! estimated at all. Completion tokens are the tokens of the answer's text, refusal, audio
//! transcript and tool-call names and arguments (a spoken answer's audio tokens cannot be
//! estimated from its transcript: the estimate is low).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{LazyLock, OnceLock, RwLock};

use crate::sync::{read, write};

use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// Texts longer than this (in bytes, all together) are counted on a blocking thread, so that a
/// runtime worker is never held for long.
pub const INLINE_COUNT_BYTES: usize = 64 * 1024;

/// Cookbook: every message is framed as `<|start|>{role}<|message|>{content}<|end|>`.
const TOKENS_PER_MESSAGE: u64 = 3;
/// Cookbook: a `name` costs one token on top of its text.
const TOKENS_PER_NAME: u64 = 1;
/// Cookbook: every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;
/// OpenAI's vision pricing, which Azure OpenAI's follows: a low-detail image costs the base; a
/// high- or automatic-detail one the base plus a tile's cost per 512-pixel tile of the image
/// scaled to fit 2048 × 2048 and then to 768 pixels on its shorter side. The image's size is not
/// read (it may be a URL), so such an image is counted as a square one's four tiles (a
/// 1024 × 1024 image's: 765 tokens on gpt-4o). gpt-4o-mini counts its images ≈ 33 times as many
/// tokens (2,833 and 5,667), so that they cost what gpt-4o's do.
const IMAGE_BASE_TOKENS: u64 = 85;
const IMAGE_TILE_TOKENS: u64 = 170;
const IMAGE_TILES_COUNTED: u64 = 4;
const MINI_IMAGE_BASE_TOKENS: u64 = 2_833;
const MINI_IMAGE_TILE_TOKENS: u64 = 5_667;
/// Cookbook (`num_tokens_for_tools`, gpt-4o constants): overhead per function definition.
const TOKENS_PER_FUNCTION: u64 = 7;
/// Cookbook (`num_tokens_for_tools`): overhead once after the function definitions.
const TOKENS_AFTER_FUNCTIONS: u64 = 12;

/// A tiktoken encoding the gateway counts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4-mini, gpt-oss (ordinary text is the same).
    O200kBase,
    /// gpt-4, gpt-4-turbo, gpt-3.5-turbo (`gpt-35-turbo` on Azure), text-embedding-*.
    Cl100kBase,
}

impl Encoding {
    /// The encoding of a model or Azure deployment name; `o200k_base` when the name says nothing.
    ///
    /// Uses `tiktoken-rs`'s model table first (exact names, then prefixes), then looks for a
    /// model family inside the name (deployments are often named `prod-gpt4o` or
    /// `gpt-4o-eastus`).
    pub fn for_model(model: &str) -> Encoding {
        let name = model.trim().to_ascii_lowercase();
        match get_tokenizer(&name) {
            Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) => return Encoding::O200kBase,
            // The p50k/r50k models are retired; their successors count with cl100k_base.
            Some(_) => return Encoding::Cl100kBase,
            None => {}
        }
        const O200K: &[&str] = &[
            "gpt-4o", "gpt4o", "4o-", "gpt-4.1", "gpt-41", "gpt4.1", "gpt-4.5", "gpt-5", "gpt5",
            "gpt-oss", "codex", "o1-", "o3-", "o4-",
        ];
        const CL100K: &[&str] = &[
            "gpt-4",
            "gpt4",
            "gpt-35",
            "gpt-3.5",
            "gpt35",
            "embedding",
            "ada-002",
            "davinci-002",
            "babbage-002",
        ];
        // Deployments often drop the dots and dashes (`gpt41-mini`, `prod_gpt45`): the name with
        // only its letters and digits is searched too, a `gpt41`/`gpt45` only when no digit
        // follows (`gpt-4-1106-preview` is a gpt-4).
        let squashed: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
        let squashed_family = |family: &str, digit_may_follow: bool| {
            squashed.match_indices(family).any(|(at, _)| {
                digit_may_follow
                    || !squashed[at + family.len()..].starts_with(|c: char| c.is_ascii_digit())
            })
        };
        if O200K.iter().any(|family| name.contains(family))
            || squashed_family("gpt4o", true)
            || squashed_family("gpt5", true)
            || squashed_family("gptoss", true)
            || squashed_family("gpt41", false)
            || squashed_family("gpt45", false)
        {
            Encoding::O200kBase
        } else if CL100K.iter().any(|family| name.contains(family)) {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    /// The encoding's name as tiktoken spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    fn cell(self) -> &'static OnceLock<Option<CoreBPE>> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Encoding::O200kBase => &O200K,
            Encoding::Cl100kBase => &CL100K,
        }
    }

    /// The BPE, loaded on first use (from ranks compiled into the binary).
    fn bpe(self) -> Option<&'static CoreBPE> {
        self.cell()
            .get_or_init(|| {
                let loaded = match self {
                    Encoding::O200kBase => tiktoken_rs::o200k_base(),
                    Encoding::Cl100kBase => tiktoken_rs::cl100k_base(),
                };
                loaded
                    .inspect_err(|error| {
                        tracing::error!(%error, encoding = self.name(), "could not load a tokenizer");
                    })
                    .ok()
            })
            .as_ref()
    }

    /// Whether the BPE is loaded already (loading takes long enough to keep off a runtime worker).
    pub fn is_loaded(self) -> bool {
        self.cell().get().is_some()
    }

    /// Loads the BPE now, so that the first estimate does not pay for it. Blocking.
    pub fn warm_up(self) {
        let _ = self.bpe();
    }

    /// Tokens of `text` as ordinary text (special-token markers in it count as text, as the API
    /// counts them in messages).
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        // System prompts, conversation history and role names come back on every call: count each
        // text once.
        let key = (self, text_digest(text), text.len());
        if let Some(count) = read(&REMEMBERED).get(&key) {
            return *count;
        }
        let count = self.count_now(text);
        let mut remembered = write(&REMEMBERED);
        if remembered.len() >= REMEMBERED_MAX {
            remembered.clear();
        }
        remembered.insert(key, count);
        count
    }

    /// Tokens of `text`, counted by the tokenizer now.
    fn count_now(self, text: &str) -> u64 {
        let counted = self.bpe().and_then(|bpe| {
            // The tokenizer's regex gives up (and tiktoken panics) on some pathological inputs,
            // e.g. a million `^`; such a text is counted by length instead.
            std::panic::catch_unwind(AssertUnwindSafe(|| bpe.encode_ordinary(text).len())).ok()
        });
        match counted {
            Some(count) => count as u64,
            None => rough_count(text),
        }
    }
}

/// Most remembered counts (each a few dozen bytes); beyond it the memory starts afresh.
const REMEMBERED_MAX: usize = 65_536;

/// Token counts of texts seen before, by encoding, a 128-bit digest of the text and its length.
/// A digest collision would only mis-estimate a reservation that the real usage then corrects.
static REMEMBERED: LazyLock<RwLock<HashMap<TextKey, u64>>> = LazyLock::new(RwLock::default);

/// Encoding, digest and length of a text.
type TextKey = (Encoding, u128, usize);

fn text_digest(text: &str) -> u128 {
    use std::hash::{BuildHasher, Hasher};
    // Two independent SipHash keys per process: an attacker cannot aim for collisions.
    static KEYS: LazyLock<(std::hash::RandomState, std::hash::RandomState)> =
        LazyLock::new(|| (std::hash::RandomState::new(), std::hash::RandomState::new()));
    let mut first = KEYS.0.build_hasher();
    let mut second = KEYS.1.build_hasher();
    first.write(text.as_bytes());
    second.write(text.as_bytes());
    (u128::from(first.finish()) << 64) | u128::from(second.finish())
}

/// About four bytes per token: the fallback when the tokenizer cannot be used.
fn rough_count(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// What to count for one call: texts plus fixed overheads, for the prompt and the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenWork {
    encoding: Encoding,
    prompt: Tally,
    completion: Tally,
}

/// Texts to tokenize and tokens already known.
#[derive(Debug, Clone, Default, PartialEq)]
struct Tally {
    texts: Vec<String>,
    fixed: u64,
    /// Whether images are counted at gpt-4o-mini's rates.
    mini_images: bool,
}

impl Tally {
    /// An empty tally for a call to `model`.
    fn for_model(model: &str) -> Tally {
        Tally {
            mini_images: model.to_ascii_lowercase().contains("4o-mini"),
            ..Tally::default()
        }
    }

    /// Counts an image part (see [`IMAGE_BASE_TOKENS`]): its `detail` is the chat part's
    /// `image_url.detail` or the Responses part's `detail`.
    fn image(&mut self, part: &Value) {
        let detail = part
            .pointer("/image_url/detail")
            .or_else(|| part.get("detail"))
            .and_then(Value::as_str);
        let (base, tile) = if self.mini_images {
            (MINI_IMAGE_BASE_TOKENS, MINI_IMAGE_TILE_TOKENS)
        } else {
            (IMAGE_BASE_TOKENS, IMAGE_TILE_TOKENS)
        };
        self.fixed += match detail {
            Some("low") => base,
            _ => base + IMAGE_TILES_COUNTED * tile,
        };
    }

    fn text(&mut self, text: &str) {
        if !text.is_empty() {
            self.texts.push(text.to_owned());
        }
    }

    fn value_text(&mut self, value: Option<&Value>) {
        if let Some(text) = value.and_then(Value::as_str) {
            self.text(text);
        }
    }

    fn bytes(&self) -> usize {
        self.texts.iter().map(String::len).sum()
    }

    fn count(&self, encoding: Encoding) -> u64 {
        self.fixed
            + self
                .texts
                .iter()
                .map(|text| encoding.count(text))
                .sum::<u64>()
    }
}

impl TokenWork {
    /// What an inference call's tokens are: the prompt from the request, the completion from the
    /// (possibly reassembled, possibly partial) response. `None` for operations whose tokens the
    /// gateway does not estimate (images, audio, assistants runs).
    ///
    /// The encoding follows the response's `model`, else the request's, else `fallback_model`
    /// (the deployment name).
    pub fn plan(
        operation: OperationId,
        request: Option<&Value>,
        response: Option<&Value>,
        fallback_model: Option<&str>,
    ) -> Option<TokenWork> {
        fn model_of(value: Option<&Value>) -> Option<&str> {
            value
                .and_then(|v| v.get("model"))
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
        }
        let model = model_of(response)
            .or_else(|| model_of(request))
            .or(fallback_model)
            .unwrap_or_default();
        let mut prompt = Tally::for_model(model);
        let mut completion = Tally::for_model(model);
        match operation {
            OperationId::ChatCompletionsCreate => {
                if let Some(request) = request {
                    chat_prompt(&mut prompt, request);
                }
                if let Some(response) = response {
                    chat_completion(&mut completion, response);
                }
            }
            OperationId::CompletionsCreate => {
                if let Some(request) = request {
                    token_input(&mut prompt, request.get("prompt"));
                }
                for choice in choices(response) {
                    completion.value_text(choice.get("text"));
                }
            }
            OperationId::EmbeddingsCreate => {
                if let Some(request) = request {
                    token_input(&mut prompt, request.get("input"));
                }
            }
            OperationId::CreateResponse => {
                if let Some(request) = request {
                    responses_prompt(&mut prompt, request);
                }
                if let Some(response) = response {
                    responses_output(&mut completion, response);
                }
            }
            _ => return None,
        }
        Some(TokenWork {
            encoding: Encoding::for_model(model),
            prompt,
            completion,
        })
    }

    /// The encoding the counts use.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Bytes of text to tokenize.
    pub fn bytes(&self) -> usize {
        self.prompt.bytes() + self.completion.bytes()
    }

    /// Counts, on this thread (CPU-bound; see [`TokenWork::count_off_path`]).
    pub fn count(&self) -> TokenUsage {
        let prompt_tokens = self.prompt.count(self.encoding);
        let completion_tokens = self.completion.count(self.encoding);
        TokenUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached_tokens: 0,
            reasoning_tokens: 0,
            is_estimate: true,
        }
    }

    /// Counts without holding a runtime worker for long: inline when the texts are short and the
    /// encoding is loaded, else on a blocking thread. `None` only when that thread could not run.
    pub async fn count_off_path(self) -> Option<TokenUsage> {
        if self.bytes() <= INLINE_COUNT_BYTES && self.encoding.is_loaded() {
            return Some(self.count());
        }
        match tokio::task::spawn_blocking(move || self.count()).await {
            Ok(usage) => Some(usage),
            Err(error) => {
                tracing::warn!(%error, "token estimate failed");
                None
            }
        }
    }
}

/// Tokens of chat messages (and tool definitions), counted as the cookbook counts them.
fn chat_prompt(tally: &mut Tally, request: &Value) {
    let messages = request.get("messages").and_then(Value::as_array);
    for message in messages.into_iter().flatten() {
        chat_message(tally, message);
    }
    tally.fixed += REPLY_PRIMING;
    let tools = request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| tool.get("function"));
    let functions = request
        .get("functions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let mut any = false;
    for function in tools.chain(functions) {
        any = true;
        tally.fixed += TOKENS_PER_FUNCTION;
        tally.value_text(function.get("name"));
        tally.value_text(function.get("description"));
        if let Some(parameters) = function.get("parameters").filter(|p| !p.is_null()) {
            tally.text(&parameters.to_string());
        }
    }
    if any {
        tally.fixed += TOKENS_AFTER_FUNCTIONS;
    }
}

/// One message: 3 framing tokens, every string value, 1 more for a name; content parts, tool
/// calls and function calls by their text.
fn chat_message(tally: &mut Tally, message: &Value) {
    let Some(fields) = message.as_object() else {
        return;
    };
    tally.fixed += TOKENS_PER_MESSAGE;
    for (key, value) in fields {
        match value {
            Value::String(text) => {
                tally.text(text);
                if key == "name" {
                    tally.fixed += TOKENS_PER_NAME;
                }
            }
            Value::Array(parts) if key == "content" => content_parts(tally, parts),
            Value::Array(calls) if key == "tool_calls" => {
                for call in calls {
                    function_call(tally, call.get("function"));
                }
            }
            Value::Object(_) if key == "function_call" => function_call(tally, Some(value)),
            _ => {}
        }
    }
}

fn function_call(tally: &mut Tally, function: Option<&Value>) {
    if let Some(function) = function {
        tally.value_text(function.get("name"));
        tally.value_text(function.get("arguments"));
    }
}

/// Content parts of chat and Responses messages: text by its tokens, images by their detail.
fn content_parts(tally: &mut Tally, parts: &[Value]) {
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("image_url" | "input_image" | "image_file") => tally.image(part),
            _ => {
                tally.value_text(part.get("text"));
                tally.value_text(part.get("refusal"));
            }
        }
    }
}

/// Completions' `prompt` and embeddings' `input`: a string, strings, or token ids (counted as
/// given).
fn token_input(tally: &mut Tally, input: Option<&Value>) {
    match input {
        Some(Value::String(text)) => tally.text(text),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(text) => tally.text(text),
                    Value::Number(_) => tally.fixed += 1,
                    Value::Array(ids) => tally.fixed += ids.len() as u64,
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn choices(response: Option<&Value>) -> impl Iterator<Item = &Value> {
    response
        .and_then(|r| r.get("choices"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The answer's text: content, refusal, tool-call names and arguments of every choice.
fn chat_completion(tally: &mut Tally, response: &Value) {
    for choice in choices(Some(response)) {
        let Some(message) = choice.get("message").or_else(|| choice.get("delta")) else {
            continue;
        };
        tally.value_text(message.get("content"));
        tally.value_text(message.get("refusal"));
        // A spoken answer's words (its audio tokens, which are billed higher, are not known).
        tally.value_text(message.pointer("/audio/transcript"));
        for call in message
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            function_call(tally, call.get("function"));
        }
        function_call(tally, message.get("function_call"));
    }
}

/// Responses API input: `instructions` and `input` (a string, or items), as chat messages.
fn responses_prompt(tally: &mut Tally, request: &Value) {
    if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
        tally.fixed += TOKENS_PER_MESSAGE + 1;
        tally.text(instructions);
    }
    match request.get("input") {
        Some(Value::String(text)) => {
            tally.fixed += TOKENS_PER_MESSAGE + 1;
            tally.text(text);
        }
        Some(Value::Array(items)) => {
            for item in items {
                match item.get("type").and_then(Value::as_str) {
                    None | Some("message") => {
                        tally.fixed += TOKENS_PER_MESSAGE;
                        tally.value_text(item.get("role"));
                        match item.get("content") {
                            Some(Value::String(text)) => tally.text(text),
                            Some(Value::Array(parts)) => content_parts(tally, parts),
                            _ => {}
                        }
                    }
                    Some(_) => {
                        for key in ["name", "arguments", "output"] {
                            tally.value_text(item.get(key));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    tally.fixed += REPLY_PRIMING;
}

/// Responses API output items: message text, refusals, function calls, reasoning summaries.
fn responses_output(tally: &mut Tally, response: &Value) {
    for item in response
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for key in ["name", "arguments"] {
            tally.value_text(item.get(key));
        }
        for list in ["content", "summary"] {
            if let Some(parts) = item.get(list).and_then(Value::as_array) {
                content_parts(tally, parts);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn images_count_by_their_detail_and_the_models_rates() {
        let prompt = |model: &str, detail: Option<&str>| {
            let mut image =
                json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}});
            if let Some(detail) = detail {
                image["image_url"]["detail"] = json!(detail);
            }
            let request =
                json!({"model": model, "messages": [{"role": "user", "content": [image]}]});
            TokenWork::plan(
                OperationId::ChatCompletionsCreate,
                Some(&request),
                None,
                None,
            )
            .unwrap()
            .count()
            .prompt_tokens
        };
        // The message framing, its role and the reply priming: 3 + 1 + 3 tokens.
        assert_eq!(prompt("gpt-4o", Some("low")), 85 + 7);
        assert_eq!(prompt("gpt-4o", Some("high")), 765 + 7);
        assert_eq!(prompt("gpt-4o", None), 765 + 7);
        assert_eq!(prompt("gpt-4o-mini", Some("low")), 2_833 + 7);
        assert_eq!(prompt("GPT-4o-mini-2024-07-18", Some("auto")), 25_501 + 7);
        // A Responses input image names its detail on the part.
        let request = json!({"model": "gpt-4.1", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"}]}]});
        let work =
            TokenWork::plan(OperationId::CreateResponse, Some(&request), None, None).unwrap();
        assert!(work.count().prompt_tokens < 100);
    }

    #[test]
    fn hello_world_is_two_tokens_in_both_encodings() {
        assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
        assert_eq!(Encoding::O200kBase.count(""), 0);
    }

    #[test]
    fn known_counts_from_tiktoken() {
        // tiktoken's own examples: "tiktoken is great!" is 6 tokens in cl100k_base, and the
        // classic "antidisestablishmentarianism" is 6 in cl100k_base.
        assert_eq!(Encoding::Cl100kBase.count("tiktoken is great!"), 6);
        assert_eq!(
            Encoding::Cl100kBase.count("antidisestablishmentarianism"),
            6
        );
        // Special-token markers in text are text, not one special token.
        assert!(Encoding::Cl100kBase.count("<|endoftext|>") > 1);
    }

    #[test]
    fn encodings_follow_the_model_name() {
        for model in [
            "gpt-4o",
            "gpt-4o-2024-08-06",
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "gpt-5",
            "o3-mini",
            "o1",
            "prod-gpt4o",
            "gpt41",
            "gpt41-mini",
            "GPT41Nano",
            "prod_gpt45",
            "gpt5mini",
            "gpt51",
            "gpt_oss_120b",
            "my-deployment",
            "",
        ] {
            assert_eq!(Encoding::for_model(model), Encoding::O200kBase, "{model}");
        }
        for model in [
            "gpt-4",
            "gpt-4-0613",
            "gpt-35-turbo",
            "gpt-35-turbo-16k",
            "gpt-3.5-turbo",
            "text-embedding-ada-002",
            "text-embedding-3-small",
            "team-gpt4-turbo",
            "GPT-4",
            "gpt-4-1106-preview",
            "prod-gpt4-1106",
            "gpt4-32k",
            "gpt35turbo",
        ] {
            assert_eq!(Encoding::for_model(model), Encoding::Cl100kBase, "{model}");
        }
    }

    /// The cookbook's example conversation; the notebook reports 129 prompt tokens for gpt-4 /
    /// gpt-3.5-turbo (cl100k_base) and 124 for gpt-4o (o200k_base), both as counted by its
    /// function and by the API.
    fn cookbook_messages() -> Value {
        json!({"messages": [
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ]})
    }

    #[test]
    fn chat_prompts_count_as_the_cookbook_counts_them() {
        let request = cookbook_messages();
        for (model, expected) in [("gpt-4", 129), ("gpt-35-turbo", 129), ("gpt-4o", 124)] {
            let work = TokenWork::plan(
                OperationId::ChatCompletionsCreate,
                Some(&request),
                None,
                Some(model),
            )
            .unwrap();
            let usage = work.count();
            assert_eq!(usage.prompt_tokens, expected, "{model}");
            assert_eq!(usage.completion_tokens, 0);
            assert!(usage.is_estimate);
        }
    }

    #[test]
    fn completions_count_text_tool_calls_refusals_and_transcripts() {
        let response = json!({
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hello world"}},
                {"index": 1, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]}},
                {"index": 2, "message": {"role": "assistant", "content": null, "audio": {
                    "id": "audio_1", "expires_at": 1_700_000_000, "transcript": "spoken words"
                }}},
            ],
        });
        let usage = TokenWork::plan(
            OperationId::ChatCompletionsCreate,
            None,
            Some(&response),
            None,
        )
        .unwrap()
        .count();
        let o200k = Encoding::O200kBase;
        assert_eq!(
            usage.completion_tokens,
            o200k.count("hello world")
                + o200k.count("get_weather")
                + o200k.count("{\"city\":\"Oslo\"}")
                + o200k.count("spoken words")
        );
        assert_eq!(usage.prompt_tokens, 0, "no request, no prompt");
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );
    }

    #[test]
    fn embeddings_and_legacy_prompts_take_strings_and_token_ids() {
        let strings = json!({"input": ["hello world", "hello world"]});
        let ids = json!({"input": [[1, 2, 3], [4, 5]]});
        let plan = |request: &Value| {
            TokenWork::plan(
                OperationId::EmbeddingsCreate,
                Some(request),
                None,
                Some("text-embedding-3-small"),
            )
            .unwrap()
            .count()
        };
        assert_eq!(plan(&strings).prompt_tokens, 4);
        assert_eq!(plan(&ids).prompt_tokens, 5);
        assert_eq!(plan(&ids).total_tokens, 5);
        let completion = TokenWork::plan(
            OperationId::CompletionsCreate,
            Some(&json!({"prompt": "hello world"})),
            Some(&json!({"choices": [{"text": "hello world"}]})),
            Some("gpt-35-turbo-instruct"),
        )
        .unwrap();
        assert_eq!(completion.encoding(), Encoding::Cl100kBase);
        let usage = completion.count();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (2, 2));
    }

    #[test]
    fn responses_count_input_items_and_output_text() {
        let request = json!({"model": "gpt-4o", "instructions": "Be terse.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
        ]});
        let response = json!({"model": "gpt-4o", "output": [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello world"}]},
        ]});
        let usage = TokenWork::plan(
            OperationId::CreateResponse,
            Some(&request),
            Some(&response),
            None,
        )
        .unwrap()
        .count();
        let o200k = Encoding::O200kBase;
        assert_eq!(usage.completion_tokens, 2);
        // instructions as a message (3 + role 1 + text), the user message (3 + role + text), priming
        assert_eq!(
            usage.prompt_tokens,
            (3 + 1 + o200k.count("Be terse.")) + (3 + o200k.count("user") + 2) + 3
        );
    }

    #[test]
    fn other_operations_are_not_estimated() {
        assert!(TokenWork::plan(OperationId::ImageGenerationsCreate, None, None, None).is_none());
    }

    #[test]
    fn pathological_text_falls_back_to_a_rough_count() {
        // Long runs of one punctuation character once made tiktoken's regex give up.
        let text = "^".repeat(200_000);
        let count = Encoding::Cl100kBase.count(&text);
        assert!(count > 0 && count <= 200_000, "{count}");
    }

    #[tokio::test]
    async fn large_texts_are_counted_on_a_blocking_thread() {
        let request =
            json!({"messages": [{"role": "user", "content": "hello world ".repeat(10_000)}]});
        let work = TokenWork::plan(
            OperationId::ChatCompletionsCreate,
            Some(&request),
            None,
            Some("gpt-4o"),
        )
        .unwrap();
        assert!(work.bytes() > INLINE_COUNT_BYTES);
        let usage = work.count_off_path().await.unwrap();
        // "hello world " x 10 000: 2 tokens per repetition, give or take the joins.
        assert!(
            (19_000..=21_000).contains(&usage.prompt_tokens),
            "{usage:?}"
        );
    }
}
