//! The pages. Forms are `ActionForm`s: they post to the server function before hydration and
//! run it in place after. Every list is a resource keyed on the versions of the actions that
//! change it.

use leptos::prelude::*;
use leptos::server::ServerAction;

use crate::ServerLink;
use crate::api::{
    ActivityView, CreateSubscription, GatewaysView, IssuedKey, NotTakenView, PublishedView,
    PushNow, RegisterGateway, RetireSecondaryKey, RevokeSubscription, Rollback,
    RotateSubscriptionKey, SaveGatewaySettings, SavedView, SubscriptionView, gateway_settings,
    list_activity, list_gateways, list_subscriptions, overview,
};

/// An error from the server, shown where the content would be.
#[component]
fn Failure(error: ServerFnError) -> impl IntoView {
    let message = error_text(error);
    let signed_out = message.contains("sign in first");
    view! {
        <div class="callout callout-error" role="alert">
            <p>{message}</p>
            <Show when=move || signed_out>
                <p>
                    <ServerLink href="/auth/sign-in">"Sign in"</ServerLink>
                </p>
            </Show>
        </div>
    }
}

fn error_text(error: ServerFnError) -> String {
    match error {
        ServerFnError::ServerError(message) => message,
        other => other.to_string(),
    }
}

/// The error of an action's last run, if it failed, shown beside its form.
macro_rules! action_error {
    ($action:expr) => {{
        let action = $action;
        move || {
            action
                .value()
                .get()
                .and_then(|result| result.err())
                .map(|error| {
                    view! {
                        <p class="field-error" role="alert">
                            {error_text(error)}
                        </p>
                    }
                })
        }
    }};
}

/// The error text of an action's last run, if it failed, as a signal.
macro_rules! last_error {
    ($action:expr) => {{
        let action = $action;
        Signal::derive(move || {
            action
                .value()
                .get()
                .and_then(|result| result.err())
                .map(error_text)
        })
    }};
}

/// The part of `error` about `field` (the operations say `field: message`), shown beside it.
fn beside(error: Signal<Option<String>>, field: &'static str) -> impl IntoView {
    move || {
        error.get().and_then(|text| {
            text.strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(": "))
                .map(|message| {
                    let message = message.to_owned();
                    view! {
                        <span class="field-error" role="alert" data-field=field>
                            {message}
                        </span>
                    }
                })
        })
    }
}

/// `error` when it is about none of `fields`: shown under the form.
fn unplaced(error: Signal<Option<String>>, fields: &'static [&'static str]) -> impl IntoView {
    move || {
        error
            .get()
            .filter(|text| {
                !fields.iter().any(|field| {
                    text.strip_prefix(field)
                        .is_some_and(|rest| rest.starts_with(": "))
                })
            })
            .map(|text| {
                view! {
                    <p class="field-error" role="alert">
                        {text}
                    </p>
                }
            })
    }
}

/// The version an edit form saves from (a hidden `version` field): the one it was opened on,
/// then the one each of its saves returns, so that saving twice from one form is not refused as
/// someone else's change (the form, and what is typed in it, stays across saves).
fn saved_version<S>(opened: String, save: ServerAction<S>) -> RwSignal<String>
where
    S: leptos::server_fn::ServerFn<Output = SavedView> + Clone + Send + Sync + 'static,
    S::Error: Clone + Send + Sync + 'static,
{
    let version = RwSignal::new(opened);
    // Only the saves made from this form: the action may still hold one of another item's form.
    let before = save.version().get_untracked();
    Effect::new(move |_| {
        if save.version().get() > before
            && let Some(Ok(saved)) = save.value().get()
        {
            version.set(saved.version);
        }
    });
    version
}

/// A note after an action that published succeeded: `$text` when every gateway took the
/// version, else which gateways did not and why ([`published_note`]).
macro_rules! saved_note {
    ($action:expr, $text:literal) => {{
        let action = $action;
        move || {
            action.value().get().and_then(Result::ok).map(|result| {
                published_note(
                    AsRef::<crate::api::PublishedView>::as_ref(&result),
                    "Saved",
                    Some($text.to_owned()),
                )
            })
        }
    }};
}

/// After an action that published succeeded, which gateways did not take the version and why
/// (nothing when every gateway took it). `$done` says what the action did ("Deleted").
macro_rules! not_taken_note {
    ($action:expr, $done:literal) => {{
        let action = $action;
        move || {
            action.value().get().and_then(Result::ok).map(|result| {
                published_note(
                    AsRef::<crate::api::PublishedView>::as_ref(&result),
                    $done,
                    None,
                )
            })
        }
    }};
}

/// What a change published, where it was made: `saved` (the success note, if any) when every
/// gateway took the version; else, per gateway that did not, why, and what happens now. The
/// reasons are gateways' answers: shown as text, never as markup.
fn published_note(published: &PublishedView, done: &'static str, saved: Option<String>) -> AnyView {
    // Saved, not published: the page still shows what the change returned (a new key).
    if let Some(message) = published.not_published.clone() {
        return view! {
            <p class="error-text" role="alert" data-not-published="">
                {message}
                " (see "
                <a href="/gateways">"Gateways"</a>
                ")"
            </p>
        }
        .into_any();
    }
    if published.not_taken.is_empty() {
        return saved
            .map(|text| view! { <p class="saved-note" role="status">{text}</p> })
            .into_any();
    }
    let version = published.version;
    let lines = published
        .not_taken
        .iter()
        .cloned()
        .map(|not_taken| {
            let NotTakenView {
                gateway,
                reason,
                unreachable,
                running,
            } = not_taken;
            let (verb, then) = if unreachable {
                ("did not take it", "; it will be pushed again".to_owned())
            } else {
                let running = running.map_or("its previous version".to_owned(), |v| {
                    format!("version {v}")
                });
                (
                    "refused it",
                    format!(" — it keeps running {running} until the configuration is fixed"),
                )
            };
            let id = gateway.clone();
            view! {
                <p data-gateway=id>
                    {format!("{done}: published as version {version}, but gateway ")}
                    <code>{gateway}</code>
                    {format!(" {verb}: ")}
                    <span class="error-text">{reason}</span>
                    {then}
                    " (see "
                    <a href="/gateways">"Gateways"</a>
                    ")."
                </p>
            }
        })
        .collect_view();
    view! {
        <div class="callout callout-warn" role="alert" data-testid="not-taken">
            {lines}
        </div>
    }
    .into_any()
}

/// The overview: counts and how current the gateways are.
#[component]
pub fn Overview() -> impl IntoView {
    let counts = Resource::new(|| (), |()| overview());
    view! {
        <h1>"Overview"</h1>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match counts.await {
                    Ok(o) => {
                        view! {
                            <div class="cards">
                                <a class="card" href="/subscriptions">
                                    <span class="card-value">{o.subscriptions}</span>
                                    <span class="card-label">"subscriptions"</span>
                                </a>
                                <a class="card" href="/access-rules">
                                    <span class="card-value">{o.access_rules}</span>
                                    <span class="card-label">"access rules"</span>
                                </a>
                                <a class="card" href="/pools">
                                    <span class="card-value">{o.pools}</span>
                                    <span class="card-label">"backend pools"</span>
                                </a>
                                <a class="card" href="/gateways">
                                    <span class="card-value">{o.gateways}</span>
                                    <span class="card-label">
                                        {format!(
                                            "gateways, {} behind version {}",
                                            o.lagging_gateways,
                                            o.current_version.map_or("–".to_owned(), |v| v.to_string()),
                                        )}
                                    </span>
                                </a>
                            </div>
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}

/// The one-time display of a new key, with a copy button.
#[component]
fn KeyOnce(issued: IssuedKey) -> impl IntoView {
    let key = issued.key.clone();
    let copied = RwSignal::new(false);
    let copy = move |_| {
        copied.set(true);
        let _promise = window().navigator().clipboard().write_text(&key);
    };
    view! {
        <div class="callout callout-success" role="status">
            <p>
                "New key for " <strong>{issued.subscription}</strong>
                ". Copy it now: it is shown only once and cannot be recovered."
            </p>
            <div class="key-row">
                <code class="key" data-testid="issued-key">
                    {issued.key}
                </code>
                <button type="button" class="btn" on:click=copy>
                    {move || if copied.get() { "Copied" } else { "Copy" }}
                </button>
            </div>
        </div>
    }
}

/// Subscriptions: create, rotate, retire the previous key, revoke.
#[component]
pub fn Subscriptions() -> impl IntoView {
    let create = ServerAction::<CreateSubscription>::new();
    let rotate = ServerAction::<RotateSubscriptionKey>::new();
    let retire = ServerAction::<RetireSecondaryKey>::new();
    let revoke = ServerAction::<RevokeSubscription>::new();
    let list = Resource::new(
        move || {
            (
                create.version().get(),
                rotate.version().get(),
                retire.version().get(),
                revoke.version().get(),
            )
        },
        |_| list_subscriptions(),
    );
    // The key of whichever action answered last: an action keeps its last value, so deciding by
    // which one ever answered would show an older rotation's key after a newer creation.
    let shown = RwSignal::new(None::<IssuedKey>);
    Effect::new(move |_| {
        if let Some(Ok(issued)) = create.value().get() {
            shown.set(Some(issued));
        }
    });
    Effect::new(move |_| {
        if let Some(Ok(issued)) = rotate.value().get() {
            shown.set(Some(issued));
        }
    });
    let issued = move || shown.get().map(|issued| view! { <KeyOnce issued /> });
    // A form sent before the page is interactive is answered with a redirect that drops the
    // key; the buttons that issue a key wait until the page can show it.
    let interactive = RwSignal::new(false);
    Effect::new(move |_| interactive.set(true));
    view! {
        <h1>"Subscriptions"</h1>
        {issued}
        <section class="panel">
            <h2>"New subscription"</h2>
            <ActionForm action=create attr:class="form-grid">
                <label>
                    "Id" <input name="id" required maxlength="64" pattern="[A-Za-z0-9._\\-]+" />
                </label>
                <label>"Name" <input name="display_name" required maxlength="200" /></label>
                <label>"Team or group" <input name="product" maxlength="200" /></label>
                <label>"Expires on" <input name="expires_on" type="date" /></label>
                <div class="form-actions">
                    <button
                        type="submit"
                        class="btn btn-primary"
                        disabled=move || !interactive.get()
                    >
                        "Create and show key"
                    </button>
                </div>
            </ActionForm>
            {action_error!(create)}
        </section>
        {not_taken_note!(create, "Created")}
        {action_error!(rotate)}
        {not_taken_note!(rotate, "Key rotated")}
        {action_error!(retire)}
        {not_taken_note!(retire, "Previous key retired")}
        {action_error!(revoke)}
        {not_taken_note!(revoke, "Revoked")}
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(rows) if rows.is_empty() => {
                        view! { <p class="empty">"No subscriptions yet."</p> }.into_any()
                    }
                    Ok(rows) => {
                        view! {
                            <div class="table-wrap">
                                <table class="table">
                                    <thead>
                                        <tr>
                                            <th>"Id"</th>
                                            <th>"Name"</th>
                                            <th>"Team"</th>
                                            <th>"State"</th>
                                            <th>"Expires"</th>
                                            <th>"Actions"</th>
                                        </tr>
                                    </thead>
                                    <tbody>
                                        {rows
                                            .into_iter()
                                            .map(|row| {
                                                subscription_row(row, rotate, retire, revoke, interactive)
                                            })
                                            .collect_view()}
                                    </tbody>
                                </table>
                            </div>
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Transition>
    }
}

fn subscription_row(
    row: SubscriptionView,
    rotate: ServerAction<RotateSubscriptionKey>,
    retire: ServerAction<RetireSecondaryKey>,
    revoke: ServerAction<RevokeSubscription>,
    interactive: RwSignal<bool>,
) -> impl IntoView {
    let revoked = row.state == "revoked";
    let has_secondary = row.has_secondary;
    let expires_soon = row.expires_soon;
    let (id1, id2, id3) = (row.id.clone(), row.id.clone(), row.id.clone());
    let (version1, version2) = (row.version.clone(), row.version);
    view! {
        <tr>
            <td>
                <code>{row.id}</code>
            </td>
            <td>{row.display_name}</td>
            <td>{row.product.unwrap_or_default()}</td>
            <td>
                <span class=format!("badge badge-{}", row.state)>{row.state.clone()}</span>
                <Show when=move || has_secondary>
                    <span class="badge">"previous key valid"</span>
                </Show>
            </td>
            <td>
                {row.expires_on.unwrap_or_else(|| "never".to_owned())}
                <Show when=move || expires_soon && !revoked>
                    <span class="badge badge-warn">"expires soon"</span>
                </Show>
            </td>
            <td class="actions">
                {(!revoked)
                    .then(|| {
                        view! {
                            <ActionForm action=rotate attr:class="inline">
                                <input type="hidden" name="id" value=id1 />
                                <input type="hidden" name="version" value=version1 />
                                <button
                                    type="submit"
                                    class="btn btn-quiet"
                                    disabled=move || !interactive.get()
                                >
                                    "Rotate key"
                                </button>
                            </ActionForm>
                        }
                    })}
                {has_secondary
                    .then(|| {
                        view! {
                            <ActionForm action=retire attr:class="inline">
                                <input type="hidden" name="id" value=id2 />
                                <input type="hidden" name="version" value=version2 />
                                <button type="submit" class="btn btn-quiet">
                                    "Retire previous key"
                                </button>
                            </ActionForm>
                        }
                    })}
                {(!revoked)
                    .then(|| {
                        view! {
                            <ActionForm action=revoke attr:class="inline">
                                <input type="hidden" name="id" value=id3 />
                                <button type="submit" class="btn btn-danger">
                                    "Revoke"
                                </button>
                            </ActionForm>
                        }
                    })}
            </td>
        </tr>
    }
}

/// Gateways: which version each runs, register one, push now, compare versions, roll back.
#[component]
pub fn Gateways() -> impl IntoView {
    let register = ServerAction::<RegisterGateway>::new();
    let push = ServerAction::<PushNow>::new();
    let rollback = ServerAction::<Rollback>::new();
    let settings = ServerAction::<SaveGatewaySettings>::new();
    let list = Resource::new(
        move || {
            (
                register.version().get(),
                push.version().get(),
                rollback.version().get(),
                settings.version().get(),
            )
        },
        |_| list_gateways(),
    );
    view! {
        <h1>"Gateways"</h1>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(view) => gateways_table(view).into_any(),
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Transition>
        <ActionForm action=push attr:class="inline">
            <button type="submit" class="btn">
                "Push current version now"
            </button>
        </ActionForm>
        {action_error!(push)}
        <section class="panel">
            <h2>"Register a gateway"</h2>
            <ActionForm action=register attr:class="form-grid">
                <label>"Id" <input name="id" required maxlength="64" /></label>
                <label>
                    "URL" <input name="url" type="url" required placeholder="https://gateway:8080" />
                </label>
                <label>
                    "Admin token (secret reference)"
                    <input name="admin_token_ref" required placeholder="file:/run/secrets/gatehouse/admin-token" />
                </label>
                <div class="form-actions">
                    <button type="submit" class="btn btn-primary">
                        "Register"
                    </button>
                </div>
            </ActionForm>
            <Transition fallback=|| ()>
                {move || Suspend::new(async move {
                    list.await
                        .ok()
                        .map(|view| {
                            view! {
                                <p class="muted" data-testid="token-prefixes">
                                    "The portal reads admin tokens only from references starting with "
                                    {view.token_prefixes.join(" or ")}
                                    " (its --gateway-token-refs), so that no other secret of its own is sent to a gateway's URL."
                                </p>
                            }
                        })
                })}
            </Transition>
            {action_error!(register)}
        </section>
        <GatewaySettings save=settings />
        <Versions rollback settings />
    }
}

/// The settings every gateway gets besides what the other pages manage, edited as the JSON of
/// that part of the snapshot (docs/portal.md lists its fields).
#[component]
fn GatewaySettings(save: ServerAction<SaveGatewaySettings>) -> impl IntoView {
    // Read again after a save that published, not after a refused one: the text being fixed
    // stays in the box.
    let current = Resource::new(
        move || save.value().get().and_then(Result::ok),
        |_| gateway_settings(),
    );
    view! {
        <section class="panel">
            <h2>"Gateway settings"</h2>
            <p class="muted">
                "Trusted proxies, the identity policy (Entra ID tenants and audiences, what a caller must present), capture, the request size limit and limits of their own, as JSON: the part of every published snapshot that the other pages do not manage. Saving publishes a new version."
            </p>
            {move || {
                save.value()
                    .get()
                    .and_then(Result::ok)
                    .map(|published| {
                        let saved = format!("Saved: published as version {}.", published.version);
                        published_note(&published, "Saved", Some(saved))
                    })
            }}
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
                {move || Suspend::new(async move {
                    match current.await {
                        Ok(settings) => {
                            let (text, version) = (settings.text, settings.version);
                            let value = text.clone();
                            view! {
                                <ActionForm action=save attr:class="form-grid">
                                    // The version the settings were read at: a save from it
                                    // is refused when someone else saved them since.
                                    <input type="hidden" name="version" value=version />
                                    <label class="wide">
                                        "Settings (JSON)"
                                        // The text for the page as sent, the value for the
                                        // box once edited and saved.
                                        <textarea
                                            name="settings"
                                            rows="12"
                                            spellcheck="false"
                                            class="code"
                                            data-testid="gateway-settings"
                                            prop:value=value
                                        >
                                            {text}
                                        </textarea>
                                    </label>
                                    <div class="form-actions">
                                        <button type="submit" class="btn btn-primary">
                                            "Save and publish"
                                        </button>
                                    </div>
                                </ActionForm>
                            }
                                .into_any()
                        }
                        Err(error) => view! { <Failure error /> }.into_any(),
                    }
                })}
            </Transition>
            {action_error!(save)}
        </section>
    }
}

fn gateways_table(view: GatewaysView) -> impl IntoView {
    let current = view
        .current_version
        .map_or("none".to_owned(), |v| v.to_string());
    if view.gateways.is_empty() {
        return view! { <p class="empty">"No gateways registered."</p> }.into_any();
    }
    view! {
        <p class="muted">"Current version: " <strong>{current}</strong></p>
        <div class="table-wrap">
            <table class="table">
                <thead>
                    <tr>
                        <th>"Id"</th>
                        <th>"URL"</th>
                        <th>"Runs"</th>
                        <th>"Behind"</th>
                        <th>"Last push"</th>
                        <th>"Last error"</th>
                    </tr>
                </thead>
                <tbody>
                    {view
                        .gateways
                        .into_iter()
                        .map(|g| {
                            let lag = g.lag;
                            let lag_class = if lag > 0 { "badge badge-warn" } else { "badge badge-active" };
                            let lag_text = if lag > 0 { format!("{lag} behind") } else { "current".to_owned() };
                            view! {
                                <tr>
                                    <td>
                                        <code>{g.id}</code>
                                    </td>
                                    <td>{g.url}</td>
                                    <td>{g.pushed_version.map_or("none".to_owned(), |v| v.to_string())}</td>
                                    <td>
                                        <span class=lag_class>{lag_text}</span>
                                    </td>
                                    <td>{g.last_attempt_at.unwrap_or_default()}</td>
                                    <td class="error-text">{g.last_error.unwrap_or_default()}</td>
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

/// Activity: who changed what, with the before and after of each change.
#[component]
pub fn Activity() -> impl IntoView {
    let list = Resource::new(|| (), |()| list_activity());
    view! {
        <h1>"Activity"</h1>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match list.await {
                    Ok(rows) if rows.is_empty() => {
                        view! { <p class="empty">"No changes yet."</p> }.into_any()
                    }
                    Ok(rows) => {
                        view! {
                            <ol class="activity">
                                {rows.into_iter().map(activity_entry).collect_view()}
                            </ol>
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Failure error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}

fn activity_entry(row: ActivityView) -> impl IntoView {
    view! {
        <li class="activity-entry">
            <div>
                <strong>{row.actor}</strong>
                " "
                <code>{row.action}</code>
                " "
                {row.target}
                <span class="muted">" at " {row.at}</span>
            </div>
            <details>
                <summary>"Before and after"</summary>
                <div class="diff">
                    <pre>{row.before.unwrap_or_else(|| "(none)".to_owned())}</pre>
                    <pre>{row.after.unwrap_or_else(|| "(none)".to_owned())}</pre>
                </div>
            </details>
        </li>
    }
}

mod access_rules;
mod pools;
mod versions;

pub use access_rules::AccessRules;
pub use pools::Pools;
use versions::Versions;

// Rendering a view to HTML needs the server build.
#[cfg(all(test, feature = "ssr"))]
mod tests {
    use super::*;

    fn not_taken(gateway: &str, reason: &str, unreachable: bool) -> NotTakenView {
        NotTakenView {
            gateway: gateway.to_owned(),
            reason: reason.to_owned(),
            unreachable,
            running: Some(11),
        }
    }

    #[test]
    fn the_note_names_each_gateway_that_did_not_take_the_version_and_escapes_its_answer() {
        let all = PublishedView {
            version: 12,
            not_taken: Vec::new(),
            not_published: None,
        };
        let html = published_note(&all, "Saved", Some("Saved and published.".to_owned())).to_html();
        assert!(
            html.contains("saved-note") && html.contains("Saved and published."),
            "{html}"
        );

        let some = PublishedView {
            version: 12,
            not_taken: vec![
                not_taken(
                    "gw-eu",
                    "refused with 422: <b>env:X</b> is not under a prefix",
                    false,
                ),
                not_taken("gw-us", "unreachable: connection refused", true),
            ],
            not_published: None,
        };
        let html =
            published_note(&some, "Saved", Some("Saved and published.".to_owned())).to_html();
        assert!(!html.contains("saved-note"), "{html}");
        assert!(
            html.contains("Saved: published as version 12, but gateway "),
            "{html}"
        );
        assert!(
            html.contains("gw-eu") && html.contains("refused it: "),
            "{html}"
        );
        assert!(
            html.contains("&lt;b&gt;env:X&lt;/b&gt;") && !html.contains("<b>"),
            "{html}"
        );
        assert!(
            html.contains("keeps running version 11 until the configuration is fixed"),
            "{html}"
        );
        assert!(
            html.contains("did not take it: ") && html.contains("it will be pushed again"),
            "{html}"
        );
    }

    #[test]
    fn a_change_saved_and_not_published_says_so_instead_of_the_success_note() {
        let saved = PublishedView {
            not_published: Some("Saved, but not published: internal error.".to_owned()),
            ..PublishedView::default()
        };
        let html = published_note(
            &saved,
            "Key rotated",
            Some("Saved and published.".to_owned()),
        )
        .to_html();
        assert!(!html.contains("saved-note"), "{html}");
        assert!(
            html.contains("Saved, but not published: internal error.")
                && html.contains("/gateways"),
            "{html}"
        );
    }
}
