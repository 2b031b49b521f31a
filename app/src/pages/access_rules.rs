//! Access rules: list, create, edit (`?edit=ID`), delete. The forms post to server functions, so
//! they work before hydration; a refusal is shown beside the field it names. The edit and delete
//! forms carry the version of the rule they were opened on: a rule someone else changed since is
//! not overwritten, the form says so instead.

use leptos::prelude::*;
use leptos::server::ServerAction;
use leptos_router::hooks::use_query_map;

use super::{Failure, beside, error_text, published_note, saved_version, unplaced};
use crate::api::{
    AccessRuleView, CreateAccessRule, DeleteAccessRule, UpdateAccessRule, list_access_rules,
};

const GRANTEE_KINDS: [(&str, &str); 4] = [
    ("group", "Entra group"),
    ("subscription", "Subscription"),
    ("user", "Entra user"),
    ("app_role", "App role"),
];

const QUOTA_PERIODS: [&str; 5] = ["hourly", "daily", "weekly", "monthly", "yearly"];

/// The form's fields, as the server names them in a refusal.
const FIELDS: [&str; 10] = [
    "id",
    "grantee_kind",
    "grantee_id",
    "grantee_display_name",
    "deployments",
    "operations",
    "requests_per_minute",
    "tokens_per_minute",
    "quota_tokens",
    "quota_period",
];

fn number(value: Option<i64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn grantee_text(rule: &AccessRuleView) -> String {
    let kind = GRANTEE_KINDS
        .iter()
        .find(|(kind, _)| *kind == rule.grantee_kind)
        .map_or(rule.grantee_kind.as_str(), |(_, label)| label);
    if rule.grantee_display_name.is_empty() {
        format!("{kind} {}", rule.grantee_id)
    } else {
        format!("{kind} {} ({})", rule.grantee_display_name, rule.grantee_id)
    }
}

fn limits_text(rule: &AccessRuleView) -> String {
    let mut parts = Vec::new();
    if let Some(rpm) = rule.requests_per_minute {
        parts.push(format!("{rpm} requests/min"));
    }
    if let Some(tpm) = rule.tokens_per_minute {
        parts.push(format!("{tpm} tokens/min"));
    }
    if let (Some(tokens), Some(period)) = (rule.quota_tokens, &rule.quota_period) {
        parts.push(format!("{tokens} tokens {period}"));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The access-rules page.
#[component]
pub fn AccessRules() -> impl IntoView {
    let create = ServerAction::<CreateAccessRule>::new();
    let update = ServerAction::<UpdateAccessRule>::new();
    let delete = ServerAction::<DeleteAccessRule>::new();
    let query = use_query_map();
    let list = Resource::new(
        move || {
            (
                create.version().get(),
                update.version().get(),
                delete.version().get(),
            )
        },
        |_| list_access_rules(),
    );
    // The rule being edited, read once per `?edit=` value so that typing is never undone.
    let editing = Resource::new(
        move || query.read().get("edit"),
        |id| async move {
            match id {
                Some(id) => Ok(list_access_rules()
                    .await?
                    .into_iter()
                    .find(|rule| rule.id == id)),
                None => Ok::<_, ServerFnError>(None),
            }
        },
    );
    view! {
        <h1>"Access rules"</h1>
        <p class="muted">
            "Who may call which deployments and operations. Everything no rule grants is denied. "
            "Limits count the grantee's calls on the rule's deployments."
        </p>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(rules) if rules.is_empty() => {
                        view! { <p class="empty">"No access rules yet: every call is refused."</p> }
                            .into_any()
                    }
                    Ok(rules) => rules_table(rules, delete).into_any(),
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Transition>
        {unplaced(last_error!(delete), &[])}
        {not_taken_note!(delete, "Deleted")}
        <Suspense fallback=|| ()>
            {move || Suspend::new(async move {
                match editing.await {
                    Ok(Some(rule)) => rule_form(Some(rule), create, update).into_any(),
                    Ok(None) => rule_form(None, create, update).into_any(),
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}

fn rules_table(
    rules: Vec<AccessRuleView>,
    delete: ServerAction<DeleteAccessRule>,
) -> impl IntoView {
    view! {
        <div class="table-wrap">
            <table class="table" data-testid="access-rules">
                <thead>
                    <tr>
                        <th>"Id"</th>
                        <th>"Grantee"</th>
                        <th>"Deployments"</th>
                        <th>"Operations"</th>
                        <th>"Limits"</th>
                        <th>"Actions"</th>
                    </tr>
                </thead>
                <tbody>
                    {rules
                        .into_iter()
                        .map(|rule| {
                            let grantee = grantee_text(&rule);
                            let limits = limits_text(&rule);
                            let mut deployments = rule.deployments.join(", ");
                            if rule.resources {
                                if !deployments.is_empty() {
                                    deployments.push_str(", ");
                                }
                                deployments.push_str("calls without a deployment");
                            }
                            let operations = if rule.operations.is_empty() {
                                "all".to_owned()
                            } else {
                                rule.operations.join(", ")
                            };
                            let edit = format!("/access-rules?edit={}", rule.id);
                            let (id, version) = (rule.id.clone(), rule.version.clone());
                            view! {
                                <tr>
                                    <td>
                                        <code>{rule.id}</code>
                                    </td>
                                    <td>{grantee}</td>
                                    <td>{deployments}</td>
                                    <td>{operations}</td>
                                    <td>{limits}</td>
                                    <td class="actions">
                                        <a class="btn btn-quiet" href=edit>
                                            "Edit"
                                        </a>
                                        <ActionForm action=delete attr:class="inline">
                                            <input type="hidden" name="id" value=id />
                                            <input type="hidden" name="version" value=version />
                                            <button type="submit" class="btn btn-danger">
                                                "Delete"
                                            </button>
                                        </ActionForm>
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

fn rule_form(
    rule: Option<AccessRuleView>,
    create: ServerAction<CreateAccessRule>,
    update: ServerAction<UpdateAccessRule>,
) -> impl IntoView {
    let editing = rule.is_some();
    let error = if editing {
        last_error!(update)
    } else {
        last_error!(create)
    };
    let rule = rule.unwrap_or_else(|| AccessRuleView {
        grantee_kind: "group".to_owned(),
        ..AccessRuleView::default()
    });
    let version = saved_version(rule.version.clone(), update);
    let fields = move || {
        let kind = rule.grantee_kind.clone();
        let period = rule.quota_period.clone().unwrap_or_default();
        view! {
            <label>
                "Id"
                <input
                    name="id"
                    required
                    maxlength="64"
                    pattern="[A-Za-z0-9._\\-]+"
                    value=rule.id.clone()
                    readonly=editing
                />
                {beside(error, "id")}
            </label>
            <label>
                "Grantee"
                <select name="grantee_kind">
                    {GRANTEE_KINDS
                        .iter()
                        .map(|(value, label)| {
                            view! {
                                <option value=*value selected=kind == *value>
                                    {*label}
                                </option>
                            }
                        })
                        .collect_view()}
                </select>
                {beside(error, "grantee_kind")}
            </label>
            <label>
                "Object id, subscription id or app role"
                <input name="grantee_id" required maxlength="120" value=rule.grantee_id.clone() />
                {beside(error, "grantee_id")}
            </label>
            <label>
                "Group display name"
                <input
                    name="grantee_display_name"
                    maxlength="200"
                    value=rule.grantee_display_name.clone()
                />
                {beside(error, "grantee_display_name")}
            </label>
            <label>
                "Deployments (names or * patterns, comma-separated)"
                <input
                    name="deployments"
                    placeholder="gpt-4o, gpt-4o-mini"
                    value=rule.deployments.join(", ")
                />
                {beside(error, "deployments")}
            </label>
            <label>
                "Operations (empty: all)"
                <input
                    name="operations"
                    placeholder="chatcompletions_create, embeddings_create"
                    value=rule.operations.join(", ")
                />
                {beside(error, "operations")}
            </label>
            <label class="check">
                <input type="checkbox" name="resources" value="true" checked=rule.resources />
                "Also calls without a deployment (files, batches, assistants)"
            </label>
            <label>
                "Requests per minute"
                <input
                    name="requests_per_minute"
                    inputmode="numeric"
                    value=number(rule.requests_per_minute)
                />
                {beside(error, "requests_per_minute")}
            </label>
            <label>
                "Tokens per minute"
                <input
                    name="tokens_per_minute"
                    inputmode="numeric"
                    value=number(rule.tokens_per_minute)
                />
                {beside(error, "tokens_per_minute")}
            </label>
            <label>
                "Token quota"
                <input name="quota_tokens" inputmode="numeric" value=number(rule.quota_tokens) />
                {beside(error, "quota_tokens")}
            </label>
            <label>
                "Quota period"
                <select name="quota_period">
                    <option value="" selected=period.is_empty()>
                        "none"
                    </option>
                    {QUOTA_PERIODS
                        .iter()
                        .map(|value| {
                            view! {
                                <option value=*value selected=period == *value>
                                    {*value}
                                </option>
                            }
                        })
                        .collect_view()}
                </select>
                {beside(error, "quota_period")}
            </label>
        }
    };
    if editing {
        view! {
            <section class="panel">
                <h2>"Edit access rule"</h2>
                <ActionForm action=update attr:class="form-grid" attr:data-testid="rule-form">
                    <input type="hidden" name="version" value=version />
                    {fields()}
                    <div class="form-actions">
                        <button type="submit" class="btn btn-primary">
                            "Save rule"
                        </button>
                        <a class="btn btn-quiet" href="/access-rules">
                            "New rule instead"
                        </a>
                    </div>
                </ActionForm>
                {unplaced(error, &FIELDS)}
                {saved_note!(update, "Saved and published to the gateways.")}
            </section>
        }
        .into_any()
    } else {
        view! {
            <section class="panel">
                <h2>"New access rule"</h2>
                <ActionForm action=create attr:class="form-grid" attr:data-testid="rule-form">
                    {fields()}
                    <div class="form-actions">
                        <button type="submit" class="btn btn-primary">
                            "Create rule"
                        </button>
                    </div>
                </ActionForm>
                {unplaced(error, &FIELDS)}
                {saved_note!(create, "Created and published to the gateways.")}
            </section>
        }
        .into_any()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_as_a_sentence() {
        let rule = AccessRuleView {
            tokens_per_minute: Some(1000),
            quota_tokens: Some(5),
            quota_period: Some("daily".into()),
            ..AccessRuleView::default()
        };
        assert_eq!(limits_text(&rule), "1000 tokens/min, 5 tokens daily");
        assert_eq!(limits_text(&AccessRuleView::default()), "none");
    }
}
