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
//! Members are sent the list's `order` and `limit` explicitly, and a member whose objects run
//! out on a page while it has more is read further before the page goes on, so that the merge
//! never has to guess where its next object goes.
//!
//! The next page starts where each member's part of the last one ended. The gateway keeps, for
//! an hour, where each member stands after each page it answered with more to come, and the
//! place of the page's last object ([`ListCursors`]). Objects a member made since (they come
//! before that place) are passed, as one member's own paging would; a member whose last listed
//! object is gone since is placed again from that place. A cursor the gateway does not hold
//! (another replica answered that page, or the gateway restarted) is placed from the object it
//! names: the member holding that object (the object map) goes on after it, and each other
//! member is read from its start up to the first object that comes after it in the merged order
//! (at most [`PLACEMENT_PAGES`] pages of [`PLACEMENT_PAGE`] objects each).
//!
//! A member that cannot be read (set aside, throttled, failing, unreachable) fails the whole
//! list, 503 with the member's wait: a list with one member's objects missing would look
//! complete. A member's refusal (400 for a bad parameter, …) is the answer, as it came.

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

/// The most reads of one member in a row, for one merged page, that give nothing to put on it
/// (pages that hold only objects made since the last page, or none): then the page ends early,
/// or, with nothing on it yet, the list is answered 503.
const MAX_IDLE_READS: usize = PLACEMENT_PAGES;

/// The most ids of objects as old as a page's last one, of its member, that a cursor keeps (see
/// [`Boundary::tied`]).
const MAX_TIED: usize = 100;

/// The largest list answer read from a member.
const MAX_LIST_BYTES: usize = 16 << 20;

/// How a list API orders and cuts its pages.
#[derive(Debug, Clone, Copy)]
struct ListDefaults {
    /// Objects a page holds when the client does not say.
    limit: u64,
    /// The most objects a page may hold.
    max_limit: u64,
    /// Newest first, when the client does not say.
    descending: bool,
    /// Whether the API takes `order` (batches and fine-tuning jobs are always newest first).
    orderable: bool,
}

/// The list APIs whose objects stay on the member that made them, with their defaults (OpenAI's
/// API reference and Azure OpenAI's v1 reference: files 10,000 a page at most and by default,
/// the others 20 by default and 100 at most; chat completions and evals oldest first, the others
/// newest first).
fn defaults(operation: OperationId) -> Option<ListDefaults> {
    let (limit, max_limit, descending, orderable) = match operation {
        OperationId::FilesList => (10_000, 10_000, true, true),
        OperationId::BatchList | OperationId::FineTuningList => (20, 100, true, false),
        OperationId::ListAssistants
        | OperationId::ListVectorStores
        | OperationId::ListContainers => (20, 100, true, true),
        OperationId::ListChatCompletions | OperationId::ListEvals => (20, 100, false, true),
        _ => return None,
    };
    Some(ListDefaults {
        limit,
        max_limit,
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

/// When an object was made: `created_at`, or a chat completion's `created` (Unix seconds; 0 when
/// it has neither).
fn created(item: &Value) -> f64 {
    item.get("created_at")
        .or_else(|| item.get("created"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

fn object_id(item: &Value) -> Option<&str> {
    item.get("id").and_then(Value::as_str)
}

/// The place in the merged order of the last object of a page: every object the next page holds
/// comes after it.
#[derive(Debug, Clone, PartialEq)]
struct Boundary {
    /// Its time.
    at: f64,
    /// Its member's position in the pool.
    member: usize,
    /// The ids of that member's objects as old as it that were listed (it among them): the
    /// member's own order of objects of one time is known only by its list.
    tied: Vec<String>,
}

impl Boundary {
    /// Whether `item` of the member at `member` comes after the boundary in the merged order
    /// (`descending`: newest first): not earlier, and if as old, of a member listed later or,
    /// of the boundary's own member, not listed yet.
    fn is_after(&self, item: &Value, member: usize, descending: bool) -> bool {
        let time = created(item);
        if time == self.at {
            return match member.cmp(&self.member) {
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Equal => {
                    object_id(item).is_none_or(|id| !self.tied.iter().any(|t| t == id))
                }
            };
        }
        if descending {
            time < self.at
        } else {
            time > self.at
        }
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
    /// Every parameter but `after` and `limit`, in the client's order, and `order` when the API
    /// takes it and the client did not give it.
    rest: Vec<(String, String)>,
    after: Option<String>,
    limit: u64,
    /// The page size of the reads that go on after a member's first read of a page: at least
    /// [`PLACEMENT_PAGE`], within the API's maximum.
    read_limit: u64,
    descending: bool,
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
            limit: defaults.limit,
            read_limit: PLACEMENT_PAGE.min(defaults.max_limit),
            descending: defaults.descending,
        };
        let mut ordered = false;
        for (key, value) in query
            .into_iter()
            .flat_map(|query| form_urlencoded::parse(query.as_bytes()))
        {
            match key.as_ref() {
                "after" => parsed.after = Some(value.into_owned()).filter(|v| !v.is_empty()),
                "limit" => {
                    parsed.limit = value
                        .parse::<u64>()
                        .ok()
                        .filter(|limit| (1..=defaults.max_limit).contains(limit))
                        .ok_or_else(|| GatewayError::BadRequest {
                            message: format!(
                                "`limit` must be a whole number from 1 to {}.",
                                defaults.max_limit
                            ),
                            param: Some("limit"),
                        })?;
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
                        ordered = true;
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
                    if key == "order_by"
                        && operation == OperationId::ListEvals
                        && value != "created_at"
                    {
                        return Err(GatewayError::BadRequest {
                            message: "This list is kept by several backends and is merged by \
                                      `created_at`: `order_by` may only be `created_at`."
                                .to_owned(),
                            param: Some("order_by"),
                        });
                    }
                    parsed.rest.push((key.into_owned(), value.into_owned()));
                }
            }
        }
        parsed.read_limit = parsed.limit.max(parsed.read_limit);
        if defaults.orderable && !ordered {
            let order = if parsed.descending { "desc" } else { "asc" };
            parsed.rest.push(("order".to_owned(), order.to_owned()));
        }
        Ok(parsed)
    }

    /// The query a member is sent: the list's parameters, `limit`, and `after`.
    fn for_member(&self, limit: u64, after: Option<&str>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(&self.rest);
        query.append_pair("limit", &limit.to_string());
        if let Some(after) = after {
            query.append_pair("after", after);
        }
        query.finish()
    }

    /// Whether `a` comes before `b` in the list's order (by time only).
    fn sooner(&self, a: f64, b: f64) -> bool {
        if self.descending { a > b } else { a < b }
    }
}

/// One page of a member's list, as read.
struct MemberList {
    items: Vec<Value>,
    has_more: bool,
    /// The answer's other members (`object`, `first_id`, …).
    fields: Map<String, Value>,
}

/// Reads pages of the members' lists.
trait PageSource {
    /// A page of at most `limit` objects of the list of the member at `member`, after its own
    /// object `after` (from its start when `None`).
    async fn fetch(
        &self,
        member: usize,
        after: Option<&str>,
        limit: u64,
    ) -> Result<MemberList, MemberRead<()>>;
}

/// One member's part of a merged page.
struct Feed {
    /// Objects read and not yet put on the page, in the member's order.
    buffer: VecDeque<Value>,
    /// The last object put on the page or passed (the member's standing for the next page);
    /// `None`: none yet.
    passed: Option<String>,
    /// The last object passed for coming before the boundary (objects are passed before any is
    /// put on the page): where a page that fails goes on when tried again.
    skipped: Option<String>,
    /// Where the member stood before the page.
    standing: Option<String>,
    /// The last object read (where the next read starts).
    read_to: Option<String>,
    has_more: bool,
    /// Reads in a row that gave nothing to put on the page.
    idle_reads: usize,
}

impl Feed {
    fn new(standing: Option<String>, list: MemberList) -> Feed {
        let mut feed = Feed {
            buffer: VecDeque::new(),
            passed: None,
            skipped: None,
            standing: standing.clone(),
            read_to: standing,
            has_more: false,
            idle_reads: 0,
        };
        feed.take(list);
        feed
    }

    /// Takes a page read from the member.
    fn take(&mut self, list: MemberList) {
        self.has_more = list.has_more;
        if let Some(id) = list.items.last().and_then(object_id) {
            self.read_to = Some(id.to_owned());
        }
        self.buffer.extend(list.items);
    }

    /// Passes the objects at the front that come before `boundary` (made since the last page, or
    /// listed on it).
    fn pass_before(&mut self, boundary: &Boundary, member: usize, descending: bool) {
        while let Some(item) = self.buffer.front() {
            if boundary.is_after(item, member, descending) {
                break;
            }
            if let Some(id) = object_id(item) {
                self.passed = Some(id.to_owned());
                self.skipped = Some(id.to_owned());
            }
            self.buffer.pop_front();
        }
    }

    /// Where the member stands after the page.
    fn standing_after(&self, descending: bool) -> Standing {
        if self.buffer.is_empty() && !self.has_more && descending {
            // Anything it makes from now on comes before this page.
            return Standing::Done;
        }
        Standing::After(self.passed.clone().or_else(|| self.standing.clone()))
    }

    /// Where the member stands for a page that failed, to be tried again: past the objects it
    /// passed, not past those put on the page (the client never got them).
    fn standing_for_retry(&self) -> Standing {
        Standing::After(self.skipped.clone().or_else(|| self.standing.clone()))
    }

    fn has_left(&self) -> bool {
        !self.buffer.is_empty() || self.has_more
    }
}

/// A merged page.
struct Merged {
    /// The page's objects, in order, each with its member's position.
    items: Vec<(Value, usize)>,
    /// Whether objects come after the page.
    more: bool,
    /// Where each member stands after the page.
    standings: Vec<Standing>,
}

/// Why a merge stopped: the read of the member at `member` failed. `standings`: where each
/// member stood then, past what the page had passed (not what it had put on the page), so that
/// trying the page again goes on from there.
struct ReadFailed {
    member: usize,
    read: MemberRead<()>,
    standings: Vec<Standing>,
}

/// Where each member of `feeds` stands (see [`Feed::standing_after`]).
fn standings_of(feeds: &[Option<Feed>], descending: bool) -> Vec<Standing> {
    feeds
        .iter()
        .map(|feed| {
            feed.as_ref()
                .map_or(Standing::Done, |feed| feed.standing_after(descending))
        })
        .collect()
}

/// Merges the members' lists into a page of at most `query.limit` objects. `feeds` holds each
/// member's first read (`None`: a member listed whole before). Objects that come before
/// `boundary` are passed. A member whose read objects run out while it has more is read further
/// (pages of `query.read_limit`) before the page goes on; after [`MAX_IDLE_READS`] reads in a row
/// that give nothing for the page, the page ends there (the member's standing past what it
/// passed), or fails if nothing is on it yet.
async fn merge<S: PageSource>(
    source: &S,
    mut feeds: Vec<Option<Feed>>,
    boundary: Option<&Boundary>,
    query: &ListQuery,
) -> Result<Merged, ReadFailed> {
    let standings_before: Vec<Standing> = feeds
        .iter()
        .map(|feed| {
            feed.as_ref().map_or(Standing::Done, |feed| {
                Standing::After(feed.standing.clone())
            })
        })
        .collect();
    let mut items = Vec::new();
    let mut stalled = false;
    let mut failed: Option<(usize, MemberRead<()>)> = None;
    while (items.len() as u64) < query.limit {
        let mut best: Option<(usize, f64)> = None;
        for (member, feed) in feeds.iter_mut().enumerate() {
            let Some(feed) = feed else { continue };
            loop {
                if let Some(boundary) = boundary {
                    feed.pass_before(boundary, member, query.descending);
                }
                if !feed.buffer.is_empty() {
                    feed.idle_reads = 0;
                    break;
                }
                if !feed.has_more {
                    break;
                }
                if feed.idle_reads >= MAX_IDLE_READS {
                    if items.is_empty() {
                        failed = Some((member, MemberRead::cut(NO_PROGRESS, StatusCode::OK)));
                        break;
                    }
                    // Ends the page here: what the member passed is kept in its standing.
                    stalled = true;
                    break;
                }
                feed.idle_reads += 1;
                let list = match source
                    .fetch(member, feed.read_to.as_deref(), query.read_limit)
                    .await
                {
                    Ok(list) => list,
                    // The object the read goes on from is gone within this page: the list is
                    // tried again rather than answered with the member's 404.
                    Err(MemberRead::Refused(response))
                        if response.status() == StatusCode::NOT_FOUND =>
                    {
                        failed =
                            Some((member, MemberRead::cut(NO_PROGRESS, StatusCode::NOT_FOUND)));
                        break;
                    }
                    Err(read) => {
                        failed = Some((member, read));
                        break;
                    }
                };
                feed.take(list);
            }
            if stalled || failed.is_some() {
                break;
            }
            if let Some(item) = feed.buffer.front() {
                let time = created(item);
                if best.is_none_or(|(_, best_time)| query.sooner(time, best_time)) {
                    best = Some((member, time));
                }
            }
        }
        if let Some((member, read)) = failed {
            let standings = feeds
                .iter()
                .zip(standings_before)
                .map(|(feed, before)| feed.as_ref().map_or(before, Feed::standing_for_retry))
                .collect();
            return Err(ReadFailed {
                member,
                read,
                standings,
            });
        }
        if stalled {
            break;
        }
        let Some((member, _)) = best else { break };
        let Some(feed) = feeds[member].as_mut() else {
            break;
        };
        let Some(item) = feed.buffer.pop_front() else {
            break;
        };
        if let Some(id) = object_id(&item) {
            feed.passed = Some(id.to_owned());
        }
        items.push((item, member));
    }
    let more = feeds.iter().flatten().any(Feed::has_left);
    let standings = standings_of(&feeds, query.descending);
    Ok(Merged {
        items,
        more,
        standings,
    })
}

/// The first read of the member at `index` for a page, after its standing object `after`;
/// when that object is gone since the last page (the member answers 404), the member is placed
/// again from the page's `boundary`. Answers the standing read from and the page, or `None` for
/// a member placed after all its objects (newest first: nothing of it is left for the list).
async fn first_read<S: PageSource>(
    source: &S,
    index: usize,
    after: Option<String>,
    boundary: Option<&Boundary>,
    query: &ListQuery,
) -> Result<Option<(Option<String>, MemberList)>, Unplaced> {
    match source.fetch(index, after.as_deref(), query.limit).await {
        Ok(list) => Ok(Some((after, list))),
        Err(MemberRead::Refused(response))
            if response.status() == StatusCode::NOT_FOUND && after.is_some() =>
        {
            let Some(boundary) = boundary else {
                return Err(Unplaced::Read(MemberRead::Refused(response)));
            };
            let Standing::After(standing) = place_member(source, index, boundary, query).await?
            else {
                return Ok(None);
            };
            let list = source
                .fetch(index, standing.as_deref(), query.limit)
                .await
                .map_err(Unplaced::Read)?;
            Ok(Some((standing, list)))
        }
        Err(read) => Err(Unplaced::Read(read)),
    }
}

/// Where the member at `index` stands after `boundary`: its last object before it, read from its
/// start (at most [`PLACEMENT_PAGES`] pages of [`PLACEMENT_PAGE`]).
async fn place_member<S: PageSource>(
    source: &S,
    index: usize,
    boundary: &Boundary,
    query: &ListQuery,
) -> Result<Standing, Unplaced> {
    let mut last: Option<String> = None;
    for _ in 0..PLACEMENT_PAGES {
        let list = source
            .fetch(index, last.as_deref(), PLACEMENT_PAGE)
            .await
            .map_err(Unplaced::Read)?;
        for item in &list.items {
            if boundary.is_after(item, index, query.descending) {
                return Ok(Standing::After(last));
            }
            if let Some(id) = object_id(item) {
                last = Some(id.to_owned());
            }
        }
        if !list.has_more {
            return Ok(if query.descending {
                Standing::Done
            } else {
                Standing::After(last)
            });
        }
    }
    Err(Unplaced::TooDeep)
}

/// The boundary after `items`, the page's objects with their members: its last object's place,
/// and the objects as old of its member listed on this page and, when the last page ended at the
/// same place, on that one.
fn boundary_after(items: &[(Value, usize)], previous: Option<&Boundary>) -> Option<Boundary> {
    let (last, member) = items.last()?;
    let at = created(last);
    let mut tied: Vec<String> = previous
        .filter(|previous| previous.at == at && previous.member == *member)
        .map(|previous| previous.tied.clone())
        .unwrap_or_default();
    tied.extend(
        items
            .iter()
            .filter(|(item, of)| of == member && created(item) == at)
            .filter_map(|(item, _)| object_id(item).map(str::to_owned)),
    );
    if tied.len() > MAX_TIED {
        tied.drain(..tied.len() - MAX_TIED);
    }
    Some(Boundary {
        at,
        member: *member,
        tied,
    })
}

/// The list object the client gets: the first answer's own members (`object`, …) with the
/// page's `data`, `has_more` and, when the members' answers have them, `first_id` and `last_id`.
fn answer(fields: Option<Map<String, Value>>, merged: Merged) -> Value {
    let mut answer = fields.unwrap_or_default();
    answer
        .entry("object")
        .or_insert_with(|| Value::String("list".to_owned()));
    let first = merged
        .items
        .first()
        .and_then(|(item, _)| object_id(item))
        .map(str::to_owned);
    let last = merged
        .items
        .last()
        .and_then(|(item, _)| object_id(item))
        .map(str::to_owned);
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
    let data = merged.items.into_iter().map(|(item, _)| item).collect();
    answer.insert("data".to_owned(), Value::Array(data));
    answer.insert("has_more".to_owned(), Value::Bool(merged.more));
    Value::Object(answer)
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

/// Why a member could not be placed.
enum Unplaced {
    /// A read failed.
    Read(MemberRead<()>),
    /// More than [`PLACEMENT_PAGES`] pages come before the place.
    TooDeep,
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
    let page = match lister.page(record).await {
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

impl PageSource for Lister<'_> {
    async fn fetch(
        &self,
        member: usize,
        after: Option<&str>,
        limit: u64,
    ) -> Result<MemberList, MemberRead<()>> {
        let member = &self.pool.members[member];
        let answer = self
            .read(member, None, &self.query.for_member(limit, after))
            .await?;
        let Value::Object(mut fields) = answer else {
            return Err(MemberRead::cut(BAD_LIST_ANSWER, StatusCode::OK));
        };
        let Some(Value::Array(mut items)) = fields.remove("data") else {
            return Err(MemberRead::cut(BAD_LIST_ANSWER, StatusCode::OK));
        };
        // The files a listed batch or fine-tuning job names were made by this member: pinned to
        // it before the merged page, relayed as the first member's, could pin them elsewhere.
        proxy::pin_listed_files(self.gateway, self.call, &member.config.id, &items);
        // A member that does not page answers from its start again: what it gave up to `after`
        // was read before.
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
        })
    }
}

impl Lister<'_> {
    /// The merged page, as the JSON text the client gets.
    async fn page(&self, record: &mut Option<CallRecord>) -> Result<Bytes, Stopped> {
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
        // Every member at once: the page takes as long as its slowest member, not their sum.
        let reads = standings.iter().enumerate().map(|(index, standing)| {
            let boundary = boundary.as_ref();
            async move {
                let started = Instant::now();
                let read = match standing {
                    Standing::Done => Ok(None),
                    Standing::After(after) => {
                        first_read(self, index, after.clone(), boundary, query).await
                    }
                };
                (read, millis(started.elapsed()))
            }
        });
        let read = futures::future::join_all(reads).await;
        let mut feeds = Vec::with_capacity(read.len());
        let mut fields = None;
        let mut failed: Option<Stopped> = None;
        for (index, (read, elapsed_ms)) in read.into_iter().enumerate() {
            let member = &self.pool.members[index];
            match read {
                Ok(Some((standing, list))) => {
                    self.gateway
                        .metrics
                        .backend_attempt(&member.config.id, "answered");
                    proxy::note_attempt(record, member, Some(200), elapsed_ms, None);
                    if fields.is_none() {
                        fields = Some(list.fields.clone());
                    }
                    feeds.push(Some(Feed::new(standing, list)));
                }
                // Listed whole before, or placed after all its objects.
                Ok(None) => feeds.push(None),
                Err(unplaced) => {
                    let stopped = self.stop(member, unplaced, record);
                    failed = Some(worse(failed, stopped));
                }
            }
        }
        if let Some(failed) = failed {
            return Err(failed);
        }
        let merged = match merge(self, feeds, boundary.as_ref(), query).await {
            Ok(merged) => merged,
            Err(failed) => {
                // What the page passed is not read again when the client tries it again.
                if let (Some(after), Some(boundary)) = (&query.after, boundary) {
                    let cursor = Cursor {
                        standings: failed.standings,
                        boundary,
                    };
                    self.gateway
                        .list_cursors
                        .keep(self.cursor_key(after), cursor, Instant::now());
                }
                let member = &self.pool.members[failed.member];
                return Err(self.stop(member, Unplaced::Read(failed.read), record));
            }
        };
        if merged.more
            && let Some(next) = boundary_after(&merged.items, boundary.as_ref())
            && let Some(last) = merged.items.last().and_then(|(item, _)| object_id(item))
        {
            let cursor = Cursor {
                standings: merged.standings.clone(),
                boundary: next,
            };
            self.gateway
                .list_cursors
                .keep(self.cursor_key(last), cursor, Instant::now());
        }
        Ok(Bytes::from(answer(fields, merged).to_string()))
    }

    /// Where each member stands after the object `after`, read from the members: for a cursor
    /// of a page this gateway did not answer (another replica's, or one from before a restart).
    async fn place(&self, after: &str, record: &mut Option<CallRecord>) -> Result<Cursor, Stopped> {
        let unknown = |reason: &str| {
            Stopped::Error(GatewayError::BadRequest {
                message: format!(
                    "`after` names no object of this list that the gateway can find ({}: {reason}): list again from the start.",
                    truncated(after)
                ),
                param: Some("after"),
            })
        };
        self.gateway.affinity.learn(&[after.to_owned()]).await;
        let holder_id = self
            .gateway
            .affinity
            .member_of(after)
            .ok_or_else(|| unknown("not made through this gateway"))?;
        let holder = self
            .pool
            .members
            .iter()
            .position(|member| member.config.id == holder_id)
            .ok_or_else(|| unknown("held by a backend of another pool"))?;
        let member = &self.pool.members[holder];
        let object = match self.read(member, Some(after), "").await {
            Ok(object) => object,
            Err(MemberRead::Refused(response)) if response.status() == StatusCode::NOT_FOUND => {
                return Err(unknown("it is gone"));
            }
            Err(read) => return Err(self.stop(member, Unplaced::Read(read), record)),
        };
        let boundary = Boundary {
            at: created(&object),
            member: holder,
            tied: vec![after.to_owned()],
        };
        let placing = (0..self.pool.members.len()).map(|index| {
            let boundary = &boundary;
            async move {
                if index == holder {
                    Ok(Standing::After(Some(after.to_owned())))
                } else {
                    place_member(self, index, boundary, &self.query).await
                }
            }
        });
        let placed = futures::future::join_all(placing).await;
        let mut standings = Vec::with_capacity(placed.len());
        let mut failed: Option<Stopped> = None;
        for (index, placed) in placed.into_iter().enumerate() {
            match placed {
                Ok(standing) => standings.push(standing),
                Err(unplaced) => {
                    let stopped = self.stop(&self.pool.members[index], unplaced, record);
                    failed = Some(worse(failed, stopped));
                }
            }
        }
        if let Some(failed) = failed {
            return Err(failed);
        }
        Ok(Cursor {
            standings,
            boundary,
        })
    }

    /// The key a page's cursor is kept under: the pool and its members (a push that changes them
    /// makes every cursor be placed again), the operation, the list's other parameters, and the
    /// page's last object.
    fn cursor_key(&self, last: &str) -> String {
        let members: Vec<&str> = self
            .pool
            .members
            .iter()
            .map(|member| member.config.id.as_str())
            .collect();
        // Without `limit`: a client may page on with another page size.
        let rest = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.query.rest)
            .finish();
        [
            self.pool.id.as_str(),
            &members.join(","),
            self.call.operation.as_str(),
            &rest,
            last,
        ]
        .join("\n")
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
        let response = member_read::get(member, uri, headers).await.into_read()?;
        let (status, bytes) = member_read::whole_body(
            member,
            response,
            MAX_LIST_BYTES,
            LIST_TOO_LARGE,
            "backend_stream_failed",
        )
        .await?;
        serde_json::from_slice(&bytes).map_err(|_| MemberRead::cut(BAD_LIST_ANSWER, status))
    }

    /// What a member's failed read or placement makes of the list call: the member set aside
    /// (unless it answered, with something that is no list) and the list refused (503), the
    /// gateway's 400 for a cursor placed too deep, or the member's refusal relayed.
    fn stop(
        &self,
        member: &Arc<Member>,
        unplaced: Unplaced,
        record: &mut Option<CallRecord>,
    ) -> Stopped {
        let read = match unplaced {
            Unplaced::TooDeep => {
                return Stopped::Error(GatewayError::BadRequest {
                    message: format!(
                        "The list cannot be resumed at this `after`: this gateway no longer holds where that page ended, and a backend holds more than {} objects before it. List again from the start.",
                        PLACEMENT_PAGE * PLACEMENT_PAGES as u64
                    ),
                    param: Some("after"),
                });
            }
            Unplaced::Read(read) => read,
        };
        match read {
            MemberRead::Read(()) => Stopped::Error(GatewayError::Internal),
            MemberRead::Failed {
                reason,
                status,
                wait,
            } => {
                let status = status.map(|s| s.as_u16());
                if matches!(reason, BAD_LIST_ANSWER | LIST_TOO_LARGE | NO_PROGRESS) {
                    // It answered: it is not set aside for calls of other kinds. A page that
                    // passed many objects goes on from there when tried again.
                    tracing::warn!(backend = %member.config.id, reason, "a backend's part of a merged list could not be read");
                    self.gateway
                        .metrics
                        .backend_attempt(&member.config.id, reason);
                    proxy::note_attempt(record, member, status, 0, Some(reason));
                    let retry_after = (reason == NO_PROGRESS).then_some(Duration::from_secs(1));
                    return Stopped::Error(GatewayError::ListIncomplete { retry_after });
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

/// Of two reasons a list stopped, the one that answers: a member's refusal (the first), else the
/// longest wait.
fn worse(earlier: Option<Stopped>, later: Stopped) -> Stopped {
    match (earlier, later) {
        (Some(Stopped::Refused(member, response)), _) | (_, Stopped::Refused(member, response)) => {
            Stopped::Refused(member, response)
        }
        (
            Some(Stopped::Error(GatewayError::ListIncomplete { retry_after: a })),
            Stopped::Error(GatewayError::ListIncomplete { retry_after: b }),
        ) => Stopped::Error(GatewayError::ListIncomplete {
            retry_after: a.max(b),
        }),
        (_, later) => later,
    }
}

/// A member's answer that is no list (not JSON, no `data` array).
const BAD_LIST_ANSWER: &str = "bad_list_answer";

/// A member's list answer larger than [`MAX_LIST_BYTES`].
const LIST_TOO_LARGE: &str = "list_too_large";

/// A member that keeps saying it has more without giving objects that come after the page.
const NO_PROGRESS: &str = "list_without_progress";

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

    /// Members' lists in memory, paged as OpenAI's list APIs page (`after`, `limit`,
    /// `has_more`; 404 for an `after` the member does not hold), each in the list's order.
    struct Members {
        lists: Vec<Vec<Value>>,
        /// The most objects a member gives a page, whatever `limit` asks.
        page_cap: usize,
        /// Pages read.
        reads: std::cell::Cell<usize>,
        /// The read (by count) that fails, once, as a member that breaks off.
        fail_at: std::cell::Cell<Option<usize>>,
    }

    impl Members {
        fn new(lists: &[&[(&str, i64)]], descending: bool) -> Members {
            Members {
                lists: lists
                    .iter()
                    .map(|list| {
                        let mut items: Vec<Value> = list
                            .iter()
                            .map(|(id, at)| json!({"id": id, "created_at": at}))
                            .collect();
                        // Stable: a member's objects of one time stay in the order given.
                        items.sort_by(|a, b| {
                            let (a, b) = (created(a), created(b));
                            if descending {
                                b.total_cmp(&a)
                            } else {
                                a.total_cmp(&b)
                            }
                        });
                        items
                    })
                    .collect(),
                page_cap: usize::MAX,
                reads: std::cell::Cell::new(0),
                fail_at: std::cell::Cell::new(None),
            }
        }
    }

    impl PageSource for Members {
        async fn fetch(
            &self,
            member: usize,
            after: Option<&str>,
            limit: u64,
        ) -> Result<MemberList, MemberRead<()>> {
            self.reads.set(self.reads.get() + 1);
            if self.fail_at.get() == Some(self.reads.get()) {
                self.fail_at.set(None);
                return Err(MemberRead::Failed {
                    reason: "backend_stream_failed",
                    status: None,
                    wait: Duration::from_secs(1),
                });
            }
            let list = &self.lists[member];
            let start = match after {
                None => 0,
                Some(after) => match list.iter().position(|item| object_id(item) == Some(after)) {
                    Some(position) => position + 1,
                    None => {
                        let mut response =
                            http::Response::new(UpstreamBody::Whole(Some(Bytes::new())));
                        *response.status_mut() = StatusCode::NOT_FOUND;
                        return Err(MemberRead::Refused(Box::new(response)));
                    }
                },
            };
            let take = usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .min(self.page_cap);
            let items: Vec<Value> = list.iter().skip(start).take(take).cloned().collect();
            Ok(MemberList {
                has_more: start + items.len() < list.len(),
                items,
                fields: Map::new(),
            })
        }
    }

    fn query(descending: bool, limit: u64) -> ListQuery {
        ListQuery {
            rest: Vec::new(),
            after: None,
            limit,
            read_limit: limit.max(PLACEMENT_PAGE),
            descending,
        }
    }

    /// Pages through `members` with `limit` as a client does (`after` = the page's last id),
    /// each page's cursor kept as the gateway keeps it, and `between` run before each page but
    /// the first; every id listed, in order.
    async fn page_through(
        members: &mut Members,
        descending: bool,
        limit: u64,
        mut between: impl FnMut(&mut Members, usize),
    ) -> Vec<String> {
        let query = query(descending, limit);
        let mut cursor: Option<Cursor> = None;
        let mut listed = Vec::new();
        let mut retries = 0;
        for page in 0..100 {
            if page > 0 {
                between(members, page);
            }
            let standings = cursor.as_ref().map_or_else(
                || vec![Standing::After(None); members.lists.len()],
                |cursor| cursor.standings.clone(),
            );
            let boundary = cursor.as_ref().map(|cursor| cursor.boundary.clone());
            let mut feeds = Vec::new();
            for (index, standing) in standings.iter().enumerate() {
                feeds.push(match standing {
                    Standing::Done => None,
                    Standing::After(after) => {
                        let read =
                            first_read(&*members, index, after.clone(), boundary.as_ref(), &query)
                                .await;
                        match read {
                            Ok(read) => read.map(|(standing, list)| Feed::new(standing, list)),
                            Err(_) => panic!("member {index} refused {after:?}"),
                        }
                    }
                });
            }
            let merged = match merge(&*members, feeds, boundary.as_ref(), &query).await {
                Ok(merged) => merged,
                // Tried again, as a client does after the 503, from where the page stopped.
                Err(failed) => {
                    retries += 1;
                    assert!(retries < 10, "member {} failed 10 times", failed.member);
                    cursor = Some(Cursor {
                        standings: failed.standings,
                        boundary: boundary.expect("a page after the first"),
                    });
                    continue;
                }
            };
            assert!(
                !merged.items.is_empty() || !merged.more,
                "an empty page with more to come"
            );
            listed.extend(
                merged
                    .items
                    .iter()
                    .filter_map(|(item, _)| object_id(item).map(str::to_owned)),
            );
            if !merged.more {
                return listed;
            }
            cursor = Some(Cursor {
                boundary: boundary_after(&merged.items, boundary.as_ref()).unwrap(),
                standings: merged.standings,
            });
        }
        panic!("100 pages and more: {listed:?}");
    }

    fn strings(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    #[tokio::test]
    async fn lists_merge_in_order_whatever_the_page_size() {
        let lists: &[&[(&str, i64)]] = &[
            &[("a3", 30), ("a2", 20), ("a1", 10)],
            &[("b3", 30), ("b2", 25), ("b1", 5)],
        ];
        // Newest first; equal times: the pool's first member first.
        let newest = strings(&["a3", "b3", "b2", "a2", "a1", "b1"]);
        for limit in 1..=7 {
            let mut members = Members::new(lists, true);
            assert_eq!(
                page_through(&mut members, true, limit, |_, _| {}).await,
                newest,
                "limit {limit}"
            );
        }
        let oldest = strings(&["b1", "a1", "a2", "b2", "a3", "b3"]);
        for limit in 1..=7 {
            let mut members = Members::new(lists, false);
            assert_eq!(
                page_through(&mut members, false, limit, |_, _| {}).await,
                oldest,
                "limit {limit}"
            );
        }
    }

    /// Two members whose objects interleave (the reviews' cases), newest first in
    /// [`INTERLEAVED_ORDER`].
    const INTERLEAVED: &[&[(&str, i64)]] = &[
        &[("a50", 50), ("a40", 40), ("a30", 30)],
        &[
            ("b100", 100),
            ("b90", 90),
            ("b85", 85),
            ("b45", 45),
            ("b35", 35),
            ("b20", 20),
        ],
    ];

    const INTERLEAVED_ORDER: &[&str] = &[
        "b100", "b90", "b85", "a50", "b45", "a40", "b35", "a30", "b20",
    ];

    /// The review's first case: a member whose read objects run out on a page while it has more
    /// is read further, so that nothing of it is skipped (here its pages hold one object).
    #[tokio::test]
    async fn a_member_with_short_pages_is_read_further() {
        let lists = INTERLEAVED;
        let mut members = Members::new(lists, true);
        members.page_cap = 1;
        assert_eq!(
            page_through(&mut members, true, 3, |_, _| {}).await,
            strings(INTERLEAVED_ORDER)
        );
    }

    /// Objects made while a client pages: they come before the page in a newest-first list and
    /// are passed, never listed in the middle, nor do they hide older objects; in an
    /// oldest-first list they come at its end.
    #[tokio::test]
    async fn objects_made_while_paging_are_passed_or_come_last() {
        let lists: &[&[(&str, i64)]] = &[&[("a1", 100)], &[("b1", 50)]];
        // The review's second case: a member with nothing on the first page then makes one.
        let mut members = Members::new(lists, true);
        let listed = page_through(&mut members, true, 1, |members, page| {
            if page == 1 {
                members.lists[1].insert(0, json!({"id": "bnew", "created_at": 200}));
            }
        })
        .await;
        assert_eq!(listed, strings(&["a1", "b1"]));

        let lists = INTERLEAVED;
        let mut members = Members::new(lists, true);
        let listed = page_through(&mut members, true, 3, |members, page| {
            if page == 1 {
                members.lists[0].insert(0, json!({"id": "a200", "created_at": 200}));
                members.lists[0].insert(1, json!({"id": "a150", "created_at": 150}));
            }
        })
        .await;
        assert_eq!(listed, strings(INTERLEAVED_ORDER));

        let lists: &[&[(&str, i64)]] = &[&[("a1", 10), ("a2", 20)], &[("b1", 15)]];
        let mut members = Members::new(lists, false);
        let listed = page_through(&mut members, false, 2, |members, page| {
            if page == 1 {
                members.lists[0].push(json!({"id": "a9", "created_at": 90}));
            }
        })
        .await;
        assert_eq!(listed, strings(&["a1", "b1", "a2", "a9"]));
    }

    /// Objects of one time on one member, cut by a page: the next page goes on after the ones
    /// listed, also when the last one listed is gone since (the member is placed again from the
    /// page's boundary, which knows the objects of its time already listed).
    #[tokio::test]
    async fn objects_of_one_time_are_listed_once() {
        let lists: &[&[(&str, i64)]] = &[
            &[("a1", 100), ("a2", 100), ("a3", 100), ("a4", 90)],
            &[("b1", 100), ("b2", 95)],
        ];
        let all = strings(&["a1", "a2", "a3", "b1", "b2", "a4"]);
        let mut members = Members::new(lists, true);
        assert_eq!(page_through(&mut members, true, 2, |_, _| {}).await, all);
        // a2 ends the first page and is gone before the second.
        let mut members = Members::new(lists, true);
        let listed = page_through(&mut members, true, 2, |members, page| {
            if page == 1 {
                members.lists[0].retain(|item| item["id"] != "a2");
            }
        })
        .await;
        assert_eq!(listed, all);
        // b's standing (b1) is gone before the third page: b is placed again.
        let mut members = Members::new(lists, true);
        let listed = page_through(&mut members, true, 2, |members, page| {
            if page == 2 {
                members.lists[1].retain(|item| item["id"] != "b1");
            }
        })
        .await;
        assert_eq!(listed, all);
    }

    /// A page that fails after it put objects on it (a member breaks off while read further) is
    /// tried again from where the members stood before it: the client never got those objects.
    #[tokio::test]
    async fn a_failed_page_loses_nothing_it_had_taken() {
        let lists: &[&[(&str, i64)]] = &[
            &[("a3", 30), ("a2", 20), ("a1", 10), ("a0", 5)],
            &[("b9", 9), ("b1", 1)],
        ];
        let mut members = Members::new(lists, true);
        members.page_cap = 1;
        let listed = page_through(&mut members, true, 2, |members, page| {
            if page == 1 {
                // The second page: both first reads, then a's next read breaks off, after a1
                // was put on the page.
                members.fail_at.set(Some(members.reads.get() + 3));
            }
        })
        .await;
        assert_eq!(listed, strings(&["a3", "a2", "a1", "b9", "a0", "b1"]));
        assert_eq!(members.fail_at.get(), None, "the read failed");
    }

    /// A member that made many objects since the last page, read one object at a time: the page
    /// is not read without end — it ends early, or fails and goes on from there when tried
    /// again — and no object is skipped or listed twice.
    #[tokio::test]
    async fn a_member_that_passes_many_objects_ends_the_page_early() {
        let lists: &[&[(&str, i64)]] = &[&[("a3", 30), ("a2", 20), ("a1", 10)], &[("b5", 5)]];
        let mut members = Members::new(lists, true);
        members.page_cap = 1;
        let listed = page_through(&mut members, true, 2, |members, page| {
            if page == 1 {
                for n in 0..120 {
                    let id = format!("bnew{n}");
                    members.lists[1].insert(0, json!({"id": id, "created_at": 1_000 + n}));
                }
            }
        })
        .await;
        assert_eq!(listed, strings(&["a3", "a2", "a1", "b5"]));
        assert!(
            members.reads.get() > 120,
            "the new objects were read one at a time: {}",
            members.reads.get()
        );
    }

    #[test]
    fn the_boundary_knows_the_objects_of_its_time() {
        let boundary = Boundary {
            at: 100.0,
            member: 1,
            tied: strings(&["b1", "b2"]),
        };
        let item = |id: &str, at: i64| json!({"id": id, "created_at": at});
        assert!(
            !boundary.is_after(&item("a9", 100), 0, true),
            "a member listed first"
        );
        assert!(
            boundary.is_after(&item("c1", 100), 2, true),
            "a member listed later"
        );
        assert!(!boundary.is_after(&item("b2", 100), 1, true), "listed");
        assert!(
            boundary.is_after(&item("b3", 100), 1, true),
            "not listed yet"
        );
        assert!(!boundary.is_after(&item("a9", 200), 0, true), "newer");
        assert!(boundary.is_after(&item("a9", 50), 0, true), "older");
        assert!(
            boundary.is_after(&item("a9", 200), 0, false),
            "newer, oldest first"
        );
        // The tied ids add up while pages end at the same place.
        let items = vec![(item("b3", 100), 1), (item("b4", 100), 1)];
        let next = boundary_after(&items, Some(&boundary)).unwrap();
        assert_eq!(next.tied, strings(&["b1", "b2", "b3", "b4"]));
        let next = boundary_after(&[(item("b5", 90), 1)], Some(&next)).unwrap();
        assert_eq!(next.tied, strings(&["b5"]));
    }

    #[test]
    fn the_answer_describes_the_merged_page() {
        let fields = json!({"object": "list", "first_id": "x", "last_id": "y", "has_more": false});
        let merged = Merged {
            items: vec![
                (json!({"id": "b1", "created_at": 20}), 1),
                (json!({"id": "a1", "created_at": 10}), 0),
            ],
            more: true,
            standings: Vec::new(),
        };
        let answer = answer(fields.as_object().cloned(), merged);
        assert_eq!(answer["data"].as_array().unwrap().len(), 2);
        assert_eq!(answer["first_id"], "b1");
        assert_eq!(answer["last_id"], "a1");
        assert_eq!(answer["has_more"], true);
        assert_eq!(answer["object"], "list");
    }

    #[test]
    fn list_parameters_are_read_and_checked() {
        let files = defaults(OperationId::FilesList).unwrap();
        let parsed = ListQuery::parse(
            Some("api-version=1&limit=5&after=f%201&order=asc&purpose=batch"),
            OperationId::FilesList,
            files,
        )
        .ok()
        .unwrap();
        assert_eq!(parsed.limit, 5);
        assert_eq!(parsed.after.as_deref(), Some("f 1"));
        assert!(!parsed.descending);
        assert_eq!(
            parsed.for_member(7, Some("x&y")),
            "api-version=1&order=asc&purpose=batch&limit=7&after=x%26y"
        );
        // Members are told the order and the page size even when the client is not.
        let parsed = ListQuery::parse(None, OperationId::FilesList, files)
            .ok()
            .unwrap();
        assert_eq!(
            parsed.for_member(parsed.limit, None),
            "order=desc&limit=10000"
        );
        for bad in [
            "limit=0",
            "limit=ten",
            "limit=10001",
            "order=sideways",
            "before=file-1",
        ] {
            assert!(
                ListQuery::parse(Some(bad), OperationId::FilesList, files).is_err(),
                "{bad}"
            );
        }
        // Batches are always newest first, whatever `order` says, and take no `order`.
        let batches = defaults(OperationId::BatchList).unwrap();
        let parsed = ListQuery::parse(Some("order=asc"), OperationId::BatchList, batches)
            .ok()
            .unwrap();
        assert!(parsed.descending);
        assert!(ListQuery::parse(Some("limit=101"), OperationId::BatchList, batches).is_err());
        // Evals are merged by when they were made.
        let evals = defaults(OperationId::ListEvals).unwrap();
        assert!(
            ListQuery::parse(Some("order_by=updated_at"), OperationId::ListEvals, evals).is_err()
        );
        assert!(
            ListQuery::parse(Some("order_by=created_at"), OperationId::ListEvals, evals).is_ok()
        );
    }

    #[test]
    fn cursors_are_kept_for_an_hour_and_the_oldest_go_first() {
        let cursors = ListCursors::default();
        let start = Instant::now();
        let cursor = Cursor {
            standings: vec![Standing::Done],
            boundary: Boundary {
                at: 1.0,
                member: 0,
                tied: Vec::new(),
            },
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
