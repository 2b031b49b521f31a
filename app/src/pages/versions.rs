//! The stored config versions on the gateways page: the difference between two (`?from=&to=`, a
//! plain GET form, so it works before hydration) and the roll-back to one of them.

use leptos::prelude::*;
use leptos::server::ServerAction;
use leptos_router::hooks::use_query_map;

use super::{Failure, error_text, published_note, unplaced};
use crate::api::{
    DiffLineView, Rollback, SaveGatewaySettings, VersionView, list_versions, version_diff,
};

/// Versions, diff and roll-back; listed again after a roll-back or a save of the gateway
/// settings (`settings`), which both publish a version.
#[component]
pub fn Versions(
    rollback: ServerAction<Rollback>,
    settings: ServerAction<SaveGatewaySettings>,
) -> impl IntoView {
    let query = use_query_map();
    let versions = Resource::new(
        move || (rollback.version().get(), settings.version().get()),
        |_| list_versions(),
    );
    let wanted = move || {
        let query = query.read();
        let number = |name: &str| query.get(name).and_then(|v| v.parse::<i64>().ok());
        number("from").zip(number("to"))
    };
    let diff = Resource::new(wanted, |pair| async move {
        match pair {
            Some((from, to)) => version_diff(from, to).await.map(Some),
            None => Ok(None),
        }
    });
    view! {
        <section class="panel">
            <h2>"Config versions"</h2>
            {move || {
                rollback
                    .value()
                    .get()
                    .and_then(Result::ok)
                    .map(|published| {
                        let saved = format!(
                            "Rolled back: published as version {}.",
                            published.version,
                        );
                        published_note(&published, "Rolled back", Some(saved))
                    })
            }}
            {unplaced(last_error!(rollback), &[])}
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
                {move || Suspend::new(async move {
                    match versions.await {
                        Ok(rows) if rows.is_empty() => {
                            view! { <p class="empty">"No version published yet."</p> }.into_any()
                        }
                        Ok(rows) => {
                            let chosen = wanted();
                            let numbers = rows.iter().map(|row| row.version).collect();
                            view! {
                                {diff_form(numbers, chosen)}
                                {versions_table(rows, rollback)}
                            }
                                .into_any()
                        }
                        Err(error) => view! { <Failure error /> }.into_any(),
                    }
                })}
            </Transition>
            <Suspense fallback=|| ()>
                {move || Suspend::new(async move {
                    match diff.await {
                        Ok(Some(lines)) => diff_view(lines).into_any(),
                        Ok(None) => ().into_any(),
                        Err(error) => view! { <Failure error /> }.into_any(),
                    }
                })}
            </Suspense>
        </section>
    }
}

fn diff_form(versions: Vec<i64>, chosen: Option<(i64, i64)>) -> impl IntoView {
    let newest = versions.first().copied().unwrap_or(0);
    let (from, to) = chosen.unwrap_or((newest - 1, newest));
    let options = |selected: i64| {
        versions
            .iter()
            .map(|&version| {
                view! {
                    <option value=version.to_string() selected=version == selected>
                        {format!("version {version}")}
                    </option>
                }
            })
            .collect_view()
    };
    view! {
        <form method="get" action="/gateways" class="form-grid" data-testid="diff-form">
            <label>"From" <select name="from">{options(from)}</select></label>
            <label>"To" <select name="to">{options(to)}</select></label>
            <div class="form-actions">
                <button type="submit" class="btn">
                    "Show differences"
                </button>
            </div>
        </form>
    }
}

fn versions_table(rows: Vec<VersionView>, rollback: ServerAction<Rollback>) -> impl IntoView {
    let newest = rows.first().map_or(0, |row| row.version);
    view! {
        <div class="table-wrap">
            <table class="table" data-testid="versions">
                <thead>
                    <tr>
                        <th>"Version"</th>
                        <th>"Published"</th>
                        <th>"By"</th>
                        <th>"Actions"</th>
                    </tr>
                </thead>
                <tbody>
                    {rows
                        .into_iter()
                        .map(|row| {
                            let current = row.version == newest;
                            let version = row.version.to_string();
                            let compare = format!(
                                "/gateways?from={}&to={newest}",
                                row.version,
                            );
                            view! {
                                <tr>
                                    <td>{row.version}</td>
                                    <td>{row.created_at}</td>
                                    <td>{row.created_by}</td>
                                    <td class="actions">
                                        {if current {
                                            view! { <span class="badge badge-active">"current"</span> }
                                                .into_any()
                                        } else {
                                            view! {
                                                <a class="btn btn-quiet" href=compare>
                                                    "Compare with current"
                                                </a>
                                                <ActionForm action=rollback attr:class="inline">
                                                    <input type="hidden" name="version" value=version />
                                                    <input type="hidden" name="latest" value=newest.to_string() />
                                                    <button type="submit" class="btn btn-danger">
                                                        "Roll back to this"
                                                    </button>
                                                </ActionForm>
                                            }
                                                .into_any()
                                        }}
                                    </td>
                                </tr>
                            }
                        })
                        .collect_view()}
                </tbody>
            </table>
        </div>
    }
}

fn diff_view(lines: Vec<DiffLineView>) -> impl IntoView {
    if lines.is_empty() {
        return view! { <p class="empty">"The two versions are the same."</p> }.into_any();
    }
    view! {
        <pre class="version-diff" data-testid="version-diff">
            {lines
                .into_iter()
                .map(|line| {
                    let class = match line.tag {
                        '+' => "diff-add",
                        '-' => "diff-remove",
                        '…' => "diff-gap",
                        _ => "diff-same",
                    };
                    let text = if line.tag == '…' {
                        "…".to_owned()
                    } else {
                        format!("{} {}", line.tag, line.text)
                    };
                    view! { <span class=class>{text}</span> }
                })
                .collect_view()}
        </pre>
    }
    .into_any()
}
