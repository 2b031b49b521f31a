//! Realistic audit records for the store benchmarks: chat-completion calls as the gateway records
//! them, with varied users, addresses, groups, subscriptions, deployments and text, linked into a
//! hash chain as the audit writer links them. Deterministic for a seed.

use gatehouse_audit::chain::Chainer;
use gatehouse_schema::audit::{BackendAttempt, TokenUsage};
use gatehouse_schema::{AuditRecord, OperationId};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The command-line options of a benchmark that makes chat records of fixed text sizes
/// (`--prompt-bytes`, `--completion-bytes`, `--seed`).
#[derive(Debug, Clone, clap::Args)]
pub struct TextArgs {
    /// Bytes of the prompt (`RequestMessages` JSON).
    #[arg(long, default_value_t = 2048)]
    pub prompt_bytes: usize,
    /// Bytes of the completion (`ResponseMessages` JSON).
    #[arg(long, default_value_t = 2048)]
    pub completion_bytes: usize,
    /// Seed of the record generator.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl TextArgs {
    /// `records` records of these sizes over the last hour, from `users` users.
    pub fn shape(&self, records: usize, users: usize, vary_sizes: bool) -> Shape {
        Shape {
            seed: self.seed,
            records,
            spread: time::Duration::hours(1),
            prompt_bytes: self.prompt_bytes,
            completion_bytes: self.completion_bytes,
            users,
            vary_sizes,
        }
    }
}

/// What the generated records look like.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Seed of the generator: the same seed gives the same records.
    pub seed: u64,
    /// How many records the run will ask for (spreads `TimeGenerated` evenly).
    pub records: usize,
    /// `TimeGenerated` runs over this span, ending at the `now` given to [`Generator::new`].
    pub spread: time::Duration,
    /// Bytes of the prompt (`RequestMessages` JSON).
    pub prompt_bytes: usize,
    /// Bytes of the completion (`ResponseMessages` JSON).
    pub completion_bytes: usize,
    /// Distinct users (each with a fixed address, subscription and groups).
    pub users: usize,
    /// Vary each text between a quarter and 1.75 times its size (mean: the size), as real
    /// prompts vary; otherwise every text has exactly its size.
    pub vary_sizes: bool,
}

/// Groups users belong to (1–3 each), by display name.
pub const GROUPS: &[&str] = &[
    "finance",
    "engineering",
    "support",
    "legal",
    "sales",
    "marketing",
    "hr",
    "research",
    "platform",
    "security",
    "data",
    "leadership",
];

/// The user name of user number `n` (`user{n:03}@contoso.com`).
pub fn user_name(n: usize) -> String {
    format!("user{n:03}@contoso.com")
}

/// The caller address of user number `n`: IPv4 in 10.20.0.0/13 for most, IPv6 for every seventh.
pub fn caller_ip(n: usize) -> String {
    if n.is_multiple_of(7) {
        format!("2001:db8:{:x}::{:x}", n % 16, n)
    } else {
        format!("10.{}.{}.{}", 20 + n % 8, n / 8 % 250, 1 + n % 250)
    }
}

/// SplitMix64: small, fast, deterministic, good enough to vary test data.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// The vocabulary of prompts and completions (whitespace-separated).
const WORDS: &str = "\
    the invoice customer account quarter revenue contract supplier order shipment delay \
    payment policy report summary table region forecast budget variance approval manager team \
    project deadline risk issue meeting notes action items review draft email reply translate \
    german french explain compare options benefits costs migration database query index \
    latency service outage incident root cause timeline customer impact mitigation follow up \
    with and or for from about please could you write a short detailed clear answer list of \
    three five steps to in on by each every month week year previous next current total \
    average median growth decline percent million thousand europe americas asia pacific north \
    south sales marketing legal finance engineering support ticket escalation priority \
    severity owner status open closed pending resolved warehouse inventory stock units price \
    discount margin tax audit compliance security access identity tenant subscription quota \
    limit throttle retry backoff deployment model prompt completion tokens context window \
    document paragraph section heading bullet points tone formal friendly concise include \
    exclude assume given that this these those which when where why how what is are was were \
    will should must can not only also but because therefore however although kubernetes \
    cluster node pod container image pipeline build release rollback feature flag experiment \
    dashboard metric alert threshold schema column row join filter group sort export csv json \
    yaml python rust function error exception stack trace log line file path config setting \
    default";

const SYSTEM_PROMPTS: &[&str] = &[
    "You are a helpful assistant for Contoso's finance team. Answer precisely and cite the figures you use.",
    "You are an engineering assistant. Prefer short, correct answers with code where it helps.",
    "You are a support agent assistant. Be friendly, summarise the ticket, propose next steps.",
    "You are a legal drafting assistant. Use formal language and flag anything that needs review.",
];

/// (deployment, model that answers, backend members)
const DEPLOYMENTS: &[(&str, &str)] = &[
    ("gpt-4o", "gpt-4o-2024-11-20"),
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ("gpt-4.1", "gpt-4.1-2025-04-14"),
    ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
    ("o3-mini", "o3-mini-2025-01-31"),
];

const BACKENDS: &[(&str, &str)] = &[
    ("swedencentral-1", "https://contoso-swc-1.openai.azure.com"),
    ("swedencentral-2", "https://contoso-swc-2.openai.azure.com"),
    ("francecentral-1", "https://contoso-frc-1.openai.azure.com"),
    ("eastus2-1", "https://contoso-eus2-1.openai.azure.com"),
];

const API_VERSIONS: &[&str] = &["2024-10-21", "2025-01-01-preview", "2024-06-01"];

/// Builds realistic chat-completion audit records.
pub struct Generator {
    rng: Rng,
    words: Vec<&'static str>,
    chainer: Chainer,
    /// `TimeGenerated` of record 0; records are spread evenly from there up to `now`.
    first: OffsetDateTime,
    /// Nanoseconds between consecutive records.
    step_ns: i64,
    prompt_bytes: usize,
    completion_bytes: usize,
    users: usize,
    vary_sizes: bool,
}

impl Generator {
    /// A generator of `shape`'s records, the last of which is about `now`.
    pub fn new(shape: &Shape, now: OffsetDateTime) -> Generator {
        let step_ns =
            i64::try_from(shape.spread.whole_nanoseconds() / (shape.records.max(1) as i128))
                .unwrap_or(i64::MAX);
        Generator {
            rng: Rng(shape.seed),
            words: WORDS.split_whitespace().collect(),
            chainer: Chainer::in_memory(),
            first: now - shape.spread,
            step_ns,
            prompt_bytes: shape.prompt_bytes,
            completion_bytes: shape.completion_bytes,
            users: shape.users.max(1),
            vary_sizes: shape.vary_sizes,
        }
    }

    /// `count` records numbered from `start`, linked into their hash chain as the audit writer
    /// does before it hands a batch to the store.
    pub fn batch(&mut self, start: usize, count: usize) -> Vec<AuditRecord> {
        (start..start + count)
            .map(|i| {
                let mut record = self.record(i);
                self.chainer.link(&mut record);
                record
            })
            .collect()
    }

    /// `bytes`, or a size between a quarter and 1.75 times it when sizes vary.
    fn size(&mut self, bytes: usize) -> usize {
        if self.vary_sizes && bytes >= 4 {
            bytes / 4 + self.rng.below(bytes * 3 / 2)
        } else {
            bytes
        }
    }

    /// Text of about `bytes` bytes of words and the odd number, no character JSON escapes.
    fn text(&mut self, bytes: usize) -> String {
        let mut text = String::with_capacity(bytes + 16);
        let mut sentence_start = true;
        while text.len() < bytes {
            if !text.is_empty() {
                text.push(' ');
            }
            if self.rng.chance(4) {
                // Order numbers, amounts, ids: the distinct terms a full-text index must hold.
                let n = self.rng.below(1_000_000);
                match self.rng.below(3) {
                    0 => text.push_str(&format!("INV-{n:06}")),
                    1 => text.push_str(&format!("{}.{:02}", n / 100, n % 100)),
                    _ => text.push_str(&format!("ticket-{n}")),
                }
            } else {
                let word = *self.rng.pick(&self.words);
                if sentence_start {
                    let mut chars = word.chars();
                    if let Some(first) = chars.next() {
                        text.extend(first.to_uppercase());
                        text.push_str(chars.as_str());
                    }
                } else {
                    text.push_str(word);
                }
            }
            sentence_start = self.rng.chance(8);
            if sentence_start {
                text.push('.');
            }
        }
        text.truncate(bytes);
        text
    }

    /// A JSON messages array of `bytes` bytes (or just over, when `bytes` is below its skeleton).
    fn messages(&mut self, bytes: usize, make: impl Fn(String) -> Value) -> (Value, String) {
        let skeleton = make(String::new()).to_string().len();
        let content = self.text(bytes.saturating_sub(skeleton));
        let value = make(content);
        let text = value.to_string();
        (value, text)
    }

    /// Record number `i` (not linked into the chain).
    pub fn record(&mut self, i: usize) -> AuditRecord {
        let rng = &mut self.rng;
        let mut id_bytes = [0u8; 16];
        id_bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        id_bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        let jitter_ms = rng.below(2_000) as i64;
        let time_generated = self.first
            + time::Duration::nanoseconds(self.step_ns.saturating_mul(i as i64))
            + time::Duration::milliseconds(jitter_ms);
        // A time-ordered (version 7) UUID of the call's time, as the gateway makes them.
        let millis = u64::try_from(time_generated.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let mut random = [0u8; 10];
        random.copy_from_slice(&id_bytes[..10]);
        let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();

        let user = rng.below(self.users);
        let user_name = user_name(user);
        let user_id = format!("{:08x}-0000-4000-8000-{:012x}", user * 7_919, user);
        let tenant = if user.is_multiple_of(10) {
            "72f988bf-86f1-41af-91ab-2d7cd011db47"
        } else {
            "b4c1a6e2-5d3f-4e8a-9c21-0f6d7e8a9b10"
        };
        let mut groups: Vec<String> = Vec::new();
        for k in 0..1 + user % 3 {
            let group = GROUPS[(user + k * 5) % GROUPS.len()];
            if !groups.iter().any(|g| g == group) {
                groups.push(group.to_owned());
            }
        }
        let caller_ip = caller_ip(user);
        let subscription = format!("team-{:02}", user % 24);
        let (deployment, model) = *rng.pick(DEPLOYMENTS);
        let api_version = *rng.pick(API_VERSIONS);
        let stream = rng.chance(35);
        let system = *rng.pick(SYSTEM_PROMPTS);

        let prompt_bytes = self.size(self.prompt_bytes);
        let completion_bytes = self.size(self.completion_bytes);
        let (prompt_value, request_messages) = self.messages(prompt_bytes, |content| {
            json!([
                {"role": "system", "content": system},
                {"role": "user", "content": content},
            ])
        });
        let rng = &mut self.rng;
        let mut request_body = json!({
            "messages": prompt_value,
            "temperature": 0.2 + (rng.below(8) as f64) / 10.0,
            "max_tokens": 1024,
            "stream": stream,
        });
        if stream {
            request_body["stream_options"] = json!({"include_usage": true});
        }
        let request_body = request_body.to_string();

        let (completion_value, response_messages) = self.messages(
            completion_bytes,
            |content| json!([{"role": "assistant", "content": content}]),
        );
        let rng = &mut self.rng;
        let prompt_tokens = (request_messages.len() / 4 + rng.below(60)) as u64;
        let completion_tokens = (response_messages.len() / 4 + rng.below(60)) as u64;
        let cached_tokens = if rng.chance(20) { 256 } else { 0 };
        let reasoning_tokens = if deployment.starts_with('o') {
            (rng.below(4) * 128) as u64
        } else {
            0
        };
        let created = time_generated.unix_timestamp();
        let filter = json!({
            "hate": {"filtered": false, "severity": "safe"},
            "self_harm": {"filtered": false, "severity": "safe"},
            "sexual": {"filtered": false, "severity": "safe"},
            "violence": {"filtered": false, "severity": "safe"},
        });
        let content = completion_value
            .get(0)
            .and_then(|m| m.get("content"))
            .cloned()
            .unwrap_or(Value::Null);
        let response_body = json!({
            "id": format!("chatcmpl-{}", id.simple()),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": format!("fp_{:010x}", rng.next_u64() >> 24),
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filter}],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
                "content_filter_results": filter,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            },
        })
        .to_string();

        // 3 % of calls were throttled by a first member and answered by another.
        let first_backend = rng.below(BACKENDS.len());
        let failover = rng.chance(3);
        let backend = if failover {
            (first_backend + 1) % BACKENDS.len()
        } else {
            first_backend
        };
        let backend_ms = 400 + rng.below(6_000) as u64;
        let mut attempts = Vec::new();
        if failover {
            attempts.push(BackendAttempt {
                backend_id: BACKENDS[first_backend].0.to_owned(),
                status: Some(429),
                elapsed_ms: 30 + rng.below(80) as u64,
                error: Some("throttled: retry-after-ms 2000".to_owned()),
            });
        }
        attempts.push(BackendAttempt {
            backend_id: BACKENDS[backend].0.to_owned(),
            status: Some(200),
            elapsed_ms: backend_ms,
            error: None,
        });
        let path =
            format!("/openai/deployments/{deployment}/chat/completions?api-version={api_version}");
        let response_size = if stream {
            // SSE framing costs about twice the JSON.
            (response_body.len() * 2) as u64
        } else {
            response_body.len() as u64
        };
        let first_byte = if stream {
            200 + rng.below(600) as u64
        } else {
            backend_ms + 1
        };

        AuditRecord {
            time_generated,
            correlation_id: id.to_string(),
            gateway_id: "gw-bench".to_owned(),
            operation_id: Some(OperationId::ChatCompletionsCreate),
            caller_ip_address: caller_ip,
            peer_ip_address: "10.0.0.4".to_owned(),
            method: "POST".to_owned(),
            url: path.clone(),
            client_protocol: if rng.chance(30) { "HTTP/2" } else { "HTTP/1.1" }.to_owned(),
            response_code: 200,
            is_request_success: true,
            backend_response_code: Some(200),
            backend_id: Some(BACKENDS[backend].0.to_owned()),
            backend_url: Some(format!("{}{path}", BACKENDS[backend].1)),
            request_size: request_body.len() as u64,
            response_size,
            total_time: backend_ms + 3 + rng.below(20) as u64,
            backend_time: backend_ms,
            time_to_first_byte: Some(first_byte),
            // A stream's first token follows Azure's opening prompt-filter event; an answer sent
            // whole has none.
            time_to_first_token: stream.then_some(first_byte + 40),
            apim_subscription_id: Some(subscription),
            product_id: Some(
                if user.is_multiple_of(5) {
                    "premium"
                } else {
                    "standard"
                }
                .to_owned(),
            ),
            user_id: Some(user_id),
            user_name: Some(user_name),
            tenant_id: Some(tenant.to_owned()),
            groups,
            deployment_name: Some(deployment.to_owned()),
            model_name: Some(model.to_owned()),
            api_version: Some(api_version.to_owned()),
            is_stream_completion: stream,
            usage: Some(TokenUsage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
                cached_tokens,
                reasoning_tokens,
                is_estimate: false,
            }),
            attempts,
            backend_request_body: Some(request_body),
            request_body_truncated: false,
            backend_response_body: Some(response_body),
            response_body_truncated: false,
            request_messages: Some(request_messages),
            response_messages: Some(response_messages),
            client_aborted: false,
            last_error_reason: None,
            last_error_message: None,
            chain: None,
        }
    }
}
