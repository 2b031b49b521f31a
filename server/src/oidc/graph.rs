//! The groups overage: Entra ID leaves `groups` out of an ID token for a user in more than 200
//! groups and says so with `_claim_names.groups` (or, in implicit-flow tokens, `hasgroups`); the
//! portal then reads the user's groups from Microsoft Graph (`azure-specs.md` §5.4).
//!
//! The endpoint named in `_claim_sources` is never called: Microsoft's documentation says to call
//! Microsoft Graph instead, and the portal's HTTP client must not go where a token says. The
//! lookup is the least privileged one: the signed-in user's own delegated access token (the
//! `access_token` of the code exchange, asked for with the scope `{graph}/User.Read`) and
//! `GET {graph}/v1.0/me/transitiveMemberOf/microsoft.graph.group?$select=id&$top=999`, following
//! `@odata.nextLink` (Microsoft Graph v1.0, "List a user's memberships (direct and transitive)",
//! <https://learn.microsoft.com/graph/api/user-list-transitivememberof>; delegated permission
//! `User.Read`). A next page is fetched only from the Graph origin the portal is configured with,
//! at most [`MAX_PAGES`] pages, all within [`LOOKUP_TIMEOUT`].

use std::time::Duration;

use oauth2::AccessToken;
use serde::Deserialize;
use url::Url;

/// The Microsoft Graph of Entra ID's global cloud, used when the issuer is Entra ID's.
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com";

/// The issuer host for which Graph lookups are on unless configured otherwise.
const ENTRA_ISSUER_HOST: &str = "login.microsoftonline.com";

/// The delegated permission the lookup needs, as a scope suffix of the Graph origin.
const USER_READ: &str = "User.Read";

/// Most pages read for one user (999 groups each).
pub const MAX_PAGES: usize = 50;

/// Longest time the whole lookup (every page) may take; each request also has the portal's
/// HTTP client timeout.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The list of the signed-in user's groups, ids only, the largest page Graph allows.
const MEMBERSHIPS_PATH: [&str; 4] = ["v1.0", "me", "transitiveMemberOf", "microsoft.graph.group"];
const MEMBERSHIPS_QUERY: &str = "$select=id&$top=999";

/// The Graph base URL from the setting (`GATEHOUSE_PORTAL_GRAPH_URL`): unset, Microsoft Graph
/// when the issuer is Entra ID's (`login.microsoftonline.com`) and off for any other issuer; `off`
/// turns lookups off; anything else must be a URL that [`check_graph_url`] accepts.
pub fn graph_url(setting: Option<&str>, issuer: &Url) -> Result<Option<Url>, String> {
    match setting.map(str::trim) {
        None if issuer.host_str() == Some(ENTRA_ISSUER_HOST) => Url::parse(DEFAULT_GRAPH_URL)
            .map(Some)
            .map_err(|error| error.to_string()),
        None => Ok(None),
        Some(text) if text.eq_ignore_ascii_case("off") => Ok(None),
        Some(text) => {
            let url = Url::parse(text).map_err(|error| format!("not a URL or `off`: {error}"))?;
            check_graph_url(&url)?;
            Ok(Some(url))
        }
    }
}

/// Accepts a Graph base URL: an origin (no path, query, fragment or credentials) over https, or
/// over http on a loopback address (a local double). The portal sends users' access tokens there.
pub fn check_graph_url(url: &Url) -> Result<(), String> {
    if url.host().is_none() {
        return Err("the Microsoft Graph URL has no host".to_owned());
    }
    let loopback = gatehouse_schema::config::is_loopback(url);
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(
            "the Microsoft Graph URL must be https (http only on a loopback address)".into(),
        );
    }
    if url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(
            "the Microsoft Graph URL must be an origin only, e.g. https://graph.microsoft.com"
                .to_owned(),
        );
    }
    Ok(())
}

/// The delegated scope for the lookup: `{graph}/User.Read`, so a sovereign cloud's Graph gets a
/// token for itself.
pub fn user_read_scope(graph: &Url) -> String {
    format!("{}/{USER_READ}", graph.origin().ascii_serialization())
}

/// Why the groups could not be read from Microsoft Graph. Never holds a token.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// Graph could not be reached, or did not answer in time.
    #[error("Microsoft Graph cannot be reached: {0}")]
    Unreachable(String),
    /// Graph refused the user's token (401, 403): the permission or its consent is missing.
    #[error("Microsoft Graph refused the lookup (HTTP {0})")]
    Refused(u16),
    /// Graph is throttling (429) or failing (5xx).
    #[error("Microsoft Graph is unavailable (HTTP {0})")]
    Unavailable(u16),
    /// Graph's answer cannot be used: not a page of groups, a next page elsewhere than the
    /// configured Graph, too many pages.
    #[error("Microsoft Graph's answer cannot be used: {0}")]
    Unusable(String),
}

impl GraphError {
    /// Whether Graph refused the user's token (rather than failed): trying again will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, GraphError::Refused(_))
    }

    /// Whether Graph is down or busy: trying again later may help.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            GraphError::Unreachable(_) | GraphError::Unavailable(_)
        )
    }
}

/// One page of `transitiveMemberOf/microsoft.graph.group`.
#[derive(Deserialize)]
struct GroupPage {
    value: Vec<DirectoryObject>,
    #[serde(default, rename = "@odata.nextLink")]
    next_link: Option<String>,
}

#[derive(Deserialize)]
struct DirectoryObject {
    id: String,
}

/// The ids of the groups the owner of `token` is a member of, directly or transitively, read
/// from the Graph at `graph` (see the module documentation).
pub async fn member_groups(
    http: &reqwest::Client,
    graph: &Url,
    token: &AccessToken,
) -> Result<Vec<String>, GraphError> {
    tokio::time::timeout(LOOKUP_TIMEOUT, read_pages(http, graph, token))
        .await
        .map_err(|_| {
            GraphError::Unreachable(format!(
                "no complete answer within {} s",
                LOOKUP_TIMEOUT.as_secs()
            ))
        })?
}

async fn read_pages(
    http: &reqwest::Client,
    graph: &Url,
    token: &AccessToken,
) -> Result<Vec<String>, GraphError> {
    let mut url = graph.clone();
    url.path_segments_mut()
        .map_err(|()| GraphError::Unusable("the Graph URL cannot have a path".to_owned()))?
        .clear()
        .extend(MEMBERSHIPS_PATH);
    url.set_query(Some(MEMBERSHIPS_QUERY));
    let mut groups = Vec::new();
    for _ in 0..MAX_PAGES {
        let response = http
            .get(url)
            .bearer_auth(token.secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|error| GraphError::Unreachable(error.without_url().to_string()))?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403) {
            return Err(GraphError::Refused(status.as_u16()));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(GraphError::Unavailable(status.as_u16()));
        }
        if !status.is_success() {
            return Err(GraphError::Unusable(format!("HTTP {}", status.as_u16())));
        }
        let page: GroupPage = response
            .json()
            .await
            .map_err(|error| GraphError::Unusable(error.without_url().to_string()))?;
        groups.extend(page.value.into_iter().map(|group| group.id));
        let Some(next) = page.next_link else {
            return Ok(groups);
        };
        url = Url::parse(&next)
            .map_err(|_| GraphError::Unusable("@odata.nextLink is not a URL".to_owned()))?;
        // The user's token goes with the request: only to the Graph the portal was given.
        if url.origin() != graph.origin() {
            return Err(GraphError::Unusable(
                "@odata.nextLink points away from the configured Microsoft Graph; not followed"
                    .to_owned(),
            ));
        }
    }
    Err(GraphError::Unusable(format!(
        "more than {MAX_PAGES} pages of groups"
    )))
}

#[cfg(test)]
mod tests {
    use super::{check_graph_url, graph_url, user_read_scope};
    use url::Url;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    #[test]
    fn lookups_are_on_by_default_for_entra_id_only() {
        let entra = url("https://login.microsoftonline.com/tenant-1/v2.0");
        let other = url("https://accounts.example.com/");
        assert_eq!(
            graph_url(None, &entra).unwrap(),
            Some(url("https://graph.microsoft.com"))
        );
        assert_eq!(graph_url(None, &other).unwrap(), None);
        assert_eq!(graph_url(Some("off"), &entra).unwrap(), None);
        assert_eq!(
            graph_url(Some("https://graph.microsoft.us"), &other).unwrap(),
            Some(url("https://graph.microsoft.us"))
        );
        assert_eq!(
            graph_url(Some("http://127.0.0.1:8089"), &other).unwrap(),
            Some(url("http://127.0.0.1:8089"))
        );
    }

    #[test]
    fn a_graph_url_must_be_an_https_origin_or_loopback() {
        for refused in [
            "http://graph.microsoft.com",
            "https://graph.microsoft.com/v1.0",
            "https://graph.microsoft.com/?x=1",
            "https://user:pass@graph.microsoft.com",
            "file:///etc/passwd",
        ] {
            assert!(check_graph_url(&url(refused)).is_err(), "{refused}");
        }
        assert!(graph_url(Some("graph.microsoft.com"), &url("https://a.example/")).is_err());
        assert!(check_graph_url(&url("http://[::1]:8089")).is_ok());
        assert!(check_graph_url(&url("http://localhost:8089/")).is_ok());
    }

    #[test]
    fn the_scope_follows_the_graph_url() {
        assert_eq!(
            user_read_scope(&url("https://graph.microsoft.com")),
            "https://graph.microsoft.com/User.Read"
        );
        assert_eq!(
            user_read_scope(&url("https://microsoftgraph.chinacloudapi.cn/")),
            "https://microsoftgraph.chinacloudapi.cn/User.Read"
        );
    }
}
