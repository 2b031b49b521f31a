//! The alerts page (Admin): every rule, whether it fires, since when, what was observed last, and
//! the subjects (pool members, quota subjects, subscription keys) that fire or are being watched.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::usage::Problem;

/// One rule as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    /// Rule name.
    pub name: String,
    /// The condition, as text.
    pub condition: String,
    /// Whether it fires.
    pub firing: bool,
    /// Since when (UTC).
    pub since: Option<String>,
    /// Last observed value.
    pub observed: Option<String>,
    /// Last evaluation (UTC).
    pub checked_at: Option<String>,
    /// Why the last evaluation or notification failed.
    pub error: Option<String>,
    /// The subjects that fire or are being watched.
    pub subjects: Vec<AlertSubjectView>,
}

/// One subject of a rule that fires or is being watched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertSubjectView {
    /// Whether it fires.
    pub firing: bool,
    /// Firing: since when; watched: since when its condition holds (UTC).
    pub since: String,
    /// What was observed last.
    pub observed: String,
}

/// The alert rules and their states: Admin.
#[server(endpoint = "list_alerts")]
pub async fn list_alerts() -> Result<Vec<AlertView>, ServerFnError> {
    use crate::usage::ssr::{insights_and_user, to_error};
    use gatehouse_portal_core::insights::iso_utc;
    let (insights, user) = insights_and_user().await?;
    let states = insights.alerts(user.as_ref()).map_err(to_error)?;
    Ok(states
        .into_iter()
        .map(|state| AlertView {
            name: state.rule.name.clone(),
            condition: serde_json::to_string(&state.rule.condition).unwrap_or_default(),
            firing: state.firing,
            since: state.since.map(iso_utc),
            observed: state.observed,
            checked_at: state.checked_at.map(iso_utc),
            error: state.error,
            subjects: state
                .subjects
                .into_iter()
                // A rule watching one figure has one unnamed subject: its row says it all.
                .filter(|subject| !subject.subject.is_empty())
                .map(|subject| AlertSubjectView {
                    firing: subject.firing,
                    since: iso_utc(subject.since),
                    observed: subject.observed,
                })
                .collect(),
        })
        .collect())
}

/// The alerts page.
#[component]
pub fn Alerts() -> impl IntoView {
    let list = Resource::new(|| (), |()| list_alerts());
    view! {
        <h1>"Alerts"</h1>
        <p class="muted">
            "Rules are evaluated every minute; each change is sent once to the configured webhook."
        </p>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(rows) if rows.is_empty() => {
                        view! { <p class="empty">"No alert rules are configured (--alert-rules)."</p> }
                            .into_any()
                    }
                    Ok(rows) => {
                        view! {
                            <div class="table-wrap">
                                <table class="table" id="alerts-table">
                                    <thead>
                                        <tr>
                                            <th>"Rule"</th>
                                            <th>"State"</th>
                                            <th>"Last observed"</th>
                                            <th>"Checked"</th>
                                            <th>"Condition"</th>
                                        </tr>
                                    </thead>
                                    <tbody>
                                        {rows
                                            .into_iter()
                                            .map(|a| {
                                                let state = if a.firing {
                                                    format!("firing since {}", a.since.unwrap_or_default())
                                                } else {
                                                    "ok".to_owned()
                                                };
                                                let class = if a.firing { "badge badge-revoked" } else { "badge badge-active" };
                                                view! {
                                                    <tr class="alert-row">
                                                        <td>{a.name}</td>
                                                        <td>
                                                            <span class=class>{state}</span>
                                                            {a.error.map(|e| view! { <span class="error-text">{e}</span> })}
                                                        </td>
                                                        <td>
                                                            {a.observed.unwrap_or_default()}
                                                            <ul class="alert-subjects">
                                                                {a
                                                                    .subjects
                                                                    .into_iter()
                                                                    .map(|s| {
                                                                        let label = if s.firing {
                                                                            format!("firing since {}", s.since)
                                                                        } else {
                                                                            format!("watched since {}", s.since)
                                                                        };
                                                                        view! {
                                                                            <li class="alert-subject">
                                                                                <span class="muted">{label}": "</span>
                                                                                {s.observed}
                                                                            </li>
                                                                        }
                                                                    })
                                                                    .collect_view()}
                                                            </ul>
                                                        </td>
                                                        <td>{a.checked_at.unwrap_or_else(|| "not yet".to_owned())}</td>
                                                        <td><code>{a.condition}</code></td>
                                                    </tr>
                                                }
                                            })
                                            .collect_view()}
                                    </tbody>
                                </table>
                            </div>
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Problem error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}
