//! Audit search (Auditor, Admin): filters in a GET form, results with keyset paging, the detail
//! of one call with the prompt and the completion as text (never HTML), and links to the
//! streamed CSV / JSON-lines export. Every search and every detail view is recorded in the
//! activity log on the server before it runs; one that a link on another site asked for does not
//! run (and is not recorded) until the user asks for it again from the portal, one click away.

#![allow(
    clippy::too_many_arguments,
    reason = "the search server function takes one argument per form field (also in the code #[server] generates)"
)]
#![expect(
    missing_docs,
    reason = "#[server] turns each documented function's parameters into the fields of an argument struct"
)]

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;
use serde::{Deserialize, Serialize};

use crate::ServerLink;
use crate::usage::{Problem, RangeFields, Warnings, query_string, thousands};

/// One call in the results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRowView {
    /// Correlation id.
    pub id: String,
    /// When (UTC).
    pub time: String,
    /// User name or object id.
    pub user: String,
    /// Caller address.
    pub caller: String,
    /// Model.
    pub model: String,
    /// Deployment.
    pub deployment: String,
    /// Operation.
    pub operation: String,
    /// Status.
    pub status: i32,
    /// Subscription.
    pub subscription: String,
    /// Total tokens.
    pub tokens: String,
    /// Total time, ms.
    pub total_ms: i64,
}

/// A page of results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchData {
    /// The calls.
    pub rows: Vec<AuditRowView>,
    /// Query string of the next page, if any.
    pub next_query: Option<String>,
    /// Query string of the search without cursor (exports).
    pub query: String,
    /// The source's warnings.
    pub warnings: Vec<String>,
}

/// One message of a prompt or a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    /// Who speaks, or what the item is; empty when the capture does not say.
    pub label: String,
    /// What it says (shown as text).
    pub text: String,
}

/// A captured prompt or completion, as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TranscriptView {
    /// Messages in order.
    Messages(Vec<MessageView>),
    /// Text of another shape, as captured (JSON pretty-printed).
    Text(String),
    /// Not captured, or removed by content retention.
    Missing,
}

/// One backend attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    /// The pool member tried.
    pub backend: String,
    /// What it answered (`–` when the connection failed).
    pub status: String,
    /// Time to its answer's head.
    pub elapsed: String,
    /// Why it did not answer the call.
    pub error: String,
}

/// How much of a body the call page shows, in characters: the page carries it twice (as HTML
/// and in the data the app starts from), so a body of megabytes is not put in it whole.
pub const BODY_SHOWN: usize = 256 * 1024;

/// A captured body, byte for byte as kept (never reformatted: key order, duplicate keys and
/// escapes are part of the evidence), up to [`BODY_SHOWN`] characters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BodyView {
    /// The text shown.
    pub text: String,
    /// The whole body's length in characters.
    pub chars: usize,
}

/// One call in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    /// Correlation id.
    pub id: String,
    /// The list columns.
    pub row: AuditRowView,
    /// Backend of the final attempt.
    pub backend: String,
    /// Attempts (JSON text) when they do not read as [`CallView::attempt_rows`]; empty when
    /// they do.
    pub attempts: String,
    /// The attempts, one row each.
    pub attempt_rows: Option<Vec<AttemptView>>,
    /// Prompt tokens.
    pub prompt_tokens: String,
    /// Completion tokens.
    pub completion_tokens: String,
    /// Token counts are estimates.
    pub tokens_estimated: bool,
    /// Time to first byte.
    pub time_to_first_byte: String,
    /// Time to first token.
    pub time_to_first_token: String,
    /// The prompt.
    pub prompt: TranscriptView,
    /// The completion.
    pub completion: TranscriptView,
    /// The request body as captured (its first [`BODY_SHOWN`] characters), when kept.
    pub request_body: Option<BodyView>,
    /// The response body as captured, when kept.
    pub response_body: Option<BodyView>,
    /// Request body cut at the capture limit.
    pub request_truncated: bool,
    /// Response body cut.
    pub response_truncated: bool,
    /// The client hung up early.
    pub client_aborted: bool,
    /// Chain position, if chained.
    pub chain: Option<String>,
    /// Result of the chain check, if asked for.
    pub chain_check: Option<String>,
    /// Whether the chain verified (when checked).
    pub chain_ok: Option<bool>,
    /// The source's warnings.
    pub warnings: Vec<String>,
}

/// What a search or a call opened gives back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Look<T> {
    /// It ran, and is in the activity log.
    Done(T),
    /// The request came from another site (`Sec-Fetch-Site`, see
    /// `crate::ssr::from_another_site`): nothing ran and nothing was recorded; the page offers to
    /// run it from the portal.
    FromAnotherSite,
}

const FIELDS: [&str; 12] = [
    "range",
    "from",
    "to",
    "user",
    "caller",
    "model",
    "deployment",
    "operation",
    "status",
    "subscription",
    "text",
    "limit",
];

#[cfg(feature = "ssr")]
fn row_view(row: gatehouse_portal_core::insights::CallRow) -> AuditRowView {
    AuditRowView {
        time: gatehouse_portal_core::insights::iso_utc(row.time_generated),
        user: row
            .user_name
            .clone()
            .or(row.user_id.clone())
            .unwrap_or_default(),
        caller: row.caller_ip_address,
        model: row.model_name.unwrap_or_default(),
        deployment: row.deployment_name.unwrap_or_default(),
        operation: row.operation_id,
        status: row.response_code,
        subscription: row.apim_subscription_id.unwrap_or_default(),
        tokens: row.total_tokens.map(thousands).unwrap_or_default(),
        total_ms: row.total_time,
        id: row.correlation_id,
    }
}

/// A bound of a range for a link: `YYYY-MM-DDTHH:MM:SS` (UTC, as the form's `datetime-local`
/// fields show it) on a whole second, RFC 3339 to the nanosecond otherwise; both read back as the
/// same instant.
#[cfg(feature = "ssr")]
fn link_time(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    if at.nanosecond() == 0 {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        )
    } else {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| gatehouse_portal_core::insights::iso_utc(at))
    }
}

/// The query strings of a results page: its search (the exports), and the next page's, when there
/// is one. Both keep the page's range as absolute `from`/`to` (and the preset's name, which the
/// form shows): re-reading a preset such as `24h` later would move the window, so that an export
/// made minutes after the page would not hold the calls it showed, and the keyset cursor would
/// skip the calls between the two windows' ends.
#[cfg(feature = "ssr")]
fn page_queries(
    form: &gatehouse_portal_core::insights::SearchForm,
    range: &gatehouse_portal_core::insights::TimeRange,
    next: Option<&str>,
) -> (String, Option<String>) {
    let values = [
        form.range.as_str(),
        &form.from,
        &form.to,
        &form.user,
        &form.caller,
        &form.model,
        &form.deployment,
        &form.operation,
        &form.status,
        &form.subscription,
        &form.text,
        &form.limit,
    ];
    let (from, to) = (link_time(range.from), link_time(range.to));
    let pairs: Vec<(&str, &str)> = FIELDS
        .iter()
        .copied()
        .zip(values)
        .map(|(key, value)| match key {
            "from" => (key, from.as_str()),
            "to" => (key, to.as_str()),
            _ => (key, value),
        })
        .collect();
    let query = query_string(&pairs);
    let next_query = next.map(|cursor| {
        let mut next_pairs = pairs.clone();
        next_pairs.push(("cursor", cursor));
        query_string(&next_pairs)
    });
    (query, next_query)
}

/// One page of an audit search: Auditor, Admin; recorded in the activity log. Not run when the
/// request came from another site.
#[server(endpoint = "audit_search")]
pub async fn audit_search(
    range: String,
    from: String,
    to: String,
    user: String,
    caller: String,
    model: String,
    deployment: String,
    operation: String,
    status: String,
    subscription: String,
    text: String,
    limit: String,
    cursor: String,
) -> Result<Look<SearchData>, ServerFnError> {
    use crate::usage::ssr::{insights_and_user, to_error};
    use gatehouse_portal_core::insights::{SearchForm, SearchRequest};
    if crate::ssr::request_from_another_site() {
        return Ok(Look::FromAnotherSite);
    }
    let (insights, signed_in) = insights_and_user().await?;
    let form = SearchForm {
        range,
        from,
        to,
        user,
        caller,
        model,
        deployment,
        operation,
        status,
        subscription,
        text,
        cursor,
        limit,
    };
    // A preset range ends now, to the whole second, so that the next page's link carries bounds
    // the form's `datetime-local` fields can show.
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let request = SearchRequest::parse(&form, now).map_err(to_error)?;
    let answer = insights
        .search(signed_in.as_ref(), &request)
        .await
        .map_err(to_error)?;
    let (query, next_query) = page_queries(&form, &request.range, answer.value.next.as_deref());
    Ok(Look::Done(SearchData {
        rows: answer.value.items.into_iter().map(row_view).collect(),
        next_query,
        query,
        warnings: answer.warnings,
    }))
}

/// One call in full (its chain verified when `verify` is `1`): Auditor, Admin; recorded. Neither
/// shown nor verified when the request came from another site.
#[server(endpoint = "audit_call")]
pub async fn audit_call(id: String, verify: String) -> Result<Look<CallView>, ServerFnError> {
    use crate::usage::ssr::{insights_and_user, to_error};
    use gatehouse_portal_core::insights::ChainCheck;
    use gatehouse_portal_core::insights::transcript::{self, Transcript};
    /// A captured body, its start when it is long.
    fn body_view(body: String) -> BodyView {
        let chars = body.chars().count();
        let text = if chars > BODY_SHOWN {
            body.chars().take(BODY_SHOWN).collect()
        } else {
            body
        };
        BodyView { text, chars }
    }
    /// A captured prompt or completion, read for the page.
    fn transcript_view(captured: Option<&str>) -> TranscriptView {
        match captured.map(transcript::transcript) {
            None => TranscriptView::Missing,
            Some(Transcript::Text(text)) => TranscriptView::Text(text),
            Some(Transcript::Entries(entries)) => TranscriptView::Messages(
                entries
                    .into_iter()
                    .map(|entry| MessageView {
                        label: entry.label,
                        text: entry.text,
                    })
                    .collect(),
            ),
        }
    }
    if crate::ssr::request_from_another_site() {
        return Ok(Look::FromAnotherSite);
    }
    let (insights, signed_in) = insights_and_user().await?;
    let answer = insights
        .call(signed_in.as_ref(), &id, verify == "1")
        .await
        .map_err(to_error)?;
    let report = answer.value;
    let call = report.call;
    let (chain_check, chain_ok) = match report.chain_check {
        None => (None, None),
        Some(ChainCheck::NotChained) => (
            Some("the record carries no chain link".to_owned()),
            Some(false),
        ),
        Some(ChainCheck::Intact { records }) => (
            Some(format!("intact: all {records} records of the chain verify")),
            Some(true),
        ),
        Some(ChainCheck::Broken { detail }) => (Some(format!("BROKEN: {detail}")), Some(false)),
        Some(ChainCheck::Unavailable(why)) => (Some(why), None),
    };
    let opt = |v: Option<i64>| v.map(thousands).unwrap_or_else(|| "–".to_owned());
    let attempt_rows = transcript::attempt_rows(&call.attempts).map(|rows| {
        rows.into_iter()
            .map(|row| AttemptView {
                backend: row.backend_id,
                status: opt(row.status.map(i64::from)),
                elapsed: format!(
                    "{} ms",
                    thousands(i64::try_from(row.elapsed_ms).unwrap_or(i64::MAX))
                ),
                error: row.error.unwrap_or_default(),
            })
            .collect()
    });
    Ok(Look::Done(CallView {
        id: call.row.correlation_id.clone(),
        backend: call.backend_id.unwrap_or_default(),
        attempts: if attempt_rows.is_some() {
            String::new()
        } else {
            call.attempts
        },
        attempt_rows,
        prompt_tokens: opt(call.prompt_tokens),
        completion_tokens: opt(call.completion_tokens),
        tokens_estimated: call.tokens_estimated,
        time_to_first_byte: call
            .time_to_first_byte
            .map(|v| format!("{} ms", thousands(v)))
            .unwrap_or_else(|| "–".to_owned()),
        time_to_first_token: call
            .time_to_first_token
            .map(|v| format!("{} ms", thousands(v)))
            .unwrap_or_else(|| "–".to_owned()),
        prompt: transcript_view(call.request_messages.as_deref()),
        completion: transcript_view(call.response_messages.as_deref()),
        request_body: call.request_body.map(body_view),
        response_body: call.response_body.map(body_view),
        request_truncated: call.request_truncated,
        response_truncated: call.response_truncated,
        client_aborted: call.client_aborted,
        chain: call
            .chain
            .map(|c| format!("{} #{} · hash {}", c.chain_id, c.sequence, c.record_hash)),
        chain_check,
        chain_ok,
        warnings: answer.warnings,
        row: row_view(call.row),
    }))
}

fn text_field(name: &'static str, label: &'static str, value: String) -> impl IntoView {
    view! { <label>{label} <input name=name value=value maxlength="256" /></label> }
}

/// The search page.
#[component]
pub fn AuditSearch() -> impl IntoView {
    let query = use_query_map();
    let asked = move || {
        query.with(|q| {
            let mut values: Vec<String> = FIELDS
                .iter()
                .map(|f| q.get(f).unwrap_or_default())
                .collect();
            values.push(q.get("cursor").unwrap_or_default());
            values
        })
    };
    let searched =
        move || query.with(|q| q.get_str("range").is_some() || q.get_str("from").is_some());
    let data = Resource::new(
        move || (searched(), asked()),
        |(searched, v)| async move {
            if !searched {
                // Nothing asked yet: no search runs, and none is recorded.
                return Ok(None);
            }
            let mut v = v.into_iter();
            let mut next = move || v.next().unwrap_or_default();
            audit_search(
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
            )
            .await
            .map(Some)
        },
    );
    let values = asked();
    let get = |i: usize| values.get(i).cloned().unwrap_or_default();
    // The page's own address, for the link that runs a search another site's link asked for.
    let this_search = move || {
        let values = asked();
        let pairs: Vec<(&str, &str)> = FIELDS
            .iter()
            .copied()
            .chain(["cursor"])
            .zip(values.iter().map(String::as_str))
            .collect();
        format!("/audit?{}", query_string(&pairs))
    };
    view! {
        <h1>"Audit search"</h1>
        <form method="get" action="/audit" class="form-grid" id="audit-form">
            <RangeFields range=get(0) from=get(1) to=get(2) />
            {text_field("user", "User (name, UPN or object id)", get(3))}
            {text_field("caller", "Caller IP or CIDR", get(4))}
            {text_field("model", "Model", get(5))}
            {text_field("deployment", "Deployment", get(6))}
            {text_field("operation", "Operation", get(7))}
            {text_field("status", "Status", get(8))}
            {text_field("subscription", "Subscription", get(9))}
            {text_field("text", "Words in prompt or completion", get(10))}
            <input type="hidden" name="limit" value=get(11) />
            <div class="form-actions">
                <button type="submit" class="btn btn-primary">"Search"</button>
            </div>
        </form>
        <p class="muted">"Every search and every call opened is recorded in the activity log."</p>
        <Suspense fallback=|| view! { <p class="muted">"Searching…"</p> }>
            {move || {
                let this_search = this_search();
                Suspend::new(async move {
                    match data.await {
                        Ok(Some(Look::Done(page))) => results(page).into_any(),
                        Ok(Some(Look::FromAnotherSite)) => {
                            view! {
                                <HeldBack
                                    id="audit-held-back"
                                    explanation="This search comes from a link on another site, so it has not run and nothing is in the activity log. Check the filters above, then run it:"
                                    href=this_search
                                    link_id="audit-run"
                                >
                                    "Run this search"
                                </HeldBack>
                            }
                                .into_any()
                        }
                        Ok(None) => view! { <p class="empty">"Choose filters and search."</p> }.into_any(),
                        Err(error) => view! { <Problem error /> }.into_any(),
                    }
                })
            }}
        </Suspense>
    }
}

fn results(page: SearchData) -> impl IntoView {
    let csv = format!("/audit/export?format=csv&{}", page.query);
    let jsonl = format!("/audit/export?format=jsonl&{}", page.query);
    let empty = page.rows.is_empty();
    view! {
        <Warnings warnings=page.warnings />
        <p>
            <ServerLink href=csv id="audit-export-csv">"Export CSV"</ServerLink>
            " "
            <ServerLink href=jsonl id="audit-export-jsonl">"Export JSON lines"</ServerLink>
        </p>
        {if empty {
            view! { <p class="empty" id="audit-no-results">"No calls match."</p> }.into_any()
        } else {
            view! {
                <div class="table-wrap">
                    <table class="table" id="audit-results">
                        <thead>
                            <tr>
                                <th>"Time (UTC)"</th>
                                <th>"User"</th>
                                <th>"Caller"</th>
                                <th>"Deployment"</th>
                                <th>"Model"</th>
                                <th>"Operation"</th>
                                <th>"Status"</th>
                                <th>"Subscription"</th>
                                <th>"Tokens"</th>
                                <th>"Time"</th>
                            </tr>
                        </thead>
                        <tbody>
                            {page
                                .rows
                                .into_iter()
                                .map(|r| {
                                    let href = format!("/audit/call?{}", query_string(&[("id", &r.id)]));
                                    view! {
                                        <tr class="audit-row" data-id=r.id.clone()>
                                            <td>
                                                <a href=href class="audit-open">{r.time}</a>
                                            </td>
                                            <td>{r.user}</td>
                                            <td>{r.caller}</td>
                                            <td>{r.deployment}</td>
                                            <td>{r.model}</td>
                                            <td>{r.operation}</td>
                                            <td>{r.status}</td>
                                            <td>{r.subscription}</td>
                                            <td class="num">{r.tokens}</td>
                                            <td class="num">{format!("{} ms", thousands(r.total_ms))}</td>
                                        </tr>
                                    }
                                })
                                .collect_view()}
                        </tbody>
                    </table>
                </div>
            }
                .into_any()
        }}
        {page
            .next_query
            .map(|q| {
                view! {
                    <p>
                        <a class="btn" href=format!("/audit?{q}") id="audit-next">"Next page"</a>
                    </p>
                }
            })}
    }
}

/// What a page shows instead of a look (a search, a call) that a link on another site asked
/// for: nothing ran and nothing was recorded until the auditor follows the link to run it.
#[component]
fn HeldBack(
    /// The notice's id.
    id: &'static str,
    /// What was held back and why.
    explanation: &'static str,
    /// The look's own address, to run it from here.
    href: String,
    /// The link's id.
    link_id: &'static str,
    children: Children,
) -> impl IntoView {
    view! {
        <div class="callout callout-warn" role="status" id=id>
            <p>{explanation}</p>
            <p>
                <ServerLink href id=link_id>
                    {children()}
                </ServerLink>
            </p>
        </div>
    }
}

fn flag(on: bool, text: &'static str) -> Option<impl IntoView> {
    on.then(|| view! { <span class="badge badge-warn">{text}</span> })
}

/// One call in full.
#[component]
pub fn AuditCall() -> impl IntoView {
    let query = use_query_map();
    let asked = move || {
        query.with(|q| {
            (
                q.get("id").unwrap_or_default(),
                q.get("verify").unwrap_or_default(),
            )
        })
    };
    let data = Resource::new(asked, |(id, verify)| audit_call(id, verify));
    view! {
        <h1>"Call"</h1>
        <p><a href="/audit" class="muted">"← audit search"</a></p>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || {
                // The page's own address, for the link that opens a call another site's link
                // asked for.
                let (id, verify) = asked();
                let this_call = format!(
                    "/audit/call?{}",
                    query_string(&[("id", &id), ("verify", &verify)])
                );
                Suspend::new(async move {
                    match data.await {
                        Ok(Look::Done(call)) => call_view(call).into_any(),
                        Ok(Look::FromAnotherSite) => {
                            view! {
                                <HeldBack
                                    id="call-held-back"
                                    explanation="This call comes from a link on another site, so it is not shown, its chain is not verified and nothing is in the activity log. Open it from here:"
                                    href=this_call
                                    link_id="call-open"
                                >
                                    "Open call "
                                    {id}
                                </HeldBack>
                            }
                                .into_any()
                        }
                        Err(error) => view! { <Problem error /> }.into_any(),
                    }
                })
            }}
        </Suspense>
    }
}

fn call_view(call: CallView) -> impl IntoView {
    let request_body = body(&call.id, BodyOf::Request, call.request_body);
    let response_body = body(&call.id, BodyOf::Response, call.response_body);
    let verify = format!(
        "/audit/call?{}",
        query_string(&[("id", &call.id), ("verify", "1")])
    );
    let r = call.row;
    let chain_class = match call.chain_ok {
        Some(true) => "badge badge-active",
        Some(false) => "badge badge-revoked",
        None => "badge",
    };
    view! {
        <Warnings warnings=call.warnings />
        <dl class="facts" id="call-facts">
            <dt>"Correlation id"</dt><dd><code id="call-id">{call.id}</code></dd>
            <dt>"Time (UTC)"</dt><dd>{r.time}</dd>
            <dt>"User"</dt><dd id="call-user">{r.user}</dd>
            <dt>"Caller"</dt><dd id="call-caller">{r.caller}</dd>
            <dt>"Subscription"</dt><dd>{r.subscription}</dd>
            <dt>"Deployment / model"</dt><dd>{r.deployment} " / " {r.model}</dd>
            <dt>"Operation"</dt><dd>{r.operation}</dd>
            <dt>"Status"</dt><dd id="call-status">{r.status}</dd>
            <dt>"Backend"</dt><dd>{call.backend}</dd>
            <dt>"Tokens"</dt>
            <dd>
                "prompt " {call.prompt_tokens} ", completion " {call.completion_tokens}
                ", total " {r.tokens} " " {flag(call.tokens_estimated, "estimated")}
            </dd>
            <dt>"Timings"</dt>
            <dd>{format!("{} ms in all", thousands(r.total_ms))} ", first byte " {call.time_to_first_byte} ", first token " {call.time_to_first_token}</dd>
            <dt>"Flags"</dt>
            <dd>
                {flag(call.request_truncated, "request truncated")}
                {flag(call.response_truncated, "response truncated")}
                {flag(call.client_aborted, "client aborted")}
            </dd>
            <dt>"Hash chain"</dt>
            <dd id="call-chain">
                {call.chain.unwrap_or_else(|| "not chained".to_owned())} " "
                {match call.chain_check {
                    Some(text) => view! { <span class=chain_class id="call-chain-check">{text}</span> }.into_any(),
                    None => view! { <a href=verify class="btn btn-quiet" id="call-verify">"Verify chain"</a> }.into_any(),
                }}
            </dd>
        </dl>
        <h2>"Prompt"</h2>
        <div class="transcript" id="call-prompt">{transcript(call.prompt)}</div>
        <h2>"Completion"</h2>
        <div class="transcript" id="call-completion">{transcript(call.completion)}</div>
        <h2>"Attempts"</h2>
        {attempts(call.attempt_rows, call.attempts)}
        <h2>"Bodies"</h2>
        {request_body}
        {response_body}
    }
}

/// A prompt or a completion: each message under its speaker, as text.
fn transcript(transcript: TranscriptView) -> AnyView {
    match transcript {
        TranscriptView::Messages(messages) if !messages.is_empty() => messages
            .into_iter()
            .map(|message| {
                let label = if message.label.is_empty() {
                    "–".to_owned()
                } else {
                    message.label
                };
                view! {
                    <div class="message">
                        <div class="message-label">{label}</div>
                        <div class="content message-text">{shown(message.text)}</div>
                    </div>
                }
            })
            .collect_view()
            .into_any(),
        TranscriptView::Messages(_) => view! { <div class="content">"(empty)"</div> }.into_any(),
        TranscriptView::Text(text) => view! { <div class="content">{shown(text)}</div> }.into_any(),
        TranscriptView::Missing => {
            view! { <p class="muted">"(not captured, or removed by retention)"</p> }.into_any()
        }
    }
}

/// Text for a block that keeps its line breaks (a `div`, not a `pre`, whose first line break the
/// HTML parser drops); an empty text says so.
fn shown(text: String) -> String {
    if text.is_empty() {
        "(empty)".to_owned()
    } else {
        text
    }
}

/// The backend attempts as a table (as captured when they do not read as rows).
fn attempts(rows: Option<Vec<AttemptView>>, raw: String) -> AnyView {
    let Some(rows) = rows else {
        return view! { <div class="content" id="call-attempts">{shown(raw)}</div> }.into_any();
    };
    view! {
        <div class="table-wrap">
        <table class="table" id="call-attempts">
            <thead><tr><th>"Member"</th><th>"Status"</th><th>"Time"</th><th>"Error"</th></tr></thead>
            <tbody>
                {rows
                    .into_iter()
                    .map(|row| view! {
                        <tr>
                            <td><code>{row.backend}</code></td>
                            <td>{row.status}</td>
                            <td>{row.elapsed}</td>
                            <td>{row.error}</td>
                        </tr>
                    })
                    .collect_view()}
            </tbody>
        </table>
        </div>
    }
    .into_any()
}

/// Which body of a call a section of its page shows.
#[derive(Clone, Copy)]
enum BodyOf {
    Request,
    Response,
}

impl BodyOf {
    /// The section's element id, its title, the `part` of its download and the download link's
    /// element id.
    fn names(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            BodyOf::Request => (
                "call-request-body",
                "Request body",
                "request",
                "call-request-body-download",
            ),
            BodyOf::Response => (
                "call-response-body",
                "Response body",
                "response",
                "call-response-body-download",
            ),
        }
    }
}

/// A captured body as kept, folded away until asked for: its first [`BODY_SHOWN`] characters
/// shown, and a link that downloads all the store holds of it.
fn body(call_id: &str, of: BodyOf, body: Option<BodyView>) -> AnyView {
    let (id, title, part, download_id) = of.names();
    match body {
        Some(body) => {
            let summary = if body.chars > BODY_SHOWN {
                format!(
                    "{title} ({} characters; the first {} shown)",
                    thousands_usize(body.chars),
                    thousands_usize(BODY_SHOWN)
                )
            } else {
                format!("{title} ({} characters)", thousands_usize(body.chars))
            };
            let download = format!(
                "/audit/call/body?{}",
                query_string(&[("id", call_id), ("part", part)])
            );
            view! {
                <details class="body" id=id>
                    <summary>{summary}</summary>
                    <p>
                        <ServerLink href=download id=download_id>
                            "Download the body as stored"
                        </ServerLink>
                    </p>
                    <div class="content">{shown(body.text)}</div>
                </details>
            }
            .into_any()
        }
        None => view! {
            <p class="muted" id=id>{format!("{title}: not captured, or removed by retention")}</p>
        }
        .into_any(),
    }
}

fn thousands_usize(n: usize) -> String {
    thousands(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[cfg(feature = "ssr")]
mod tests {
    use super::*;
    use gatehouse_portal_core::insights::{SearchForm, SearchRequest};
    use time::Duration;
    use time::macros::datetime;

    /// The form a query string fills in, as the page reads it back.
    fn form_of(query: &str) -> SearchForm {
        fn decode(text: &str) -> String {
            let bytes = text.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        }
        let fields: serde_json::Map<String, serde_json::Value> = query
            .split('&')
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap();
                (decode(key), serde_json::Value::String(decode(value)))
            })
            .collect();
        serde_json::from_value(serde_json::Value::Object(fields)).unwrap()
    }

    #[test]
    fn the_next_page_and_the_exports_keep_the_pages_range() {
        let preset = SearchForm {
            range: "24h".into(),
            user: "alice@contoso.com".into(),
            limit: "5".into(),
            ..SearchForm::default()
        };
        let open_ended = SearchForm {
            from: "2026-11-30T09:00".into(),
            ..preset.clone()
        };
        for (form, now) in [
            (&preset, datetime!(2026-12-01 10:00:30 UTC)),
            (&preset, datetime!(2026-12-01 10:00:30.123456789 UTC)),
            (&open_ended, datetime!(2026-12-01 10:00:30 UTC)),
        ] {
            let first = SearchRequest::parse(form, now).unwrap();
            let (query, next) = page_queries(form, &first.range, Some("cursor-1"));
            // An export made an hour later holds the calls the page showed.
            let export = SearchRequest::parse(&form_of(&query), now + Duration::HOUR).unwrap();
            assert_eq!(export.range, first.range, "{query}");
            assert_eq!(export.cursor, None);
            assert_eq!(form_of(&query).range, "24h", "the preset's name stays");
            let next_form = form_of(&next.unwrap());
            assert_eq!(next_form.range, "24h", "the preset's name stays");
            assert_eq!(next_form.cursor, "cursor-1");
            assert_eq!(next_form.user, "alice@contoso.com");
            // An hour later, the second page still reads the first page's window.
            let second = SearchRequest::parse(&next_form, now + Duration::HOUR).unwrap();
            assert_eq!(second.range, first.range, "{next_form:?}");
            assert_eq!(second.cursor.as_deref(), Some("cursor-1"));
            assert_eq!(second.user, first.user);
            assert_eq!(second.limit, 5);
        }
        let whole = SearchRequest::parse(&preset, datetime!(2026-12-01 10:00:30 UTC)).unwrap();
        let (_, next) = page_queries(&preset, &whole.range, Some("c"));
        assert_eq!(
            next.unwrap(),
            "range=24h&from=2026-11-30T10%3A00%3A30&to=2026-12-01T10%3A00%3A30&user=alice%40contoso.com&limit=5&cursor=c",
            "whole seconds as the form's datetime-local fields show them"
        );
        let (_, last) = page_queries(&preset, &whole.range, None);
        assert_eq!(last, None);
    }
}
