//! `gatehouse-portal`: the admin portal.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gatehouse_portal::dashboards::InsightsSettings;
use gatehouse_portal::oidc::graph::graph_url;
use gatehouse_portal::oidc::{ClientCertificate, OidcSettings};
use gatehouse_portal::{Settings, serve};
use gatehouse_portal_core::insights::alerts::parse_rules;
use gatehouse_portal_core::insights::log_analytics::{ClientCredentials, LogAnalyticsSettings};
use gatehouse_portal_core::insights::service::PriceTable;
use gatehouse_portal_core::ops::checked_gateway;
use gatehouse_portal_core::secret::AdminTokenRefs;
use gatehouse_schema::config::SecretRef;
use gatehouse_schema::portal::Role;
use url::Url;

/// The Gatehouse admin portal.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to listen.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_LISTEN",
        default_value = "127.0.0.1:3000"
    )]
    listen: SocketAddr,
    /// Config database: `sqlite:PATH` or `postgres://…`.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_DATABASE",
        default_value = "sqlite:var/portal.db"
    )]
    database: String,
    /// The URL browsers use to reach the portal (default: http://{listen}).
    #[arg(long, env = "GATEHOUSE_PORTAL_PUBLIC_URL")]
    public_url: Option<Url>,
    /// OpenID Connect issuer, e.g. https://login.microsoftonline.com/{tenant}/v2.0.
    #[arg(long, env = "GATEHOUSE_PORTAL_OIDC_ISSUER")]
    oidc_issuer: Option<Url>,
    /// The portal's client (application) id at the issuer.
    #[arg(long, env = "GATEHOUSE_PORTAL_OIDC_CLIENT_ID")]
    oidc_client_id: Option<String>,
    /// Secret reference (env:NAME or file:PATH) of the client secret.
    #[arg(long, env = "GATEHOUSE_PORTAL_OIDC_CLIENT_SECRET")]
    oidc_client_secret: Option<String>,
    /// Secret reference (env:NAME or file:PATH) of a PEM with the client certificate and its RSA
    /// private key: the portal then authenticates with a signed client assertion, not a secret.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_OIDC_CLIENT_CERTIFICATE",
        conflicts_with = "oidc_client_secret"
    )]
    oidc_client_certificate: Option<String>,
    /// Group→role mapping, `GROUP_OBJECT_ID=Role` separated by commas.
    #[arg(long, env = "GATEHOUSE_PORTAL_GROUP_ROLES", default_value = "")]
    group_roles: String,
    /// Microsoft Graph, for users in more groups than an ID token carries (Entra ID's groups
    /// overage): an https origin, or `off`. Default: https://graph.microsoft.com when the issuer
    /// is login.microsoftonline.com, else off.
    #[arg(long, env = "GATEHOUSE_PORTAL_GRAPH_URL")]
    graph_url: Option<String>,
    /// Enable the development sign-in (only accepted on a loopback listen address).
    #[arg(long, env = "GATEHOUSE_PORTAL_DEV_SIGN_IN")]
    dev_sign_in: bool,
    /// Minutes of inactivity after which a session ends.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_SESSION_IDLE_MINUTES",
        default_value_t = 30
    )]
    session_idle_minutes: u64,
    /// Hours after sign-in after which a session ends.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_SESSION_ABSOLUTE_HOURS",
        default_value_t = 12
    )]
    session_absolute_hours: u64,
    /// Seconds between pushes to gateways that lag.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_PUSH_RETRY_SECONDS",
        default_value_t = 10
    )]
    push_retry_seconds: u64,
    /// Hours the previous key stays valid after a key rotation; 0: until an admin retires it.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_ROTATION_OVERLAP_HOURS",
        default_value_t = 24
    )]
    rotation_overlap_hours: u64,
    /// Register a gateway at start: `ID=URL=SECRET_REF` (repeatable). Its reference is read
    /// whatever `--gateway-token-refs` says.
    #[arg(long = "gateway")]
    gateways: Vec<String>,
    /// The secret references the portal may read gateway admin tokens from, as prefixes
    /// separated by commas: `env:NAME_PREFIX`, `file:/directory/`. A gateway registered on the
    /// Gateways page must use one; so that an Admin cannot have the portal send another of its
    /// secrets (read from its environment or files) to a URL of their choosing.
    #[arg(
        long,
        env = "GATEHOUSE_PORTAL_GATEWAY_TOKEN_REFS",
        default_value = gatehouse_portal_core::secret::DEFAULT_ADMIN_TOKEN_PREFIXES
    )]
    gateway_token_refs: String,
    /// Let the portal reach gateways over plain `http://` on any host, not only on loopback
    /// ones: for a private network trusted as it is (the configuration, with the key hashes,
    /// and the signed admin requests then cross it in clear).
    #[arg(long, env = "GATEHOUSE_PORTAL_ALLOW_PLAIN_HTTP_GATEWAYS")]
    allow_plain_http_gateways: bool,
    /// Dashboards and audit search: the embedded audit store, `sqlite:PATH` or `postgres://…`.
    #[arg(long, env = "GATEHOUSE_PORTAL_AUDIT_DATABASE")]
    audit_database: Option<String>,
    /// Dashboards and audit search from Log Analytics instead: the workspace id (GUID).
    #[arg(long, env = "GATEHOUSE_PORTAL_LOG_ANALYTICS_WORKSPACE")]
    log_analytics_workspace: Option<String>,
    /// Log Analytics: the app registration's tenant id.
    #[arg(long, env = "GATEHOUSE_PORTAL_LOG_ANALYTICS_TENANT")]
    log_analytics_tenant: Option<String>,
    /// Log Analytics: the app registration's client id.
    #[arg(long, env = "GATEHOUSE_PORTAL_LOG_ANALYTICS_CLIENT_ID")]
    log_analytics_client_id: Option<String>,
    /// Log Analytics: secret reference (env:NAME or file:PATH) of the client secret.
    #[arg(long, env = "GATEHOUSE_PORTAL_LOG_ANALYTICS_CLIENT_SECRET")]
    log_analytics_client_secret: Option<String>,
    /// Log Analytics: the Query API base URL (default https://api.loganalytics.azure.com).
    #[arg(long, env = "GATEHOUSE_PORTAL_LOG_ANALYTICS_ENDPOINT")]
    log_analytics_endpoint: Option<Url>,
    /// Log Analytics: the identity platform authority (default https://login.microsoftonline.com).
    #[arg(long, env = "GATEHOUSE_PORTAL_LOG_ANALYTICS_AUTHORITY")]
    log_analytics_authority: Option<Url>,
    /// Prices for the cost estimate: `MODEL=PROMPT/COMPLETION,…` in US dollars per million tokens.
    #[arg(long, env = "GATEHOUSE_PORTAL_MODEL_PRICES", default_value = "")]
    model_prices: String,
    /// Alert rules: a JSON file (see docs/dashboards.md), evaluated every minute.
    #[arg(long, env = "GATEHOUSE_PORTAL_ALERT_RULES")]
    alert_rules: Option<std::path::PathBuf>,
    /// Where alerts are sent: secret reference (env:NAME or file:PATH) of a Slack or Teams
    /// incoming webhook URL.
    #[arg(long, env = "GATEHOUSE_PORTAL_ALERT_WEBHOOK")]
    alert_webhook: Option<String>,
}

fn insights(args: &Args) -> anyhow::Result<InsightsSettings> {
    let prices = PriceTable::parse(&args.model_prices)
        .map_err(|error| anyhow::anyhow!("--model-prices: {error}"))?;
    let log_analytics = match &args.log_analytics_workspace {
        None => None,
        Some(workspace) => {
            let need = |value: &Option<String>, name: &str| {
                value
                    .clone()
                    .with_context(|| format!("--log-analytics-workspace needs {name}"))
            };
            let secret = SecretRef::try_from(need(
                &args.log_analytics_client_secret,
                "--log-analytics-client-secret",
            )?)
            .map_err(|error| anyhow::anyhow!("--log-analytics-client-secret: {error}"))?;
            let mut settings = LogAnalyticsSettings::new(
                workspace.clone(),
                ClientCredentials {
                    tenant_id: need(&args.log_analytics_tenant, "--log-analytics-tenant")?,
                    client_id: need(&args.log_analytics_client_id, "--log-analytics-client-id")?,
                    client_secret: secret,
                    authority: args.log_analytics_authority.clone(),
                },
            );
            settings.endpoint = args.log_analytics_endpoint.clone();
            Some(settings)
        }
    };
    let alert_rules = match &args.alert_rules {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--alert-rules {}", path.display()))?;
            parse_rules(&text).map_err(|error| anyhow::anyhow!("--alert-rules: {error}"))?
        }
    };
    let alert_webhook = args
        .alert_webhook
        .clone()
        .map(SecretRef::try_from)
        .transpose()
        .map_err(|error| anyhow::anyhow!("--alert-webhook: {error}"))?;
    Ok(InsightsSettings {
        audit_database: args.audit_database.clone(),
        log_analytics,
        prices,
        alert_rules,
        alert_webhook,
    })
}

fn group_roles(text: &str) -> anyhow::Result<HashMap<String, Role>> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (group, role) = pair
                .split_once('=')
                .with_context(|| format!("group role mapping `{pair}`: expected GROUP=Role"))?;
            let role = Role::parse(role.trim())
                .with_context(|| format!("group role mapping `{pair}`: unknown role"))?;
            Ok((group.trim().to_owned(), role))
        })
        .collect()
}

/// A `--gateway ID=URL=SECRET_REF`: the id and URL checked as the Gateways page checks them (no
/// credentials in the URL), the URL as it is stored.
fn gateway(text: &str) -> anyhow::Result<(String, String, String)> {
    let (id, rest) = text
        .split_once('=')
        .context("--gateway: expected ID=URL=SECRET_REF")?;
    let (url, token) = rest
        .rsplit_once('=')
        .context("--gateway: expected ID=URL=SECRET_REF")?;
    // The message names the field, never the URL (it may hold a password).
    let (id, url) =
        checked_gateway(id, url).map_err(|error| anyhow::anyhow!("--gateway: {error}"))?;
    SecretRef::try_from(token.to_owned())
        .map_err(|error| anyhow::anyhow!("--gateway {id}: {error}"))?;
    Ok((id, url.to_string(), token.to_owned()))
}

async fn oidc(args: &Args) -> anyhow::Result<Option<OidcSettings>> {
    let (Some(issuer), Some(client_id)) = (&args.oidc_issuer, &args.oidc_client_id) else {
        return Ok(None);
    };
    let client_secret = match &args.oidc_client_secret {
        Some(reference) => {
            let reference = SecretRef::try_from(reference.clone())
                .map_err(|error| anyhow::anyhow!("--oidc-client-secret: {error}"))?;
            Some(
                gatehouse_portal_core::secret::resolve(&reference)
                    .await
                    .map_err(|error| anyhow::anyhow!("--oidc-client-secret: {error}"))?,
            )
        }
        None => None,
    };
    let client_certificate = match &args.oidc_client_certificate {
        Some(reference) => {
            let reference = SecretRef::try_from(reference.clone())
                .map_err(|error| anyhow::anyhow!("--oidc-client-certificate: {error}"))?;
            let pem = gatehouse_portal_core::secret::resolve(&reference)
                .await
                .map_err(|error| anyhow::anyhow!("--oidc-client-certificate: {error}"))?;
            Some(
                ClientCertificate::from_pem(&pem)
                    .map_err(|error| anyhow::anyhow!("--oidc-client-certificate: {error}"))?,
            )
        }
        None => None,
    };
    Ok(Some(OidcSettings {
        issuer: issuer.clone(),
        client_id: client_id.clone(),
        client_secret,
        client_certificate,
        group_roles: group_roles(&args.group_roles)?,
        graph: graph_url(args.graph_url.as_deref(), issuer)
            .map_err(|error| anyhow::anyhow!("--graph-url: {error}"))?,
        clock_skew: Duration::from_secs(60),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Colours only for a person at a terminal: a log file or a collector gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let args = Args::parse();
    // cargo-leptos sets LEPTOS_* variables; outside it the defaults name the built site.
    let mut leptos = leptos::config::get_configuration(None)
        .map(|config| config.leptos_options)
        .unwrap_or_else(|_| {
            leptos::config::LeptosOptions::builder()
                .output_name(gatehouse_portal_app::OUTPUT_NAME)
                .site_root("target/site")
                .build()
        });
    leptos.site_addr = args.listen;
    let public_url = match &args.public_url {
        Some(url) => url.clone(),
        None => Url::parse(&format!("http://{}", args.listen)).context("public URL")?,
    };
    let settings = Settings {
        listen: args.listen,
        database: args.database.clone(),
        public_url,
        oidc: oidc(&args).await?,
        dev_sign_in: args.dev_sign_in,
        session_idle: Duration::from_secs(args.session_idle_minutes * 60),
        session_absolute: Duration::from_secs(args.session_absolute_hours * 3600),
        push_retry: Duration::from_secs(args.push_retry_seconds.max(1)),
        rotation_overlap: (args.rotation_overlap_hours > 0)
            .then(|| Duration::from_secs(args.rotation_overlap_hours * 3600)),
        gateways: args
            .gateways
            .iter()
            .map(|text| gateway(text))
            .collect::<anyhow::Result<_>>()?,
        admin_token_refs: AdminTokenRefs::parse(&args.gateway_token_refs)
            .map_err(|error| anyhow::anyhow!("--gateway-token-refs: {error}"))?
            .with_plain_http_anywhere(args.allow_plain_http_gateways),
        leptos,
        insights: insights(&args)?,
    };
    if settings.oidc.is_none() && !settings.dev_sign_in {
        tracing::warn!("no sign-in configured: set --oidc-issuer and --oidc-client-id");
    }
    serve(settings).await
}

#[cfg(test)]
mod tests {
    use super::gateway;

    #[test]
    fn a_gateway_option_is_checked_as_the_gateways_page_checks_it() {
        let (id, url, token) =
            gateway("dev=http://127.0.0.1:8080=file:var/dev/admin-token").unwrap();
        assert_eq!(
            (id.as_str(), url.as_str(), token.as_str()),
            ("dev", "http://127.0.0.1:8080/", "file:var/dev/admin-token")
        );
        let refused = gateway("dev=https://ops:hunter2@gw.example.com=env:GATEHOUSE_GATEWAY_TOKEN")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("url: ") && !refused.contains("hunter2"),
            "{refused}"
        );
        let refused = gateway("d v=http://127.0.0.1:8080=env:GATEHOUSE_GATEWAY_TOKEN")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("id: "), "{refused}");
        assert!(gateway("dev=ftp://127.0.0.1=env:GATEHOUSE_GATEWAY_TOKEN").is_err());
        assert!(gateway("dev=http://127.0.0.1:8080").is_err());
    }
}
