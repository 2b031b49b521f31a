//! Model work that goes on after its call: a background response, an Assistants run or an eval
//! run, answered while still queued, in progress or waiting for tool outputs.
//!
//! Its usage is known only when a later call sees the object end — a poll (`GET` of the response
//! or the run), a cancel, tool outputs submitted, a resumed stream. The call that started the
//! work leaves an entry here, keyed by the object's id: the tokens usage limits reserved for it
//! and the deployment it runs. The first later call whose answer shows the object ended takes the
//! entry (once: in the limits' Redis, when one is configured, by a script that reads and deletes
//! it, so across replicas), settles the reservation with the usage the object reports, and
//! carries that usage on its own audit record. So the work is counted once, exactly, in the limits and in the usage figures,
//! and a poll of an object whose work was already counted (by its stream, or by an earlier
//! poll) adds nothing.
//!
//! An entry no call takes expires after [`ENTRY_LIFETIME`] and its reservation stays charged,
//! as it does when the store fails (the call that started the work keeps its estimate).
//! Entries kept in this process are lost with it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use http::StatusCode;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::classify::Call;
use crate::limits::Reservation;
use crate::settings::LimitSettings;
use crate::warning_throttle::WarningThrottle;

/// How long an entry waits for a call that sees its object end. Runs that wait for tool outputs
/// expire after ten minutes; background responses are polled within minutes to hours.
pub(crate) const ENTRY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The most entries kept in this process; past it, new work is not followed (its reservation
/// stays charged and its usage off the usage figures, as without this module).
const MAX_LOCAL_ENTRIES: usize = 100_000;

/// How often a failing store is logged.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// What a call that started work leaves for the call that sees it end.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The tokens usage limits reserved for the work.
    pub(crate) reservation: Option<Reservation>,
    /// The deployment that runs it.
    pub(crate) deployment: Option<String>,
}

/// What a finished call's answer says about work that goes on after a call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Follow {
    /// The call started (or continued) work that is not over: it leaves an entry for `id`.
    Leave {
        /// The response or run.
        id: String,
        /// The deployment that runs it.
        deployment: Option<String>,
        /// The call created the object: its entry replaces one that tool outputs answered
        /// before the create's was left. Tool outputs leave theirs only where none is.
        starts: bool,
    },
    /// The call saw the work of `id` ended, with `usage` when the object reports it.
    Ended {
        /// The response or run.
        id: String,
        /// What the whole work used.
        usage: Option<TokenUsage>,
    },
}

/// Whether the answers of calls of `operation` can show deferred work ended, so that the proxy
/// keeps their answer as JSON for [`follow`].
pub(crate) fn reports_on(operation: OperationId) -> bool {
    use OperationId as Op;
    matches!(
        operation,
        Op::CreateResponse
            | Op::GetResponse
            | Op::CancelResponse
            | Op::CreateRun
            | Op::CreateThreadAndRun
            | Op::GetRun
            | Op::CancelRun
            | Op::SubmitToolOutputsToRun
            | Op::CreateEvalRun
            | Op::GetEvalRun
            | Op::CancelEvalRun
    )
}

/// Whether an answer of `operation` whose text is `body` may say something of deferred work,
/// judged from its top-level `status` alone (an object opens with it, before its large parts),
/// so that only those answers are parsed whole: a create or tool outputs still running, a fetch
/// or cancel of an object that has ended.
pub(crate) fn may_follow(operation: OperationId, body: &[u8]) -> bool {
    use OperationId as Op;
    if !reports_on(operation) {
        return false;
    }
    let Some(status) = crate::peek::leading_member_str(body, "status") else {
        return false;
    };
    let running = RUNNING.contains(&status.as_str());
    match operation {
        Op::SubmitToolOutputsToRun => true,
        Op::CreateResponse | Op::CreateRun | Op::CreateThreadAndRun | Op::CreateEvalRun => running,
        _ => !running,
    }
}

/// The statuses of a response, a run or an eval run whose work goes on.
const RUNNING: [&str; 4] = ["queued", "in_progress", "requires_action", "cancelling"];

/// The statuses of a response, a run or an eval run whose work has ended.
const ENDED: [&str; 6] = [
    "completed",
    "failed",
    "incomplete",
    "cancelled",
    "canceled",
    "expired",
];

/// What `answer`, a successful answer of `call` (as one JSON object: a stream reassembled), says
/// about deferred work.
pub(crate) fn follow(call: &Call, status: StatusCode, answer: Option<&Value>) -> Option<Follow> {
    use OperationId as Op;
    if !status.is_success() || !reports_on(call.operation) {
        return None;
    }
    let answer = answer?;
    let object = answer.get("object").and_then(Value::as_str)?;
    if !matches!(object, "response" | "thread.run" | "eval.run") {
        return None;
    }
    let id = answer.get("id").and_then(Value::as_str)?.to_owned();
    let status = answer.get("status").and_then(Value::as_str)?;
    let running = match () {
        () if RUNNING.contains(&status) => true,
        () if ENDED.contains(&status) => false,
        () => return None,
    };
    match (call.operation, running) {
        // A create answered at its end used what its answer says; nothing follows.
        (Op::CreateResponse | Op::CreateRun | Op::CreateThreadAndRun, true)
        | (Op::SubmitToolOutputsToRun | Op::CreateEvalRun, true) => Some(Follow::Leave {
            id,
            deployment: crate::limits::deployment_run(call).map(str::to_owned),
            starts: call.operation != Op::SubmitToolOutputsToRun,
        }),
        (Op::SubmitToolOutputsToRun | Op::GetResponse | Op::CancelResponse, false)
        | (Op::GetRun | Op::CancelRun | Op::GetEvalRun | Op::CancelEvalRun, false) => {
            Some(Follow::Ended {
                id,
                usage: if object == "eval.run" {
                    eval_run_usage(answer)
                } else {
                    crate::capture::usage_of(answer)
                },
            })
        }
        _ => None,
    }
}

/// What an eval run used: the sum of its `per_model_usage`, one entry for each model it called
/// (the model that answers its items and its graders'; OpenAI's eval run object, which Azure
/// OpenAI's evaluations follow). `None` when it reports none.
fn eval_run_usage(run: &Value) -> Option<TokenUsage> {
    let models = run.get("per_model_usage")?.as_array()?;
    let mut usage = TokenUsage::default();
    let mut reported = false;
    for model in models {
        let count = |key: &str| model.get(key).and_then(Value::as_u64);
        let Some(prompt) = count("prompt_tokens") else {
            continue;
        };
        let completion = count("completion_tokens").unwrap_or(0);
        reported = true;
        usage.prompt_tokens = usage.prompt_tokens.saturating_add(prompt);
        usage.completion_tokens = usage.completion_tokens.saturating_add(completion);
        usage.total_tokens = usage.total_tokens.saturating_add(
            count("total_tokens").unwrap_or_else(|| prompt.saturating_add(completion)),
        );
        usage.cached_tokens = usage
            .cached_tokens
            .saturating_add(count("cached_tokens").unwrap_or(0));
    }
    reported.then_some(usage)
}

/// What became of an entry left.
#[derive(Debug)]
pub(crate) enum Left {
    /// It is kept; `replaced` is the entry it took the place of (one that tool outputs left
    /// before their run's create left its own).
    Kept {
        /// The entry replaced.
        replaced: Option<Entry>,
    },
    /// The object has an entry already (a run that waited for tool outputs again): this one is
    /// handed back.
    Present(Entry),
    /// The store failed: the entry is handed back.
    Failed(Entry),
}

/// Entries kept in this process.
#[derive(Default)]
struct LocalEntries {
    entries: HashMap<String, (Entry, Instant)>,
    /// When the expired entries were last removed, because the map was full.
    swept: Option<Instant>,
}

/// How often a full map is searched for expired entries: at most once in this long, so that a
/// map full of live entries does not cost every call that leaves one a pass over it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Stores the entry (`ARGV[1]`) at `KEYS[1]` for `ARGV[2]` seconds: only where none is when
/// `ARGV[3]` is `nx` (answering 1 if stored, 0 if one was there), else in place of the one there
/// (answering it, or `false`).
const LEAVE_LUA: &str = r#"
if ARGV[3] == 'nx' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return old
"#;

/// Takes the entry at `KEYS[1]`: answers it (or `false`) and deletes it, at once (`GETDEL`
/// needs Redis 6.2; this runs on any Redis with scripting).
const TAKE_LUA: &str = r#"
local entry = redis.call('GET', KEYS[1])
if entry then redis.call('DEL', KEYS[1]) end
return entry
"#;

/// Where entries live.
enum Store {
    Local(std::sync::Mutex<LocalEntries>),
    Redis {
        connection: ConnectionManager,
        key_prefix: String,
        timeout: Duration,
        leave: redis::Script,
        take: redis::Script,
    },
}

/// The entries of work that goes on after its call; one per gateway.
pub(crate) struct DeferredWork {
    store: Store,
    warnings: WarningThrottle,
}

impl std::fmt::Debug for DeferredWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the Redis connection: its address may carry a password.
        f.debug_struct("DeferredWork")
            .field(
                "store",
                &match self.store {
                    Store::Local(_) => "local",
                    Store::Redis { .. } => "redis",
                },
            )
            .finish()
    }
}

impl DeferredWork {
    /// Entries in the limits' Redis when one is configured, else in this process. Call this
    /// inside a Tokio runtime.
    pub(crate) fn new(settings: &LimitSettings) -> anyhow::Result<DeferredWork> {
        let store = match &settings.redis_url {
            None => Store::Local(std::sync::Mutex::default()),
            Some(url) => {
                let url = url
                    .resolve()
                    .map_err(|e| anyhow::anyhow!("server.limits.redis_url: {e}"))?;
                let timeout = Duration::from_millis(settings.store_timeout_ms);
                Store::Redis {
                    connection: crate::redis_connection::connect_lazily(&url, timeout, None)
                        .map_err(|e| anyhow::anyhow!("server.limits.redis_url: {e}"))?,
                    key_prefix: settings.key_prefix.clone(),
                    timeout,
                    leave: redis::Script::new(LEAVE_LUA),
                    take: redis::Script::new(TAKE_LUA),
                }
            }
        };
        Ok(DeferredWork {
            store,
            warnings: WarningThrottle::new(WARNING_INTERVAL),
        })
    }

    /// Leaves `entry` for the work of object `id`: in place of the entry there when `replace`
    /// (the object's create), else only where none is.
    pub(crate) async fn leave(&self, id: &str, entry: Entry, replace: bool) -> Left {
        match &self.store {
            Store::Local(local) => {
                let now = Instant::now();
                let mut local = local.lock().unwrap_or_else(|e| e.into_inner());
                let there = local.entries.get(id).is_some_and(|(_, until)| *until > now);
                if there && !replace {
                    return Left::Present(entry);
                }
                if !there && local.entries.len() >= MAX_LOCAL_ENTRIES {
                    if local
                        .swept
                        .is_none_or(|swept| now - swept >= SWEEP_INTERVAL)
                    {
                        local.entries.retain(|_, (_, until)| *until > now);
                        local.swept = Some(now);
                    }
                    if local.entries.len() >= MAX_LOCAL_ENTRIES {
                        drop(local);
                        self.warn("too many objects whose work goes on after their call are followed at once");
                        return Left::Failed(entry);
                    }
                }
                let replaced = local
                    .entries
                    .insert(id.to_owned(), (entry, now + ENTRY_LIFETIME))
                    .filter(|(_, until)| *until > now)
                    .map(|(entry, _)| entry);
                Left::Kept { replaced }
            }
            Store::Redis {
                connection,
                key_prefix,
                timeout,
                leave,
                ..
            } => {
                let Ok(value) = serde_json::to_string(&entry) else {
                    return Left::Failed(entry);
                };
                let mut connection = connection.clone();
                let mut invocation = leave.key(key(key_prefix, id));
                invocation
                    .arg(value)
                    .arg(ENTRY_LIFETIME.as_secs())
                    .arg(if replace { "replace" } else { "nx" });
                let answer = tokio::time::timeout(
                    *timeout,
                    invocation.invoke_async::<redis::Value>(&mut connection),
                )
                .await;
                match answer {
                    Ok(Ok(redis::Value::Int(1))) => Left::Kept { replaced: None },
                    Ok(Ok(redis::Value::Int(_))) => Left::Present(entry),
                    Ok(Ok(redis::Value::Nil)) => Left::Kept { replaced: None },
                    Ok(Ok(old)) => Left::Kept {
                        replaced: self.read(redis::from_redis_value::<String>(old).ok()),
                    },
                    Ok(Err(error)) => {
                        self.warn_store(&error.to_string());
                        Left::Failed(entry)
                    }
                    Err(_) => {
                        self.warn_store("no answer in time");
                        Left::Failed(entry)
                    }
                }
            }
        }
    }

    /// Takes the entry of object `id`, when one is there: once, whichever call asks first.
    pub(crate) async fn take(&self, id: &str) -> Option<Entry> {
        match &self.store {
            Store::Local(local) => {
                let mut local = local.lock().unwrap_or_else(|e| e.into_inner());
                let (entry, until) = local.entries.remove(id)?;
                (until > Instant::now()).then_some(entry)
            }
            Store::Redis {
                connection,
                key_prefix,
                timeout,
                take,
                ..
            } => {
                let mut connection = connection.clone();
                let invocation = take.key(key(key_prefix, id));
                let answer = tokio::time::timeout(
                    *timeout,
                    invocation.invoke_async::<Option<String>>(&mut connection),
                )
                .await;
                match answer {
                    Ok(Ok(value)) => self.read(value),
                    Ok(Err(error)) => {
                        self.warn_store(&error.to_string());
                        None
                    }
                    Err(_) => {
                        self.warn_store("no answer in time");
                        None
                    }
                }
            }
        }
    }

    /// An entry as Redis keeps it.
    fn read(&self, value: Option<String>) -> Option<Entry> {
        match serde_json::from_str(&value?) {
            Ok(entry) => Some(entry),
            Err(error) => {
                self.warn(&format!(
                    "an entry of deferred work is not readable: {error}"
                ));
                None
            }
        }
    }

    fn warn_store(&self, error: &str) {
        self.warn(&format!(
            "the Redis store of deferred work failed ({error}): the work's reservation stays charged and its usage is not recorded"
        ));
    }

    fn warn(&self, message: &str) {
        if self.warnings.should_warn() {
            tracing::warn!("{message}");
        }
    }
}

/// The Redis key of object `id`'s entry.
fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}gatehouse:deferred:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, path: &str, body: &str) -> Call {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        crate::classify::classify(
            &method.parse().unwrap(),
            path,
            Some("api-version=2025-04-01-preview"),
            &headers,
            &bytes::Bytes::from(body.to_owned()),
        )
        .unwrap()
    }

    fn answer(object: &str, status: &str) -> Value {
        serde_json::json!({
            "id": "resp_1", "object": object, "status": status, "model": "gpt-4o",
            "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        })
    }

    #[test]
    fn a_background_response_answered_queued_leaves_an_entry() {
        let create = call(
            "POST",
            "/openai/v1/responses",
            r#"{"model":"gpt-4o","input":"hi","background":true}"#,
        );
        assert_eq!(
            follow(&create, StatusCode::OK, Some(&answer("response", "queued"))),
            Some(Follow::Leave {
                id: "resp_1".to_owned(),
                deployment: Some("gpt-4o".to_owned()),
                starts: true,
            })
        );
        // Answered at its end, a create leaves nothing.
        assert_eq!(
            follow(
                &create,
                StatusCode::OK,
                Some(&answer("response", "completed"))
            ),
            None
        );
        assert_eq!(
            follow(
                &create,
                StatusCode::BAD_REQUEST,
                Some(&answer("response", "queued"))
            ),
            None
        );
    }

    #[test]
    fn a_poll_that_sees_the_end_reports_the_usage() {
        let poll = call("GET", "/openai/v1/responses/resp_1", "");
        assert_eq!(
            follow(
                &poll,
                StatusCode::OK,
                Some(&answer("response", "completed"))
            ),
            Some(Follow::Ended {
                id: "resp_1".to_owned(),
                usage: crate::capture::usage_of(&answer("response", "completed")),
            })
        );
        assert_eq!(
            follow(
                &poll,
                StatusCode::OK,
                Some(&answer("response", "in_progress"))
            ),
            None
        );
        // Not an object whose work goes on.
        assert_eq!(
            follow(
                &poll,
                StatusCode::OK,
                Some(&answer("chat.completion", "completed"))
            ),
            None
        );
    }

    #[test]
    fn tool_outputs_continue_or_end_a_run() {
        let submit = call(
            "POST",
            "/openai/threads/thread_1/runs/run_1/submit_tool_outputs",
            r#"{"tool_outputs":[{"tool_call_id":"call_1","output":"42"}]}"#,
        );
        assert!(matches!(
            follow(
                &submit,
                StatusCode::OK,
                Some(&answer("thread.run", "requires_action"))
            ),
            Some(Follow::Leave { .. })
        ));
        assert!(matches!(
            follow(
                &submit,
                StatusCode::OK,
                Some(&answer("thread.run", "completed"))
            ),
            Some(Follow::Ended { usage: Some(_), .. })
        ));
    }

    #[test]
    fn an_eval_run_reports_what_its_every_model_used() {
        let create = call(
            "POST",
            "/openai/evals/eval_1/runs",
            r#"{"name":"nightly","data_source":{"type":"completions","model":"gpt-4o-mini","source":{"type":"file_id","id":"file-1"}}}"#,
        );
        let run = |status: &str| {
            serde_json::json!({"id": "evalrun_1", "object": "eval.run", "status": status,
                "per_model_usage": [
                    {"model_name": "gpt-4o-mini", "invocation_count": 10, "prompt_tokens": 1000,
                     "completion_tokens": 500, "total_tokens": 1500, "cached_tokens": 100},
                    {"model_name": "o3-mini", "invocation_count": 10, "prompt_tokens": 2000,
                     "completion_tokens": 300, "total_tokens": 2300, "cached_tokens": 0}]})
        };
        assert_eq!(
            follow(&create, StatusCode::CREATED, Some(&run("queued"))),
            Some(Follow::Leave {
                id: "evalrun_1".to_owned(),
                deployment: Some("gpt-4o-mini".to_owned()),
                starts: true,
            })
        );
        let poll = call("GET", "/openai/evals/eval_1/runs/evalrun_1", "");
        let Some(Follow::Ended {
            usage: Some(usage), ..
        }) = follow(&poll, StatusCode::OK, Some(&run("canceled")))
        else {
            panic!("a canceled eval run is over");
        };
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                usage.cached_tokens
            ),
            (3000, 800, 3800, 100)
        );
        assert!(!usage.is_estimate);
        assert_eq!(
            follow(&poll, StatusCode::OK, Some(&run("in_progress"))),
            None
        );
    }

    fn entry(deployment: &str) -> Entry {
        Entry {
            reservation: None,
            deployment: Some(deployment.to_owned()),
        }
    }

    /// Entries are taken once; tool outputs leave theirs only where none is, a create in place
    /// of one that tool outputs left first. The same on Redis, which replicas share.
    async fn entries_are_taken_once(work: DeferredWork, id: &str) {
        assert!(matches!(
            work.leave(id, entry("tools"), false).await,
            Left::Kept { replaced: None }
        ));
        let Left::Kept {
            replaced: Some(replaced),
        } = work.leave(id, entry("gpt-4o"), true).await
        else {
            panic!("a create's entry replaces the tool outputs' one");
        };
        assert_eq!(replaced.deployment.as_deref(), Some("tools"));
        assert!(matches!(
            work.leave(id, entry("tools"), false).await,
            Left::Present(_)
        ));
        let taken = work.take(id).await.unwrap();
        assert_eq!(taken.deployment.as_deref(), Some("gpt-4o"));
        assert!(work.take(id).await.is_none());
    }

    #[tokio::test]
    async fn an_entry_is_taken_once() {
        let work = DeferredWork::new(&LimitSettings::default()).unwrap();
        entries_are_taken_once(work, "resp_1").await;
    }

    #[tokio::test]
    async fn an_entry_in_redis_is_taken_once() {
        let prefix = format!("test:{}:", uuid::Uuid::new_v4());
        let settings = LimitSettings {
            redis_url: Some(crate::settings::RedisUrl::from(
                "redis://127.0.0.1:6379".to_owned(),
            )),
            key_prefix: prefix.clone(),
            ..LimitSettings::default()
        };
        let work = DeferredWork::new(&settings).unwrap();
        entries_are_taken_once(work, "run_1").await;
        let mut connection = redis::Client::open("redis://127.0.0.1:6379")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let left: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn only_answers_that_may_say_something_are_parsed() {
        let running = br#"{"id":"resp_1","object":"response","status":"queued","output":[]}"#;
        let ended = br#"{"id":"resp_1","object":"response","status":"completed","output":[]}"#;
        assert!(may_follow(OperationId::CreateResponse, running));
        assert!(!may_follow(OperationId::CreateResponse, ended));
        assert!(may_follow(OperationId::GetResponse, ended));
        assert!(!may_follow(OperationId::GetResponse, running));
        assert!(may_follow(OperationId::SubmitToolOutputsToRun, ended));
        assert!(!may_follow(OperationId::ChatCompletionsCreate, running));
    }
}
