//! The model a run runs when its body names none: its assistant's.
//!
//! A run (`POST …/threads/{thread_id}/runs`, `POST …/threads/runs`) names an `assistant_id` and
//! may name a `model`; without one it runs the `model` of the assistant, which on Azure is a
//! deployment name (the Assistants API's "Create run": `model`, "the ID of the model to be used
//! to execute this run; if a value is provided here, it will override the model associated with
//! the assistant"). The assistant's model was checked when the assistant was created or changed,
//! but perhaps for someone else, or under rules since narrowed: with access rules in force, the
//! gateway reads the assistant (`GET …/assistants/{assistant_id}`) from the member the run goes
//! to, and the caller must be granted that deployment as if the run named it.

use std::time::Duration;

use http::{HeaderMap, Uri};
use serde::Deserialize;

use crate::member_read::{self, MemberRead};
use crate::pool::Member;

/// The most of an assistant's answer the gateway reads. An assistant holds instructions of up
/// to 256,000 characters, up to 128 tools with their JSON schemas and its metadata; an answer
/// larger than this is not one a member gives.
pub const MAX_ASSISTANT_BYTES: usize = 4 * 1024 * 1024;

/// An assistant, as far as the gateway reads it.
#[derive(Deserialize)]
struct Assistant {
    model: String,
}

/// Reads the assistant at `uri` (its `…/assistants/{id}`) from `member` with `headers` (the
/// member's credential): the deployment it runs. An answer that is too large, cut off or names
/// no model fails the read as a broken answer would.
pub(crate) async fn read_assistant_model(
    member: &Member,
    uri: Uri,
    headers: HeaderMap,
) -> MemberRead<String> {
    let response = match member_read::get(member, uri, headers).await.into_read() {
        Ok(response) => response,
        Err(ended) => return ended,
    };
    let (status, read) = match member_read::whole_body(
        member,
        response,
        MAX_ASSISTANT_BYTES,
        "assistant_too_large",
        "assistant_cut",
    )
    .await
    {
        Ok(read) => read,
        Err(ended) => return ended,
    };
    match serde_json::from_slice::<Assistant>(&read) {
        Ok(assistant) if !assistant.model.is_empty() => MemberRead::Read(assistant.model),
        _ => MemberRead::Failed {
            reason: "assistant_unreadable",
            status: Some(status),
            wait: Duration::ZERO,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assistant_is_read_for_its_model_only() {
        let assistant: Assistant = serde_json::from_str(
            r#"{"id":"asst_1","object":"assistant","model":"gpt-4o","instructions":"x","tools":[{"type":"code_interpreter"}],"metadata":{}}"#,
        )
        .unwrap();
        assert_eq!(assistant.model, "gpt-4o");
        assert!(serde_json::from_str::<Assistant>(r#"{"id":"asst_1"}"#).is_err());
    }
}
