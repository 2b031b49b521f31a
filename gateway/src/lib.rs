//! Gatehouse gateway: the data plane.
//!
//! Clients call it exactly as they call Azure OpenAI or OpenAI. One request passes these steps,
//! each a module with one job:
//!
//! 1. **Accept** ([`server`]): HTTP/1.1 and HTTP/2, optional TLS; a new UUIDv7 becomes the audit
//!    record's `CorrelationId`, sent back as `x-gatehouse-correlation-id` ([`app`]). A client's
//!    own `x-request-id` is echoed, passed to the backend and logged, but never used as the
//!    record's id: the store keeps one record per `CorrelationId`, so a reused id would hide a call.
//! 2. **Caller address** ([`caller`]): the peer, and `X-Forwarded-For` from trusted proxies only.
//! 3. **Authenticate** ([`auth`], [`entra`]): a subscription key from `api-key`,
//!    `Ocp-Apim-Subscription-Key`, `subscription-key` or `Authorization: Bearer`, checked against
//!    SHA-256 digests, and/or an Entra ID access token (signing keys by `kid`, groups overage
//!    through Microsoft Graph).
//! 4. **Classify** ([`classify`]): method + path → operation id, deployment, route style.
//! 5. **Authorize** ([`authorize`]): access rules grant groups, subscriptions, users and app roles
//!    deployments and operations; everything else is denied.
//! 6. **Limit** ([`limits`]): requests and tokens per minute and token quotas, reserved from an
//!    estimate before the call and reconciled with its usage when its record finishes; counters
//!    in-process or in Redis.
//! 7. **Route** ([`pool`], [`affinity`], [`retry_hint`]): priority groups, weights, members set
//!    aside on 429/5xx/connect failure, stateful objects pinned to their member (the map shared
//!    by replicas through Redis when configured).
//! 8. **Proxy** ([`proxy`]): the member's URL and credential replace the client's, the body is
//!    replayed on another member while nothing has reached the client, the answer streams back.
//! 9. **Capture** ([`capture`], [`usage`]): a tee that keeps bodies up to a limit and reassembles
//!    streams; token usage as the backend reports it (the proxy asks a stream for its usage chunk
//!    and hides it from the client), else estimated with the model's tokenizer.
//! 10. **Record** ([`record`]): one audit record per call, handed to the audit queue off the hot path;
//!     a call whose client leaves before the answer's head is finished all the same
//!     ([`client_gone`]); a shutdown waits for every call's record ([`in_flight`]).
//!
//! Configuration ([`settings`], [`runtime`], [`admin`]) is one immutable snapshot swapped atomically.
//! A call goes through steps 3–9 under one snapshot: when a push was applied while it waited for
//! room in the audit queue or for its body, it is authenticated again and goes on under the new one.
//! A serving gateway holds its state directory ([`state_lock`]).
//! Backend credentials are keys from secret references ([`secret`]: `env:`, `file:`, Key Vault via
//! [`key_vault`]) or Entra ID access tokens ([`entra_credential`]).

pub mod admin;
pub mod affinity;
pub mod app;
pub mod assistant_model;
pub mod auth;
pub mod authorize;
pub mod backend_url;
pub mod batch_input;
pub mod body_credentials;
pub mod caller;
pub mod capture;
mod certificate_expiry;
pub mod classify;
pub mod client_gone;
mod deferred_work;
pub mod entra;
pub mod entra_credential;
pub mod error;
pub mod gateway_claim;
mod idle_deadline;
pub mod in_flight;
pub mod key_vault;
pub mod limits;
mod list_merge;
mod member_read;
pub mod metrics;
pub mod peek;
pub mod pool;
pub mod proxy;
mod realtime;
pub mod record;
mod redis_connection;
pub mod retry_hint;
mod run_stream;
pub mod runtime;
pub mod secret;
pub mod secret_policy;
pub mod server;
pub mod settings;
pub mod state_lock;
mod stream_window;
mod sync;
pub mod upstream;
pub mod usage;
mod warning_throttle;

pub use app::{ClientTimeouts, Gateway, GatewayParts, SecretSettings};
pub use error::GatewayError;
pub use settings::{ConfigFile, ServerSettings};
