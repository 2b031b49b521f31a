//! Backend pools: pools and their members, each member's state at every gateway, and the forms
//! to create, edit (`?edit_pool=ID`, `?pool=ID&edit_member=ID`, `?add_to=ID`) and delete them.
//! Credentials are secret references only. The edit and delete forms carry the version of the
//! pool or member they were opened on: one someone else changed since is not overwritten.

use leptos::prelude::*;
use leptos::server::ServerAction;
use leptos_router::hooks::use_query_map;

use super::{Failure, beside, error_text, published_note, saved_version, unplaced};
use crate::api::{
    CreatePool, DeleteMember, DeletePool, MemberView, PoolView, PoolsView, SaveMember, UpdatePool,
    list_pools,
};

const POOL_FIELDS: [&str; 3] = ["id", "deployments", "serves_resources"];
const MEMBER_FIELDS: [&str; 9] = [
    "id",
    "kind",
    "endpoint",
    "deployment",
    "api_version",
    "priority",
    "weight",
    "api_key_ref",
    "pool_id",
];

/// What the query string asks the forms to show.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Editing {
    pool: Option<PoolView>,
    member: Option<MemberView>,
    member_pool: String,
}

/// The backend pools page.
#[component]
pub fn Pools() -> impl IntoView {
    let create_pool = ServerAction::<CreatePool>::new();
    let update_pool = ServerAction::<UpdatePool>::new();
    let delete_pool = ServerAction::<DeletePool>::new();
    let save_member = ServerAction::<SaveMember>::new();
    let delete_member = ServerAction::<DeleteMember>::new();
    let query = use_query_map();
    let list = Resource::new(
        move || {
            (
                create_pool.version().get(),
                update_pool.version().get(),
                delete_pool.version().get(),
                save_member.version().get(),
                delete_member.version().get(),
            )
        },
        |_| list_pools(),
    );
    let editing = Resource::new(
        move || {
            let query = query.read();
            (
                query.get("edit_pool"),
                query.get("pool"),
                query.get("edit_member"),
                query.get("add_to"),
            )
        },
        |(edit_pool, pool, edit_member, add_to)| async move {
            if edit_pool.is_none() && edit_member.is_none() {
                return Ok::<_, ServerFnError>(Editing {
                    member_pool: add_to.unwrap_or_default(),
                    ..Editing::default()
                });
            }
            let pools = list_pools().await?.pools;
            let find = |id: &Option<String>| {
                id.as_ref()
                    .and_then(|id| pools.iter().find(|p| &p.id == id).cloned())
            };
            let member = find(&pool).and_then(|p| {
                p.members
                    .into_iter()
                    .find(|m| Some(&m.id) == edit_member.as_ref())
            });
            Ok(Editing {
                pool: find(&edit_pool),
                member,
                member_pool: pool.or(add_to).unwrap_or_default(),
            })
        },
    );
    view! {
        <h1>"Backend pools"</h1>
        <p class="muted">
            "Each pool serves deployments from its members: the lowest priority number first, weighted inside it. "
            "A member's state is what each gateway sees now."
        </p>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(view) => pools_list(view, delete_pool, delete_member).into_any(),
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Transition>
        {unplaced(last_error!(delete_pool), &[])}
        {not_taken_note!(delete_pool, "Deleted")}
        {unplaced(last_error!(delete_member), &[])}
        {not_taken_note!(delete_member, "Removed")}
        <Suspense fallback=|| ()>
            {move || Suspend::new(async move {
                match editing.await {
                    Ok(editing) => {
                        view! {
                            {pool_form(editing.pool, create_pool, update_pool)}
                            {member_form(editing.member, editing.member_pool, save_member)}
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}

fn pools_list(
    view: PoolsView,
    delete_pool: ServerAction<DeletePool>,
    delete_member: ServerAction<DeleteMember>,
) -> impl IntoView {
    let unreachable = view
        .unreachable
        .into_iter()
        .map(|(gateway, reason)| {
            view! {
                <p class="callout callout-error" role="alert">
                    "Gateway " <code>{gateway}</code> " did not report its members: " {reason}
                </p>
            }
        })
        .collect_view();
    let empty = view.pools.is_empty();
    let pools = view
        .pools
        .into_iter()
        .map(|pool| pool_panel(pool, delete_pool, delete_member))
        .collect_view();
    view! {
        {unreachable}
        <Show when=move || empty>
            <p class="empty">"No backend pools yet."</p>
        </Show>
        {pools}
    }
}

fn pool_panel(
    pool: PoolView,
    delete_pool: ServerAction<DeletePool>,
    delete_member: ServerAction<DeleteMember>,
) -> impl IntoView {
    let mut serves = pool.deployments.join(", ");
    if pool.serves_resources {
        if !serves.is_empty() {
            serves.push_str(", ");
        }
        serves.push_str("calls without a deployment");
    }
    let no_members = pool.members.is_empty();
    let edit = format!("/pools?edit_pool={}", pool.id);
    let add = format!("/pools?add_to={}", pool.id);
    let pool_id = pool.id.clone();
    let version = pool.version.clone();
    let members = pool
        .members
        .into_iter()
        .map(|member| member_row(pool_id.clone(), member, delete_member))
        .collect_view();
    view! {
        <section class="panel" data-testid="pool">
            <div class="panel-head">
                <h2>
                    "Pool " <code>{pool.id.clone()}</code>
                </h2>
                <span class="muted">"serves " {serves}</span>
                <span class="spacer"></span>
                <a class="btn btn-quiet" href=add>
                    "Add member"
                </a>
                <a class="btn btn-quiet" href=edit>
                    "Edit"
                </a>
                <ActionForm action=delete_pool attr:class="inline">
                    <input type="hidden" name="id" value=pool_id.clone() />
                    <input type="hidden" name="version" value=version />
                    <button type="submit" class="btn btn-danger">
                        "Delete pool"
                    </button>
                </ActionForm>
            </div>
            {no_members
                .then(|| {
                    view! {
                        <p class="empty">
                            "No members: the gateways are not sent this pool until it has one."
                        </p>
                    }
                })}
            <div class="table-wrap">
                <table class="table">
                    <thead>
                        <tr>
                            <th>"Member"</th>
                            <th>"Endpoint"</th>
                            <th>"Deployment"</th>
                            <th>"Priority"</th>
                            <th>"Weight"</th>
                            <th>"Credential"</th>
                            <th>"State at the gateways"</th>
                            <th>"Actions"</th>
                        </tr>
                    </thead>
                    <tbody>{members}</tbody>
                </table>
            </div>
        </section>
    }
}

fn member_row(
    pool_id: String,
    member: MemberView,
    delete: ServerAction<DeleteMember>,
) -> impl IntoView {
    let credential = match (&member.api_key_ref, &member.other_credential) {
        (Some(reference), _) => format!("API key from {reference}"),
        (None, Some(other)) => other.clone(),
        (None, None) => "none".to_owned(),
    };
    let kind = if member.kind == "openai" {
        "OpenAI-compatible"
    } else {
        "Azure OpenAI"
    };
    let deployment = member
        .deployment
        .clone()
        .unwrap_or_else(|| "as called".to_owned());
    let edit = format!("/pools?pool={pool_id}&edit_member={}", member.id);
    let health = if member.health.is_empty() {
        view! { <span class="muted">"no gateway registered"</span> }.into_any()
    } else {
        member
            .health
            .into_iter()
            .map(|health| {
                let class = match health.state.as_str() {
                    "available" => "badge badge-active",
                    "throttled" => "badge badge-warn",
                    "failing" => "badge badge-revoked",
                    _ => "badge",
                };
                let text = match &health.until {
                    Some(until) => format!("{}: {} until {until}", health.gateway, health.state),
                    None => format!("{}: {}", health.gateway, health.state),
                };
                view! { <span class=class data-state=health.state.clone()>{text}</span> }
            })
            .collect_view()
            .into_any()
    };
    let (id, row_id, version) = (member.id.clone(), member.id.clone(), member.version.clone());
    view! {
        <tr data-member=row_id>
            <td>
                <code>{member.id}</code>
                <div class="muted">{kind}</div>
            </td>
            <td class="wrap">{member.endpoint}</td>
            <td>{deployment}</td>
            <td>{member.priority}</td>
            <td>{member.weight}</td>
            <td>{credential}</td>
            <td>{health}</td>
            <td class="actions">
                <a class="btn btn-quiet" href=edit>
                    "Edit"
                </a>
                <ActionForm action=delete attr:class="inline">
                    <input type="hidden" name="pool_id" value=pool_id />
                    <input type="hidden" name="id" value=id />
                    <input type="hidden" name="version" value=version />
                    <button type="submit" class="btn btn-danger">
                        "Remove"
                    </button>
                </ActionForm>
            </td>
        </tr>
    }
}

fn pool_form(
    pool: Option<PoolView>,
    create: ServerAction<CreatePool>,
    update: ServerAction<UpdatePool>,
) -> impl IntoView {
    let editing = pool.is_some();
    let error = if editing {
        last_error!(update)
    } else {
        last_error!(create)
    };
    let pool = pool.unwrap_or(PoolView {
        id: String::new(),
        deployments: Vec::new(),
        serves_resources: false,
        members: Vec::new(),
        version: String::new(),
    });
    let version = saved_version(pool.version.clone(), update);
    let fields = view! {
        <label>
            "Pool id"
            <input
                name="id"
                required
                maxlength="64"
                pattern="[A-Za-z0-9._\\-]+"
                value=pool.id.clone()
                readonly=editing
            />
            {beside(error, "id")}
        </label>
        <label>
            "Deployments clients call (comma-separated; * = any other)"
            <input name="deployments" placeholder="gpt-4o, gpt-4o-mini" value=pool.deployments.join(", ") />
            {beside(error, "deployments")}
        </label>
        <label class="check">
            <input type="checkbox" name="serves_resources" value="true" checked=pool.serves_resources />
            "Serves calls without a deployment (files, batches, assistants)"
            {beside(error, "serves_resources")}
        </label>
    };
    let title = if editing { "Edit pool" } else { "New pool" };
    let button = if editing { "Save pool" } else { "Create pool" };
    let form = if editing {
        view! {
            <ActionForm action=update attr:class="form-grid" attr:data-testid="pool-form">
                <input type="hidden" name="version" value=version />
                {fields}
                <div class="form-actions">
                    <button type="submit" class="btn btn-primary">
                        {button}
                    </button>
                </div>
            </ActionForm>
        }
        .into_any()
    } else {
        view! {
            <ActionForm action=create attr:class="form-grid" attr:data-testid="pool-form">
                {fields}
                <div class="form-actions">
                    <button type="submit" class="btn btn-primary">
                        {button}
                    </button>
                </div>
            </ActionForm>
        }
        .into_any()
    };
    let saved = move || {
        let published = if editing {
            update
                .value()
                .get()
                .and_then(Result::ok)
                .map(|saved| saved.published)
        } else {
            create.value().get().and_then(Result::ok)
        };
        published.map(|published| {
            published_note(
                &published,
                "Saved",
                Some("Saved and published to the gateways.".to_owned()),
            )
        })
    };
    view! {
        <section class="panel">
            <h2>{title}</h2>
            {form}
            {unplaced(error, &POOL_FIELDS)}
            {saved}
        </section>
    }
}

fn member_form(
    member: Option<MemberView>,
    pool_id: String,
    save: ServerAction<SaveMember>,
) -> impl IntoView {
    let error = last_error!(save);
    let editing = member.is_some();
    let member = member.unwrap_or(MemberView {
        id: String::new(),
        kind: "azure_openai".to_owned(),
        endpoint: String::new(),
        deployment: None,
        api_version: None,
        priority: 1,
        weight: 1,
        api_key_ref: None,
        other_credential: None,
        health: Vec::new(),
        version: String::new(),
    });
    // Adding a member sends no version; editing one sends the version it was opened on.
    let version = saved_version(member.version.clone(), save);
    let openai = member.kind == "openai";
    let replaces_other = member.other_credential.is_some();
    view! {
        <section class="panel">
            <h2>{if editing { "Edit member" } else { "Add a member" }}</h2>
            <ActionForm action=save attr:class="form-grid" attr:data-testid="member-form">
                {editing.then(|| view! { <input type="hidden" name="version" value=version /> })}
                <label>
                    "Pool id"
                    <input name="pool_id" required maxlength="64" value=pool_id readonly=editing />
                    {beside(error, "pool_id")}
                </label>
                <label>
                    "Member id (unique across pools)"
                    <input
                        name="id"
                        required
                        maxlength="64"
                        pattern="[A-Za-z0-9._\\-]+"
                        value=member.id.clone()
                        readonly=editing
                    />
                    {beside(error, "id")}
                </label>
                <label>
                    "Kind"
                    <select name="kind">
                        <option value="azure_openai" selected=!openai>
                            "Azure OpenAI"
                        </option>
                        <option value="openai" selected=openai>
                            "OpenAI-compatible"
                        </option>
                    </select>
                    {beside(error, "kind")}
                </label>
                <label>
                    "Endpoint"
                    <input
                        name="endpoint"
                        required
                        placeholder="https://east.openai.azure.com"
                        value=member.endpoint.clone()
                    />
                    {beside(error, "endpoint")}
                </label>
                <label>
                    "Deployment on the member (empty: as called)"
                    <input name="deployment" value=member.deployment.clone().unwrap_or_default() />
                    {beside(error, "deployment")}
                </label>
                <label>
                    "api-version (Azure, optional)"
                    <input
                        name="api_version"
                        placeholder="2024-10-21"
                        value=member.api_version.clone().unwrap_or_default()
                    />
                    {beside(error, "api_version")}
                </label>
                <label>
                    "Priority (lower first)"
                    <input name="priority" inputmode="numeric" value=member.priority.to_string() />
                    {beside(error, "priority")}
                </label>
                <label>
                    "Weight"
                    <input name="weight" inputmode="numeric" value=member.weight.to_string() />
                    {beside(error, "weight")}
                </label>
                <label>
                    "API key (secret reference; empty: none)"
                    <input
                        name="api_key_ref"
                        placeholder="env:EAST_API_KEY or file:/run/secrets/east"
                        autocomplete="off"
                        value=member.api_key_ref.clone().unwrap_or_default()
                    />
                    {beside(error, "api_key_ref")}
                </label>
                <div class="form-actions">
                    <button type="submit" class="btn btn-primary">
                        {if editing { "Save member" } else { "Add member" }}
                    </button>
                </div>
            </ActionForm>
            <Show when=move || replaces_other>
                <p class="muted">
                    "This member uses an Entra ID credential set outside the portal; saving here replaces it."
                </p>
            </Show>
            {unplaced(error, &MEMBER_FIELDS)}
            {saved_note!(save, "Saved and published to the gateways.")}
        </section>
    }
}
