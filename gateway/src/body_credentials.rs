//! Credentials a client puts in a request body for the model's service to use, kept out of the
//! record.
//!
//! Some requests carry a secret for a service the model calls on the caller's behalf:
//!
//! - Azure OpenAI "On your data" (`data_sources` of a chat completion): each data source's
//!   `parameters.authentication` — an Azure AI Search admin key (`api_key`: `key`), a Cosmos DB
//!   `connection_string`, an `access_token`, an Elasticsearch `encoded_api_key` or `key` and
//!   `key_id`, a MongoDB `username` and `password` — and likewise its
//!   `embedding_dependency.authentication` (Azure OpenAI REST reference, "Azure OpenAI On Your
//!   Data API reference"; the older `dataSources` of the 2023 previews carried a `key` in
//!   `parameters`);
//! - a remote MCP server tool of the Responses API: its `headers`
//!   (an `Authorization: Bearer …` for the server) and its `authorization` (an OAuth access token)
//!   (OpenAI API reference, "MCP tool"); redacted in any tool that has them;
//! - the same tool in a Realtime session's events: the `session` of a client's `session.update`
//!   or `transcription_session.update` and of the member's `session.created` / `session.updated`
//!   echo, and the `response` of a `response.create` (its tools for that response) and of the
//!   member's `response.created` / `response.done` ([`redacted_realtime_event`]).
//!
//! The member gets the body (the event) as the client sent it; the record's copy
//! (`BackendRequestBody`, and for a Realtime session's member events `BackendResponseBody`) has
//! each of these values replaced by [`REDACTED`], so that the audit store, its exports and its
//! readers never hold them.

use serde_json::Value;

/// What a credential is replaced with in the record.
pub const REDACTED: &str = "[redacted by Gatehouse]";

/// Members of an "On your data" source that hold a secret wherever they are (the older API's
/// `parameters.key` included); `authentication` objects are redacted whole but for their `type`.
const DATA_SOURCE_SECRETS: &[&str] = &[
    "key",
    "api_key",
    "connection_string",
    "access_token",
    "encoded_api_key",
    "password",
    "client_secret",
];

/// The members of a tool that hold an MCP server's credentials. They are redacted in every tool,
/// whatever its `type` says: a tool that gives its `type` twice is read by the gateway's tree as
/// the last and may be read by the member as the first.
pub const TOOL_SECRETS: [&str; 2] = ["headers", "authorization"];

/// Whether `body`, a request's top-level JSON object, carries one of the credentials this module
/// knows: a data source, or a tool with `headers` or `authorization`. (The request peek tells
/// the same without the tree, see [`crate::peek::RequestPeek`].)
pub fn carries_credentials(body: &Value) -> bool {
    body.get("data_sources").is_some()
        || body.get("dataSources").is_some()
        || body
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|tools| tools.iter().any(tool_carries_credentials))
}

/// Whether a tool has a member that holds a credential ([`TOOL_SECRETS`]).
fn tool_carries_credentials(tool: &Value) -> bool {
    TOOL_SECRETS.iter().any(|name| tool.get(name).is_some())
}

/// Replaces every credential in `body`, a request's top-level JSON object, with [`REDACTED`];
/// returns how many it replaced.
pub fn redact(body: &mut Value) -> usize {
    let Some(members) = body.as_object_mut() else {
        return 0;
    };
    let mut replaced = 0;
    for name in ["data_sources", "dataSources"] {
        if let Some(sources) = members.get_mut(name) {
            replaced += redact_data_source(sources);
        }
    }
    if let Some(Value::Array(tools)) = members.get_mut("tools") {
        replaced += tools.iter_mut().map(redact_tool).sum::<usize>();
    }
    replaced
}

/// The record's copy of a request body that may carry credentials: `body`, the parsed tree, with
/// its credentials redacted, as JSON bytes — always the tree's, even when nothing was replaced:
/// a body that gives a member twice (`"tools"` twice, `"headers"` twice in a tool) holds a
/// credential in the copy the tree dropped, which its bytes would keep.
pub fn record_copy(body: &Value) -> Option<Vec<u8>> {
    let mut copy = body.clone();
    redact(&mut copy);
    serde_json::to_vec(&copy).ok()
}

/// The members of a Realtime event that hold tools: a session's configuration (`session.update`,
/// `transcription_session.update`, and the member's `session.created`, `session.updated`) and a
/// response's (`response.create`, and the member's `response.created`, `response.done`).
const REALTIME_TOOL_HOLDERS: [&str; 2] = ["session", "response"];

/// A Realtime event (a client's or a member's, as one JSON object) with the credentials of its
/// `session` and `response` redacted as [`redact`] redacts a request's, as JSON text for the
/// record; `None` when it holds none.
pub fn redacted_realtime_event(event: &Value) -> Option<String> {
    let carries = REALTIME_TOOL_HOLDERS
        .iter()
        .filter_map(|name| event.get(name))
        .any(carries_credentials);
    if !carries {
        return None;
    }
    let mut copy = event.clone();
    let mut replaced = 0;
    for name in REALTIME_TOOL_HOLDERS {
        if let Some(holder) = copy.get_mut(name) {
            replaced += redact(holder);
        }
    }
    (replaced > 0).then(|| copy.to_string())
}

/// Redacts a data source (or anything in one): `authentication` objects but their `type`, and
/// the members named in [`DATA_SOURCE_SECRETS`], at any depth.
fn redact_data_source(value: &mut Value) -> usize {
    match value {
        Value::Array(items) => items.iter_mut().map(redact_data_source).sum(),
        Value::Object(members) => {
            let mut replaced = 0;
            for (name, member) in members.iter_mut() {
                if name == "authentication" {
                    replaced += match member {
                        Value::Object(authentication) => authentication
                            .iter_mut()
                            .filter(|(name, _)| name.as_str() != "type")
                            .map(|(_, secret)| replace(secret))
                            .sum(),
                        other => replace(other),
                    };
                } else if DATA_SOURCE_SECRETS.contains(&name.as_str()) {
                    replaced += replace(member);
                } else {
                    replaced += redact_data_source(member);
                }
            }
            replaced
        }
        _ => 0,
    }
}

/// Redacts a tool's `headers` (every value) and `authorization`.
fn redact_tool(tool: &mut Value) -> usize {
    let Some(members) = tool.as_object_mut() else {
        return 0;
    };
    let mut replaced = 0;
    match members.get_mut("headers") {
        Some(Value::Object(headers)) => {
            replaced += headers.values_mut().map(replace).sum::<usize>();
        }
        Some(other) => replaced += replace(other),
        None => {}
    }
    if let Some(authorization) = members.get_mut("authorization") {
        replaced += replace(authorization);
    }
    replaced
}

/// Replaces a value that holds something (not `null`) with [`REDACTED`].
fn replace(value: &mut Value) -> usize {
    if value.is_null() {
        return 0;
    }
    *value = Value::String(REDACTED.to_owned());
    1
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn on_your_data_credentials_are_redacted_and_the_rest_kept() {
        let mut body = json!({
            "messages": [{"role": "user", "content": "what is in the index?"}],
            "data_sources": [
                {
                    "type": "azure_search",
                    "parameters": {
                        "endpoint": "https://search.example",
                        "index_name": "docs",
                        "authentication": {"type": "api_key", "key": "search-admin-key"},
                        "embedding_dependency": {
                            "type": "deployment_name",
                            "authentication": {"type": "access_token", "access_token": "eyJ.tok"}
                        }
                    }
                },
                {
                    "type": "azure_cosmos_db",
                    "parameters": {
                        "authentication": {
                            "type": "connection_string",
                            "connection_string": "AccountEndpoint=…;AccountKey=cosmos-key"
                        }
                    }
                },
                {
                    "type": "mongo_db",
                    "parameters": {
                        "authentication": {"type": "username_and_password", "username": "u", "password": "p"}
                    }
                }
            ]
        });
        assert!(carries_credentials(&body));
        assert_eq!(redact(&mut body), 5);
        let text = body.to_string();
        for secret in [
            "search-admin-key",
            "eyJ.tok",
            "cosmos-key",
            "\"u\"",
            "\"p\"",
        ] {
            assert!(!text.contains(secret), "{secret}: {text}");
        }
        let search = &body["data_sources"][0]["parameters"];
        assert_eq!(search["authentication"]["type"], "api_key");
        assert_eq!(search["authentication"]["key"], REDACTED);
        assert_eq!(search["index_name"], "docs");
        assert_eq!(body["messages"][0]["content"], "what is in the index?");
    }

    #[test]
    fn the_older_data_sources_key_is_redacted() {
        let mut body = json!({"dataSources": [{"type": "AzureCognitiveSearch", "parameters": {"endpoint": "e", "key": "k-123", "indexName": "i"}}]});
        assert!(carries_credentials(&body));
        assert_eq!(redact(&mut body), 1);
        assert_eq!(body["dataSources"][0]["parameters"]["key"], REDACTED);
        assert_eq!(body["dataSources"][0]["parameters"]["indexName"], "i");
    }

    #[test]
    fn an_mcp_tools_headers_and_authorization_are_redacted_other_tools_kept() {
        let mut body = json!({
            "model": "gpt-4.1",
            "input": "list my repos",
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}},
                {
                    "type": "mcp",
                    "server_label": "github",
                    "server_url": "https://mcp.example/sse",
                    "headers": {"Authorization": "Bearer ghp-secret", "X-Api-Key": "k2"},
                    "authorization": "oauth-token",
                    "require_approval": "never"
                }
            ]
        });
        assert!(carries_credentials(&body));
        assert_eq!(redact(&mut body), 3);
        let text = body.to_string();
        for secret in ["ghp-secret", "k2", "oauth-token"] {
            assert!(!text.contains(secret), "{secret}: {text}");
        }
        assert_eq!(body["tools"][1]["server_url"], "https://mcp.example/sse");
        assert_eq!(body["tools"][1]["headers"]["Authorization"], REDACTED);
        // A function's parameter named `key` is not a credential.
        assert_eq!(
            body["tools"][0]["parameters"]["properties"]["key"]["type"],
            "string"
        );
    }

    #[test]
    fn a_body_without_credentials_is_left_alone() {
        let body = json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "my key is not a secret field"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]
        });
        assert!(!carries_credentials(&body));
        assert_eq!(redact(&mut body.clone()), 0);
        assert_eq!(record_copy(&body), serde_json::to_vec(&body).ok());
        let mut with_null = json!({"tools": [{"type": "mcp", "headers": null}]});
        assert_eq!(redact(&mut with_null), 0);
    }

    #[test]
    fn a_realtime_sessions_and_responses_mcp_credentials_are_redacted() {
        let update = json!({
            "type": "session.update",
            "event_id": "client_1",
            "session": {
                "instructions": "be brief",
                "tools": [{
                    "type": "mcp",
                    "server_label": "github",
                    "server_url": "https://mcp.example/sse",
                    "headers": {"Authorization": "Bearer ghp-secret"},
                    "authorization": "oauth-token"
                }]
            }
        });
        let redacted: Value =
            serde_json::from_str(&redacted_realtime_event(&update).unwrap()).unwrap();
        let text = redacted.to_string();
        for secret in ["ghp-secret", "oauth-token"] {
            assert!(!text.contains(secret), "{secret}: {text}");
        }
        let tool = &redacted["session"]["tools"][0];
        assert_eq!(tool["headers"]["Authorization"], REDACTED);
        assert_eq!(tool["authorization"], REDACTED);
        assert_eq!(tool["server_url"], "https://mcp.example/sse");
        assert_eq!(redacted["session"]["instructions"], "be brief");
        assert_eq!(redacted["event_id"], "client_1");

        let create = json!({"type": "response.create", "response": {"tools": [{"type": "mcp", "authorization": "t2"}]}});
        let redacted = redacted_realtime_event(&create).unwrap();
        assert!(!redacted.contains("t2"), "{redacted}");

        // Nothing to redact: the event's own text is kept.
        for event in [
            json!({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}}),
            json!({"type": "session.update", "session": {"tools": [{"type": "mcp", "headers": null}]}}),
            json!({"type": "conversation.item.create", "item": {"type": "message", "headers": {"a": "b"}}}),
        ] {
            assert_eq!(redacted_realtime_event(&event), None, "{event}");
        }
    }

    /// A tool that gives its `type` twice is read here as the last (`function`) and may be read
    /// by the member as the first (`mcp`): its credentials are redacted all the same.
    #[test]
    fn a_tools_credentials_are_redacted_whatever_its_type_says() {
        let body: Value = serde_json::from_str(
            r#"{"tools":[{"type":"mcp","type":"function","headers":{"Authorization":"Bearer t"}}]}"#,
        )
        .unwrap();
        assert!(carries_credentials(&body));
        let redacted = String::from_utf8(record_copy(&body).unwrap()).unwrap();
        assert!(!redacted.contains("Bearer t"), "{redacted}");
    }
}
