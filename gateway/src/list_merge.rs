//! Lists of the objects a pool of several members holds, merged into one list.
//!
//! Objects (files, batches, fine-tuning jobs, assistants, vector stores, stored chat
//! completions, containers, evals) are made on whichever member the pool picks and stay there
//! (`crate::affinity`), so each member lists only its own. A top-level list call (`GET
//! …/files`, …) to a pool of several members goes to every member; their lists are merged in the
//! list's order (by `created_at`, or a chat completion's `created`; newest first unless `order`
//! or the API's default says otherwise; for equal times the pool's member order, and each
//! member's own order kept) and cut at `limit`. `has_more`, `first_id` and `last_id` describe the
//! merged page, so that the SDKs' pagination (`after` = the last id of a page) works unchanged.
//!
//! The next page starts where each member's part of the last one ended. The gateway keeps, for
//! an hour, where each member stands after each page it answered with more to come
//! ([`ListCursors`]). A cursor it does not hold (another replica answered that page, or the
//! gateway restarted) is placed again from the object it names: the member holding that object
//! (the object map) goes on after it, and each other member is read from its start up to the
//! first object that comes after it in the merged order (at most [`PLACEMENT_PAGES`] pages of
//! [`PLACEMENT_PAGE`] objects each).
//!
//! A member that cannot be read (set aside, throttled, failing, unreachable) fails the whole
//! list, 503 with the member's wait when it gave one: a list with one member's objects missing
//! would look complete. A member's refusal (400 for a bad parameter, …) is the answer, as it came.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_schema::OperationId;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Map, Value};
use url::form_urlencoded;

use crate::app::Gateway;
use crate::classify::Call;
use crate::error::GatewayError;
use crate::member_read::{self, MemberRead};
use crate::pool::{Member, Pool};
use crate::proxy::{self, FailedAttempt};
use crate::record::{CallRecord, millis};
use crate::upstream::UpstreamBody;

/// How long a page's cursor is kept.
const CURSOR_LIFETIME: Duration = Duration::from_secs(3600);

/// The most cursors kept at once; the oldest go first.
const MAX_CURSORS: usize = 10_000;

/// The size of the pages read to place a cursor the gateway does not hold.
const PLACEMENT_PAGE: u64 = 100;

/// The most pages read from one member to place a cursor.
const PLACEMENT_PAGES: usize = 50;

/// The largest list answer read from a member.
const MAX_LIST_BYTES: usize = 64 << 20;

/// How a list API orders and cuts its pages when the client does not say.
#[derive(Debug, Clone, Copy)]
struct ListDefaults {
    /// Objects a page holds.
    limit: u64,
    /// Newest first.
    descending: bool,
    /// Whether the API takes `order` (batches and fine-tuning jobs are always newest first).
    orderable: bool,
}

/// The list APIs whose objects stay on the member that made them, with their defaults (OpenAI's
/// API reference and Azure OpenAI's v1 reference: files 10,000 a page and the others 20; chat
/// completions and evals oldest first, the others newest first).
fn defaults(operation: OperationId) -> Option<ListDefaults> {
    let (limit, descending, orderable) = match operation {
        OperationId::FilesList => (10_000, true, true),
        OperationId::BatchList | OperationId::FineTuningList => (20, true, false),
        OperationId::ListAssistants
        | OperationId::ListVectorStores
        | OperationId::ListContainers => (20, true, true),
        OperationId::ListChatCompletions | OperationId::ListEvals => (20, false, true),
        _ => return None,
    };
    Some(ListDefaults {
        limit,
        descending,
        orderable,
    })
}

/// Whether `call` is a list this module answers: a top-level list of objects that stay on their
/// member, to a pool of several members.
pub(crate) fn merges(call: &Call, method: &Method, pool: &Pool) -> bool {
    method == Method::GET
        && pool.members.len() > 1
        && call.object.is_none()
        && defaults(call.operation).is_some()
}

/// What a list is ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    /// `created_at` (a chat completion's `created`).
    Created,
    /// `updated_at` (evals listed with `order_by=updated_at`).
    Updated,
}

impl SortKey {
    /// An object's time by this key (Unix seconds; 0 when it has none).
    fn time(self, item: &Value) -> f64 {
        let field = match self {
            SortKey::Created => item.get("created_at").or_else(|| item.get("created")),
            SortKey::Updated => item.get("updated_at"),
        };
        field.and_then(Value::as_f64).unwrap_or(0.0)
    }
}

/// The place in the merged order of the last object of a page: every object the next page holds
/// comes after it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Boundary {
    /// Its time by the list's key.
    at: f64,
    /// Its member's position in the pool.
    member: usize,
}

impl Boundary {
    /// Whether an object of time `item_time` of the member at `member` comes after the boundary
    /// in the merged order (`descending`: newest first): not earlier by time, nor as old and of a
    /// member listed first. A member's objects after its own standing come after the boundary,
    /// unless they were made since the page was answered.
    fn is_after(&self, item_time: f64, member: usize, descending: bool) -> bool {
        let earlier = if descending {
            item_time > self.at
        } else {
            item_time < self.at
        };
        !(earlier || (item_time == self.at && member < self.member))
    }
}

/// Where a member stands after a page, for the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Standing {
    /// Its next objects come after this one of its own (from its start when `None`).
    After(Option<String>),
    /// Every object of it was listed (newest-first lists only: an object made since would come
    /// before the page).
    Done,
}

/// Where the members stand after a page answered with more to come.
#[derive(Debug, Clone, PartialEq)]
struct Cursor {
    standings: Vec<Standing>,
    boundary: Boundary,
}

/// The cursors of pages answered with more to come.
#[derive(Debug, Default)]
pub(crate) struct ListCursors {
    inner: Mutex<CursorMap>,
}

#[derive(Debug, Default)]
struct CursorMap {
    by_key: HashMap<String, (Instant, Cursor)>,
    /// Keys in the order they were kept, to drop the oldest.
    order: VecDeque<(Instant, String)>,
}

impl ListCursors {
    fn get(&self, key: &str, now: Instant) -> Option<Cursor> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.by_key
            .get(key)
            .filter(|(kept, _)| now.duration_since(*kept) < CURSOR_LIFETIME)
            .map(|(_, cursor)| cursor.clone())
    }

    fn keep(&self, key: String, cursor: Cursor, now: Instant) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((kept, _)) = map.order.front() {
            if map.order.len() < MAX_CURSORS && now.duration_since(*kept) < CURSOR_LIFETIME {
                break;
            }
            if let Some((kept, old)) = map.order.pop_front()
                && map.by_key.get(&old).is_some_and(|(at, _)| *at == kept)
            {
                map.by_key.remove(&old);
            }
        }
        map.order.push_back((now, key.clone()));
        map.by_key.insert(key, (now, cursor));
    }

    /// How many cursors are kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_key
            .len()
    }
}

/// The client's list parameters.
struct ListQuery {
    /// Every parameter but `after` and `limit`, in the client's order.
    rest: Vec<(String, String)>,
    after: Option<String>,
    /// `limit` as the client gave it.
    limit: Option<u64>,
    descending: bool,
    sort: SortKey,
}

impl ListQuery {
    fn parse(
        query: Option<&str>,
        operation: OperationId,
        defaults: ListDefaults,
    ) -> Result<ListQuery, GatewayError> {
        let mut parsed = ListQuery {
            rest: Vec::new(),
            after: None,
            limit: None,
            descending: defaults.descending,
            sort: SortKey::Created,
        };
        for (key, value) in query
            .into_iter()
            .flat_map(|query| form_urlencoded::parse(query.as_bytes()))
        {
            match key.as_ref() {
                "after" => parsed.after = Some(value.into_owned()).filter(|v| !v.is_empty()),
                "limit" => {
                    let limit = value.parse::<u64>().ok().filter(|limit| *limit > 0);
                    parsed.limit = Some(limit.ok_or_else(|| GatewayError::BadRequest {
                        message: "`limit` must be a whole number of at least 1.".to_owned(),
                        param: Some("limit"),
                    })?);
                }
                "before" => {
                    return Err(GatewayError::BadRequest {
                        message: "This list is kept by several backends and is paged forward \
                                  only: use `after` (or `order`) instead of `before`."
                            .to_owned(),
                        param: Some("before"),
                    });
                }
                _ => {
                    if key == "order" && defaults.orderable {
                        parsed.descending = match value.as_ref() {
                            "desc" => true,
                            "asc" => false,
                            _ => {
                                return Err(GatewayError::BadRequest {
                                    message: "`order` must be `asc` or `desc`.".to_owned(),
                                    param: Some("order"),
                                });
                            }
                        };
                    }
                    if key == "order_by" && operation == OperationId::ListEvals {
                        parsed.sort = match value.as_ref() {
                            "created_at" => SortKey::Created,
                            "updated_at" => SortKey::Updated,
                            _ => {
                                return Err(GatewayError::BadRequest {
                                    message: "`order_by` must be `created_at` or `updated_at`."
                                        .to_owned(),
                                    param: Some("order_by"),
                                });
                            }
                        };
                    }
                    parsed.rest.push((key.into_owned(), value.into_owned()));
                }
            }
        }
        Ok(parsed)
    }

    /// The query a member is sent: the client's parameters, `limit`, and `after`.
    fn for_member(&self, limit: Option<u64>, after: Option<&str>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(&self.rest);
        if let Some(limit) = limit {
            query.append_pair("limit", &limit.to_string());
        }
        if let Some(after) = after {
            query.append_pair("after", after);
        }
        query.finish()
    }

    /// The time of `item` by the list's key.
    fn time(&self, item: &Value) -> f64 {
        self.sort.time(item)
    }
}

/// One member's list, as read.
struct MemberList {
    items: Vec<Value>,
    has_more: bool,
    /// The answer's other members (`object`, `first_id`, …).
    fields: Map<String, Value>,
    /// The last of the objects left out for coming before the page's boundary (made since the
    /// last page), which the member's standing moves past.
    skipped: Option<String>,
}

/// Why a list could not be merged.
enum Stopped {
    /// The gateway's answer.
    Error(GatewayError),
    /// A member's refusal, which goes to the client as it came.
    Refused(Arc<Member>, Box<http::Response<UpstreamBody>>),
}

impl From<GatewayError> for Stopped {
    fn from(error: GatewayError) -> Self {
        Stopped::Error(error)
    }
}

/// What a list call asks every member, and of whom.
struct Lister<'a> {
    gateway: &'a Arc<Gateway>,
    call: &'a Call,
    pool: &'a Pool,
    query: ListQuery,
    /// The client's `OpenAI-Beta` (OpenAI answers an Assistants list without `assistants=v2`
    /// with 400).
    beta: HeaderMap,
    request_id: Option<String>,
}

/// Answers a list call to a pool of several members ([`merges`]) with the merged list.
pub(crate) async fn forward(
    gateway: &Arc<Gateway>,
    call: Call,
    parts: &Parts,
    pool: &Pool,
    record: &mut Option<CallRecord>,
) -> Result<axum::response::Response, GatewayError> {
    let Some(defaults) = defaults(call.operation) else {
        return Err(GatewayError::Internal);
    };
    let query = ListQuery::parse(parts.uri.query(), call.operation, defaults)?;
    let mut beta = HeaderMap::new();
    if let Some(value) = parts.headers.get("openai-beta") {
        beta.insert("openai-beta", value.clone());
    }
    let lister = Lister {
        gateway,
        call: &call,
        pool,
        query,
        beta,
        request_id: proxy::request_id(record).map(str::to_owned),
    };
    let page = match lister.page(defaults, record).await {
        Ok(page) => page,
        Err(Stopped::Error(error)) => return Err(error),
        Err(Stopped::Refused(member, response)) => {
            return proxy::relay_answer(gateway, call, member, *response, record, parts.version)
                .await;
        }
    };
    let mut response = http::Response::new(UpstreamBody::Whole(Some(page)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let first = Arc::clone(&pool.members[0]);
    proxy::relay_answer(gateway, call, first, response, record, parts.version).await
}

impl Lister<'_> {
    /// The merged page, as the JSON text the client gets.
    async fn page(
        &self,
        defaults: ListDefaults,
        record: &mut Option<CallRecord>,
    ) -> Result<Bytes, Stopped> {
        let query = &self.query;
        let now = Instant::now();
        // A member set aside is not asked: its part of the list cannot be had now.
        let set_aside = self
            .pool
            .members
            .iter()
            .filter_map(|member| member.health.set_aside_state(now).map(|(_, wait)| wait))
            .max();
        if let Some(wait) = set_aside {
            return Err(GatewayError::ListIncomplete {
                retry_after: Some(wait),
            }
            .into());
        }
        if let Some(record) = record.as_mut() {
            record.backend_started.get_or_insert(now);
            record.record.backend_id = Some(self.pool.members[0].config.id.clone());
        }
        let (standings, boundary) = match &query.after {
            None => (vec![Standing::After(None); self.pool.members.len()], None),
            Some(after) => match self.gateway.list_cursors.get(&self.cursor_key(after), now) {
                Some(cursor) => (cursor.standings, Some(cursor.boundary)),
                None => {
                    let cursor = self.place(after, record).await?;
                    (cursor.standings, Some(cursor.boundary))
                }
            },
        };
        // Every member at once: the list takes as long as its slowest member, not their sum.
        let reads = self
            .pool
            .members
            .iter()
            .zip(&standings)
            .map(|(member, standing)| async move {
                let started = Instant::now();
                let read = match standing {
                    Standing::Done => Ok(None),
                    Standing::After(after) => {
                        self.page_of(member, after.as_deref()).await.map(Some)
                    }
                };
                (read, millis(started.elapsed()))
            });
        let read = futures::future::join_all(reads).await;
        let mut lists = Vec::with_capacity(read.len());
        let mut standings = standings;
        let mut failed: Option<Stopped> = None;
        for (index, (read, elapsed_ms)) in read.into_iter().enumerate() {
            let member = &self.pool.members[index];
            let read = match (read, boundary, &standings[index]) {
                // The object a member's standing names was deleted since the last page: the
                // member is placed again from the page's boundary.
                (Err(MemberRead::Refused(_)), Some(boundary), Standing::After(Some(_))) => {
                    match self.place_member(index, boundary).await {
                        Ok(standing) => {
                            standings[index] = standing.clone();
                            match standing {
                                Standing::Done => Ok(None),
                                Standing::After(after) => {
                                    self.page_of(member, after.as_deref()).await.map(Some)
                                }
                            }
                        }
                        Err(read) => Err(read),
                    }
                }
                (read, _, _) => read,
            };
            match read {
                Ok(list) => {
                    if list.is_some() {
                        self.gateway
                            .metrics
                            .backend_attempt(&member.config.id, "answered");
                        proxy::note_attempt(record, member, Some(200), elapsed_ms, None);
                    }
                    lists.push(list);
                }
                Err(read) => {
                    let stopped = self.stop(member, read, record);
                    // Every failed member is set aside and recorded; the first refusal, or the
                    // longest wait, answers.
                    failed = Some(match (failed, stopped) {
                        (Some(Stopped::Refused(m, r)), _) | (_, Stopped::Refused(m, r)) => {
                            Stopped::Refused(m, r)
                        }
                        (
                            Some(Stopped::Error(GatewayError::ListIncomplete { retry_after: a })),
                            Stopped::Error(GatewayError::ListIncomplete { retry_after: b }),
                        ) => Stopped::Error(GatewayError::ListIncomplete {
                            retry_after: a.max(b),
                        }),
                        (_, stopped) => stopped,
                    });
                }
            }
        }
        if let Some(failed) = failed {
            return Err(failed);
        }
        if let Some(boundary) = boundary {
            for (index, list) in lists.iter_mut().enumerate() {
                if let Some(list) = list {
                    leave_out_before(list, boundary, index, query);
                }
            }
        }
        let limit = query.limit.unwrap_or(defaults.limit);
        let merged = merge(&lists, &standings, limit, query);
        if merged.more
            && let Some((last, member)) = merged.last.as_ref()
        {
            let cursor = Cursor {
                standings: merged.standings.clone(),
                boundary: Boundary {
                    at: merged.items.last().map_or(0.0, |item| query.time(item)),
                    member: *member,
                },
            };
            self.gateway
                .list_cursors
                .keep(self.cursor_key(last), cursor, Instant::now());
        }
        Ok(Bytes::from(merged.into_answer(&lists).to_string()))
    }

    /// A page of `member`'s list after its own object `after` (from its start when `None`).
    async fn page_of(
        &self,
        member: &Member,
        after: Option<&str>,
    ) -> Result<MemberList, MemberRead<()>> {
        let page_query = self.query.for_member(self.query.limit, after);
        self.list(member, &page_query, after).await
    }

    /// Where each member stands after the object `after`, read from the members: for a cursor
    /// of a page this gateway did not answer (another replica's, or one from before a restart).
    async fn place(&self, after: &str, record: &mut Option<CallRecord>) -> Result<Cursor, Stopped> {
        let unknown = || {
            Stopped::Error(GatewayError::BadRequest {
                message: format!(
                    "`after` names no object of this list that the gateway knows ({}): list again from the start.",
                    truncated(after)
                ),
                param: Some("after"),
            })
        };
        self.gateway.affinity.learn(&[after.to_owned()]).await;
        let holder_id = self.gateway.affinity.member_of(after).ok_or_else(unknown)?;
        let holder = self
            .pool
            .members
            .iter()
            .position(|member| member.config.id == holder_id)
            .ok_or_else(unknown)?;
        let member = &self.pool.members[holder];
        let object = match self
            .read(member, Some(after), &self.query.for_member(None, None))
            .await
        {
            Ok(object) => object,
            Err(read) => return Err(self.stop(member, read, record)),
        };
        let boundary = Boundary {
            at: self.query.time(&object),
            member: holder,
        };
        let mut standings = Vec::with_capacity(self.pool.members.len());
        for (index, member) in self.pool.members.iter().enumerate() {
            if index == holder {
                standings.push(Standing::After(Some(after.to_owned())));
                continue;
            }
            match self.place_member(index, boundary).await {
                Ok(standing) => standings.push(standing),
                Err(read) => return Err(self.stop(member, read, record)),
            }
        }
        Ok(Cursor {
            standings,
            boundary,
        })
    }

    /// Where the member at `index` stands after `boundary`: its last object before it, read from
    /// its start (at most [`PLACEMENT_PAGES`] pages).
    async fn place_member(
        &self,
        index: usize,
        boundary: Boundary,
    ) -> Result<Standing, MemberRead<()>> {
        let member = &self.pool.members[index];
        let mut last: Option<String> = None;
        for _ in 0..PLACEMENT_PAGES {
            let page_query = self.query.for_member(Some(PLACEMENT_PAGE), last.as_deref());
            let list = self.list(member, &page_query, last.as_deref()).await?;
            for item in &list.items {
                if boundary.is_after(self.query.time(item), index, self.query.descending) {
                    return Ok(Standing::After(last));
                }
                if let Some(id) = object_id(item) {
                    last = Some(id.to_owned());
                }
            }
            if !list.has_more || list.items.is_empty() {
                return Ok(if self.query.descending {
                    Standing::Done
                } else {
                    Standing::After(last)
                });
            }
        }
        Err(MemberRead::Refused(Box::new(too_deep())))
    }

    /// The key a page's cursor is kept under: the pool and its members (a push that changes them
    /// makes every cursor be placed again), the operation, the client's other parameters, and
    /// the page's last object.
    fn cursor_key(&self, last: &str) -> String {
        let members: Vec<&str> = self
            .pool
            .members
            .iter()
            .map(|member| member.config.id.as_str())
            .collect();
        let rest = self.query.for_member(None, None);
        [
            self.pool.id.as_str(),
            &members.join(","),
            self.call.operation.as_str(),
            &rest,
            last,
        ]
        .join("\n")
    }

    /// One page of `member`'s list, without the object `after` if the member gave it again (a
    /// member that does not page answers its whole list each time).
    async fn list(
        &self,
        member: &Member,
        query: &str,
        after: Option<&str>,
    ) -> Result<MemberList, MemberRead<()>> {
        let answer = self.read(member, None, query).await?;
        let Value::Object(mut fields) = answer else {
            return Err(MemberRead::cut(BAD_LIST_ANSWER, StatusCode::OK));
        };
        let Some(Value::Array(mut items)) = fields.remove("data") else {
            return Err(MemberRead::cut(BAD_LIST_ANSWER, StatusCode::OK));
        };
        if let Some(after) = after
            && let Some(position) = items.iter().position(|item| object_id(item) == Some(after))
        {
            items.drain(..=position);
        }
        let has_more = fields
            .get("has_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(MemberList {
            items,
            has_more,
            fields,
            skipped: None,
        })
    }

    /// `GET` of the list's path (with `/{object}` when given) on `member` with `query`, its
    /// answer parsed.
    async fn read(
        &self,
        member: &Member,
        object: Option<&str>,
        query: &str,
    ) -> Result<Value, MemberRead<()>> {
        let credential = proxy::credential_header(member).await.map_err(|error| {
            tracing::warn!(backend = %member.config.id, %error, "no credential for the backend; member set aside");
            MemberRead::Failed {
                reason: "credential_failed",
                status: None,
                wait: crate::retry_hint::DEFAULT_SET_ASIDE,
            }
        })?;
        let ops = self.call.op_path.iter().map(String::as_str).chain(object);
        let url = proxy::member_url(member, self.call, ops, Some(query))
            .map_err(|_| MemberRead::cut(BAD_LIST_ANSWER, StatusCode::OK))?;
        let uri = http::Uri::try_from(url)
            .map_err(|_| MemberRead::cut(BAD_LIST_ANSWER, StatusCode::OK))?;
        let headers = proxy::upstream_headers(&self.beta, credential, self.request_id.as_deref());
        let response = match member_read::get(member, uri, headers).await {
            MemberRead::Read(response) => response,
            MemberRead::Failed {
                reason,
                status,
                wait,
            } => {
                return Err(MemberRead::Failed {
                    reason,
                    status,
                    wait,
                });
            }
            MemberRead::Refused(response) => return Err(MemberRead::Refused(response)),
        };
        let status = response.status();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        loop {
            match member_read::next_chunk(member, &mut body).await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_LIST_BYTES {
                        return Err(MemberRead::cut(LIST_TOO_LARGE, status));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(()) => return Err(MemberRead::cut("backend_stream_failed", status)),
            }
        }
        serde_json::from_slice(&bytes).map_err(|_| MemberRead::cut(BAD_LIST_ANSWER, status))
    }

    /// What a member's failed read makes of the list call: the member set aside (unless it
    /// answered, with something that is no list) and the list refused (503), or the member's
    /// refusal relayed.
    fn stop(
        &self,
        member: &Arc<Member>,
        read: MemberRead<()>,
        record: &mut Option<CallRecord>,
    ) -> Stopped {
        match read {
            MemberRead::Read(()) => Stopped::Error(GatewayError::Internal),
            MemberRead::Failed {
                reason,
                status,
                wait,
            } => {
                let status = status.map(|s| s.as_u16());
                if matches!(reason, BAD_LIST_ANSWER | LIST_TOO_LARGE) {
                    // It answered: it is not set aside for calls of other kinds.
                    tracing::warn!(backend = %member.config.id, reason, "a backend's part of a merged list could not be read");
                    self.gateway
                        .metrics
                        .backend_attempt(&member.config.id, reason);
                    proxy::note_attempt(record, member, status, 0, Some(reason));
                    return Stopped::Error(GatewayError::ListIncomplete { retry_after: None });
                }
                tracing::warn!(backend = %member.config.id, reason, "a backend's part of a merged list could not be read; member set aside");
                let mut throttled = None;
                FailedAttempt::new(status, wait, reason, 0).set_aside(
                    self.gateway,
                    member,
                    record,
                    &mut throttled,
                );
                Stopped::Error(GatewayError::ListIncomplete {
                    retry_after: Some(wait),
                })
            }
            MemberRead::Refused(response) => {
                proxy::note_attempt(
                    record,
                    member,
                    Some(response.status().as_u16()),
                    0,
                    Some("list_refused"),
                );
                Stopped::Refused(Arc::clone(member), response)
            }
        }
    }
}

/// A member's answer that is no list (not JSON, no `data` array).
const BAD_LIST_ANSWER: &str = "bad_list_answer";

/// A member's list answer larger than [`MAX_LIST_BYTES`].
const LIST_TOO_LARGE: &str = "list_too_large";

/// The answer to a cursor that cannot be placed within [`PLACEMENT_PAGES`] pages of a member.
fn too_deep() -> http::Response<UpstreamBody> {
    let body = serde_json::json!({
        "error": {
            "code": "invalid_request_error",
            "message": format!(
                "The list cannot be resumed at this `after`: this gateway no longer holds where that page ended, and a backend holds more than {} objects before it. List again from the start.",
                PLACEMENT_PAGE * PLACEMENT_PAGES as u64
            ),
            "type": "invalid_request_error",
            "param": "after",
        }
    });
    let mut response =
        http::Response::new(UpstreamBody::Whole(Some(Bytes::from(body.to_string()))));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Leaves out of `list` (of the member at `member`) the objects at its start that come before
/// `boundary`: made since the last page, they would come before it in the merged order.
fn leave_out_before(list: &mut MemberList, boundary: Boundary, member: usize, query: &ListQuery) {
    let before = list
        .items
        .iter()
        .take_while(|item| !boundary.is_after(query.time(item), member, query.descending))
        .count();
    if before > 0 {
        list.skipped = list.items[before - 1]
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        list.items.drain(..before);
    }
}

/// A merged page.
struct Merged {
    /// The page's objects, in order.
    items: Vec<Value>,
    /// The id of the page's last object and its member's position.
    last: Option<(String, usize)>,
    /// Whether objects come after the page.
    more: bool,
    /// Where each member stands after the page.
    standings: Vec<Standing>,
}

impl Merged {
    /// The list object the client gets: the first answer's own members (`object`, …) with the
    /// page's `data`, `has_more` and, when the members' answers have them, `first_id` and
    /// `last_id`.
    fn into_answer(self, lists: &[Option<MemberList>]) -> Value {
        let mut answer = lists
            .iter()
            .flatten()
            .next()
            .map(|list| list.fields.clone())
            .unwrap_or_default();
        answer
            .entry("object")
            .or_insert_with(|| Value::String("list".to_owned()));
        let first = self.items.first().and_then(object_id).map(str::to_owned);
        let last = self.items.last().and_then(object_id).map(str::to_owned);
        if answer.contains_key("first_id") {
            answer.insert(
                "first_id".to_owned(),
                first.map_or(Value::Null, Value::String),
            );
        }
        if answer.contains_key("last_id") {
            answer.insert(
                "last_id".to_owned(),
                last.map_or(Value::Null, Value::String),
            );
        }
        answer.insert("data".to_owned(), Value::Array(self.items));
        answer.insert("has_more".to_owned(), Value::Bool(self.more));
        Value::Object(answer)
    }
}

/// Merges the members' lists (`None`: a member already listed whole) into a page of at most
/// `limit` objects in the list's order; for equal times the member listed first in the pool
/// comes first, and each member's own order is kept.
fn merge(
    lists: &[Option<MemberList>],
    standings: &[Standing],
    limit: u64,
    query: &ListQuery,
) -> Merged {
    let empty = Vec::new();
    let items: Vec<&Vec<Value>> = lists
        .iter()
        .map(|list| list.as_ref().map_or(&empty, |list| &list.items))
        .collect();
    let mut next = vec![0_usize; lists.len()];
    let mut page = Vec::new();
    let mut last = None;
    while (page.len() as u64) < limit {
        let mut best: Option<(usize, f64)> = None;
        for (member, list) in items.iter().enumerate() {
            let Some(item) = list.get(next[member]) else {
                continue;
            };
            let time = query.time(item);
            let first = match best {
                None => true,
                Some((_, best_time)) => {
                    if query.descending {
                        time > best_time
                    } else {
                        time < best_time
                    }
                }
            };
            if first {
                best = Some((member, time));
            }
        }
        let Some((member, _)) = best else {
            break;
        };
        let item = items[member][next[member]].clone();
        last = object_id(&item).map(|id| (id.to_owned(), member));
        page.push(item);
        next[member] += 1;
    }
    let mut more = false;
    let standings = lists
        .iter()
        .zip(standings)
        .enumerate()
        .map(|(member, (list, standing))| {
            let Some(list) = list else {
                return Standing::Done;
            };
            let left = next[member] < list.items.len() || list.has_more;
            more |= left;
            if !left && query.descending {
                // Anything it makes from now on comes before this page.
                Standing::Done
            } else if next[member] > 0 {
                Standing::After(object_id(&list.items[next[member] - 1]).map(str::to_owned))
            } else if let Some(skipped) = &list.skipped {
                Standing::After(Some(skipped.clone()))
            } else {
                standing.clone()
            }
        })
        .collect();
    Merged {
        items: page,
        last,
        more,
        standings,
    }
}

fn object_id(item: &Value) -> Option<&str> {
    item.get("id").and_then(Value::as_str)
}

/// An id quoted in an error, cut to 64 characters.
fn truncated(id: &str) -> String {
    let mut cut: String = id.chars().take(64).collect();
    if cut.len() < id.len() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list(items: &[(&str, i64)], has_more: bool) -> Option<MemberList> {
        Some(MemberList {
            items: items
                .iter()
                .map(|(id, at)| json!({"id": id, "created_at": at}))
                .collect(),
            has_more,
            fields: Map::new(),
            skipped: None,
        })
    }

    fn ids(merged: &Merged) -> Vec<&str> {
        merged.items.iter().filter_map(object_id).collect()
    }

    fn query(descending: bool) -> ListQuery {
        ListQuery {
            rest: Vec::new(),
            after: None,
            limit: None,
            descending,
            sort: SortKey::Created,
        }
    }

    const FILES: ListDefaults = ListDefaults {
        limit: 20,
        descending: true,
        orderable: true,
    };

    #[test]
    fn lists_merge_newest_first_and_keep_each_members_place() {
        let lists = [
            list(&[("a3", 30), ("a2", 20), ("a1", 10)], false),
            list(&[("b3", 30), ("b2", 25), ("b1", 5)], true),
        ];
        let from_start = [Standing::After(None), Standing::After(None)];
        let merged = merge(&lists, &from_start, 4, &query(true));
        // Equal times: the pool's first member first.
        assert_eq!(ids(&merged), ["a3", "b3", "b2", "a2"]);
        assert_eq!(merged.last, Some(("a2".to_owned(), 0)));
        assert!(merged.more);
        assert_eq!(
            merged.standings,
            [
                Standing::After(Some("a2".to_owned())),
                Standing::After(Some("b2".to_owned()))
            ]
        );
        let merged = merge(&lists, &from_start, 10, &query(true));
        assert_eq!(ids(&merged), ["a3", "b3", "b2", "a2", "a1", "b1"]);
        // The second member said it has more: the list is not over.
        assert!(merged.more);
        assert_eq!(
            merged.standings,
            [Standing::Done, Standing::After(Some("b1".to_owned()))]
        );
    }

    #[test]
    fn a_member_with_nothing_on_the_page_keeps_its_place() {
        let lists = [
            list(&[("a2", 20), ("a1", 10)], false),
            list(&[("b1", 1)], false),
        ];
        let standings = [
            Standing::After(Some("a3".to_owned())),
            Standing::After(Some("b2".to_owned())),
        ];
        let merged = merge(&lists, &standings, 1, &query(true));
        assert_eq!(ids(&merged), ["a2"]);
        assert_eq!(
            merged.standings,
            [
                Standing::After(Some("a2".to_owned())),
                Standing::After(Some("b2".to_owned()))
            ]
        );
        // Oldest first: a member listed whole is asked again (what it makes next comes after
        // the page).
        let lists = [list(&[("a1", 10), ("a2", 20)], false), None];
        let merged = merge(
            &lists,
            &[Standing::After(None), Standing::Done],
            5,
            &query(false),
        );
        assert_eq!(ids(&merged), ["a1", "a2"]);
        assert!(!merged.more);
        assert_eq!(
            merged.standings,
            [Standing::After(Some("a2".to_owned())), Standing::Done]
        );
    }

    #[test]
    fn objects_made_since_the_last_page_are_left_out_and_passed() {
        // The last page ended at b's object of time 20; a has made a new one (40) since.
        let boundary = Boundary {
            at: 20.0,
            member: 1,
        };
        let mut a = list(&[("a9", 40), ("a2", 20), ("a1", 10)], false).unwrap();
        leave_out_before(&mut a, boundary, 0, &query(true));
        // a2 (as old, of a member listed first) was on an earlier page.
        let kept: Vec<&str> = a.items.iter().filter_map(object_id).collect();
        assert_eq!(kept, ["a1"]);
        assert_eq!(a.skipped.as_deref(), Some("a2"));
        let mut b = list(&[("b2", 20), ("b1", 15)], false).unwrap();
        leave_out_before(&mut b, boundary, 2, &query(true));
        assert_eq!(
            b.items.len(),
            2,
            "as old, of a member listed after: not yet listed"
        );
        let merged = merge(
            &[Some(a), list(&[], false)],
            &[Standing::After(None), Standing::After(Some("x".to_owned()))],
            0,
            &query(true),
        );
        assert_eq!(
            merged.standings[0],
            Standing::After(Some("a2".to_owned())),
            "the left-out objects are passed"
        );
    }

    #[test]
    fn the_answer_describes_the_merged_page() {
        let mut first = list(&[("a1", 10)], true).unwrap();
        first.fields =
            json!({"object": "list", "first_id": "a1", "last_id": "a1", "has_more": true})
                .as_object()
                .unwrap()
                .clone();
        let lists = [Some(first), list(&[("b1", 20)], false)];
        let merged = merge(
            &lists,
            &[Standing::After(None), Standing::After(None)],
            20,
            &query(true),
        );
        let answer = merged.into_answer(&lists);
        assert_eq!(answer["data"].as_array().unwrap().len(), 2);
        assert_eq!(answer["first_id"], "b1");
        assert_eq!(answer["last_id"], "a1");
        assert_eq!(answer["has_more"], true);
        assert_eq!(answer["object"], "list");
    }

    #[test]
    fn list_parameters_are_read_and_checked() {
        let parsed = ListQuery::parse(
            Some("api-version=1&limit=5&after=f%201&order=asc&purpose=batch"),
            OperationId::FilesList,
            FILES,
        )
        .ok()
        .unwrap();
        assert_eq!(parsed.limit, Some(5));
        assert_eq!(parsed.after.as_deref(), Some("f 1"));
        assert!(!parsed.descending);
        assert_eq!(
            parsed.for_member(Some(7), Some("x&y")),
            "api-version=1&order=asc&purpose=batch&limit=7&after=x%26y"
        );
        for bad in ["limit=0", "limit=ten", "order=sideways", "before=file-1"] {
            assert!(
                ListQuery::parse(Some(bad), OperationId::FilesList, FILES).is_err(),
                "{bad}"
            );
        }
        // Batches are always newest first, whatever `order` says.
        let batches = defaults(OperationId::BatchList).unwrap();
        let parsed = ListQuery::parse(Some("order=asc"), OperationId::BatchList, batches)
            .ok()
            .unwrap();
        assert!(parsed.descending);
        // Evals ordered by their last update.
        let evals = defaults(OperationId::ListEvals).unwrap();
        let parsed = ListQuery::parse(Some("order_by=updated_at"), OperationId::ListEvals, evals)
            .ok()
            .unwrap();
        assert_eq!(parsed.sort, SortKey::Updated);
        assert_eq!(parsed.time(&json!({"created_at": 1, "updated_at": 9})), 9.0);
        assert!(ListQuery::parse(Some("order_by=name"), OperationId::ListEvals, evals).is_err());
    }

    #[test]
    fn cursors_are_kept_for_an_hour_and_the_oldest_go_first() {
        let cursors = ListCursors::default();
        let start = Instant::now();
        let cursor = Cursor {
            standings: vec![Standing::Done],
            boundary: Boundary { at: 1.0, member: 0 },
        };
        cursors.keep("a".to_owned(), cursor.clone(), start);
        assert_eq!(cursors.get("a", start), Some(cursor.clone()));
        assert_eq!(cursors.get("a", start + CURSOR_LIFETIME), None);
        cursors.keep("b".to_owned(), cursor.clone(), start + CURSOR_LIFETIME);
        assert_eq!(cursors.len(), 1, "the expired cursor was dropped");
        for n in 0..MAX_CURSORS + 5 {
            cursors.keep(n.to_string(), cursor.clone(), start + CURSOR_LIFETIME);
        }
        assert_eq!(cursors.len(), MAX_CURSORS);
        assert_eq!(cursors.get("0", start + CURSOR_LIFETIME), None);
    }
}
