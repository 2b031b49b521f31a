//! Step 5: may this caller make this call?
//!
//! Access rules grant a grantee (an Entra group, a subscription, a user, an app role) deployments
//! and operations. A caller gets the union of every rule that names them; everything else is
//! denied. The refusal names the deployment and operation the caller asked for and never lists
//! what other rules grant.
//!
//! A call that names no deployment in its path is granted by rules with `resources: true`; when
//! it makes a model run all the same — an assistant created or changed with a `model`, a run
//! that names one, a fine-tuning job trained on its base `model`, an eval run's model, an eval's
//! graders' models — that model must be granted too, as a deployment, or `resources` would open
//! every model of the pool that serves them.
//! A reinforcement fine-tuning job's grader runs its `model` on every sample: granted too. A
//! Responses call's `image_generation` tool runs an image deployment (Azure: the
//! `x-ms-oai-image-generation-deployment` header; OpenAI: the tool's `model`): granted too,
//! whatever the route.
//! A batch runs the calls its input file names ([`crate::batch_input`]): each must be granted as
//! the same call made directly would be ([`authorize_batch`]). A Responses call must name its
//! `model` when rules are in force: one that continues a stored response without it would run
//! that response's model, which no rule was asked about.

use gatehouse_schema::OperationId;
use gatehouse_schema::identity::{AccessRule, Grantee, glob_matches};

use crate::auth::Principal;
use crate::batch_input::BatchCall;
use crate::classify::{Call, IMAGE_GENERATION_DEPLOYMENT};
use crate::error::GatewayError;

/// Checks `call` by `principal` against `rules` (`None`: no rules configured, everything allowed).
pub fn authorize(
    rules: Option<&[AccessRule]>,
    principal: &Principal,
    call: &Call,
) -> Result<(), GatewayError> {
    let Some(rules) = rules else {
        return Ok(());
    };
    let operation = call.operation.as_str();
    let deployment = call.deployment.as_deref();
    if deployment.is_none() && call.operation == OperationId::CreateResponse {
        // A Responses call without `model` continues a stored response on that response's
        // model, which the gateway does not know: it would run a model no rule was asked about.
        return Err(GatewayError::BadRequest {
            message: "The request names no model: with access rules in force, a Responses call \
                      names its deployment in `model`, also when it continues a stored response."
                .to_owned(),
            param: Some("model"),
        });
    }
    refuse_duplicate_members(call)?;
    let granted = match deployment {
        Some(deployment) => grants(rules, principal, operation, deployment),
        None => rules
            .iter()
            .any(|rule| applies(rule, principal, operation) && rule.resources),
    };
    if !granted {
        return Err(GatewayError::NotPermitted {
            deployment: deployment.map(truncated),
            operation,
        });
    }
    if deployment.is_none()
        && let Some(model) = models_run(call)
            .into_iter()
            .find(|model| !grants(rules, principal, operation, model))
    {
        return Err(GatewayError::NotPermitted {
            deployment: Some(truncated(model)),
            operation,
        });
    }
    let tool_models = match call.operation {
        OperationId::CreateResponse => image_models(call)?,
        OperationId::CreateEvalRun => eval_run_image_models(call)?,
        _ => Vec::new(),
    };
    if let Some(model) = tool_models
        .into_iter()
        .find(|model| !grants(rules, principal, operation, model))
    {
        return Err(GatewayError::ToolModelNotPermitted {
            deployment: truncated(model),
            operation,
        });
    }
    Ok(())
}

/// The operations whose body names models that run beside the call's own (graders, tools): a
/// member name given twice in one of their objects is refused, since the gateway (which reads
/// the last) and a member (which may read the first) would not judge the same model.
const CALLS_NAMING_MORE_MODELS: &[OperationId] = &[
    OperationId::CreateResponse,
    OperationId::FineTuningCreate,
    OperationId::CreateEval,
    OperationId::CreateEvalRun,
];

/// Refuses a body of [`CALLS_NAMING_MORE_MODELS`] that gives a member twice in one object.
fn refuse_duplicate_members(call: &Call) -> Result<(), GatewayError> {
    if !CALLS_NAMING_MORE_MODELS.contains(&call.operation) {
        return Ok(());
    }
    match call.json_bytes().and_then(crate::peek::duplicate_member) {
        None => Ok(()),
        Some(member) => Err(GatewayError::BadRequest {
            message: format!(
                "The request body gives `{}` more than once in one object: send it once (servers \
                 differ in which one they take).",
                truncated(&member)
            ),
            param: None,
        }),
    }
}

/// An `image_generation` tool that names no `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnnamedImageTool;

/// The `model`s of the `image_generation` tools in `tools` (a Responses call's, a batch line's,
/// an eval run's sampling parameters'). A tool that names none runs `unnamed` (the deployment
/// Azure's header names); without one, [`UnnamedImageTool`]: it would run the member's default
/// image model, which no rule was asked about.
pub(crate) fn image_tool_models<'a>(
    tools: &'a serde_json::Value,
    unnamed: Option<&'a str>,
) -> Result<Vec<&'a str>, UnnamedImageTool> {
    let mut models = Vec::new();
    for tool in tools.as_array().into_iter().flatten() {
        if tool.get("type").and_then(serde_json::Value::as_str) != Some("image_generation") {
            continue;
        }
        models.push(
            tool.get("model")
                .and_then(serde_json::Value::as_str)
                .or(unnamed)
                .ok_or(UnnamedImageTool)?,
        );
    }
    Ok(models)
}

/// The image deployments an eval run's Responses data source makes run through its sampling
/// parameters' tools (`data_source.sampling_params.tools`).
fn eval_run_image_models(call: &Call) -> Result<Vec<&str>, GatewayError> {
    let tools = call
        .json()
        .and_then(|body| body.pointer("/data_source/sampling_params/tools"));
    match tools.map(|tools| image_tool_models(tools, None)) {
        None => Ok(Vec::new()),
        Some(Ok(models)) => Ok(models),
        Some(Err(UnnamedImageTool)) => Err(GatewayError::BadRequest {
            message: "An `image_generation` tool of the run's sampling parameters names no \
                      model: with access rules in force, name its deployment in the tool's \
                      `model`."
                .to_owned(),
            param: Some("data_source"),
        }),
    }
}

/// The image deployments a Responses call may run besides its `model`: the one Azure's
/// `image_generation` tool runs, named in the [`IMAGE_GENERATION_DEPLOYMENT`] header (judged
/// whenever the header comes, since a stored prompt or an agent may bring the tool along), and
/// each `image_generation` tool's `model` (OpenAI's way). A tool that names neither would run
/// the member's default image model, which no rule was asked about: refused.
fn image_models(call: &Call) -> Result<Vec<&str>, GatewayError> {
    let mut models: Vec<&str> = call.image_deployment.as_deref().into_iter().collect();
    // Most Responses calls have no image tool: their body is not parsed for one. One that could
    // spell the tool's name with escapes (`\u005f`) is.
    let mentions_tool = call.json_bytes().is_some_and(|body| {
        memchr::memmem::find(body, b"image_generation").is_some()
            || memchr::memmem::find(body, b"\\u").is_some()
    });
    let tools = mentions_tool
        .then(|| call.json())
        .flatten()
        .and_then(|body| body.get("tools"));
    if let Some(tools) = tools {
        let run = image_tool_models(tools, call.image_deployment.as_deref()).map_err(|_| {
            GatewayError::BadRequest {
                message: format!(
                    "The `image_generation` tool names no model: with access rules in force, \
                     name its deployment in the `{IMAGE_GENERATION_DEPLOYMENT}` header (Azure) \
                     or in the tool's `model`."
                ),
                param: Some("tools"),
            }
        })?;
        models.extend(run);
    }
    Ok(models)
}

/// The deployments a call on the resource routes makes run although its path names none: the
/// top-level `model` of [`RESOURCE_CALLS_RUNNING_A_MODEL`]; an eval run's `data_source.model`
/// (the model that answers the eval's items, OpenAI's "completions" and "responses" run data
/// sources); an eval's graders' `model`s (`testing_criteria`, `score_model` and `label_model`
/// graders, and those inside a `multi` grader), which every run of it calls; a reinforcement
/// fine-tuning job's grader's `model`s.
fn models_run(call: &Call) -> Vec<&str> {
    let mut models: Vec<&str> = call
        .body_model_of(RESOURCE_CALLS_RUNNING_A_MODEL)
        .into_iter()
        .collect();
    let Some(body) = call.json() else {
        return models;
    };
    match call.operation {
        OperationId::FineTuningCreate => {
            // Reinforcement fine-tuning grades every sample with its grader, a model run too.
            if let Some(grader) = body.pointer("/method/reinforcement/grader") {
                grader_models(grader, &mut models);
            }
        }
        OperationId::CreateEvalRun => {
            models.extend(body.pointer("/data_source/model").and_then(|m| m.as_str()));
        }
        OperationId::CreateEval => {
            if let Some(criteria) = body.get("testing_criteria") {
                grader_models(criteria, &mut models);
            }
        }
        _ => {}
    }
    models
}

/// Every string `model` in `value`, a grader or a list or map of graders, however deep (a `multi`
/// grader holds graders; the JSON parser already bounds the nesting).
fn grader_models<'a>(value: &'a serde_json::Value, models: &mut Vec<&'a str>) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            serde_json::Value::Object(members) => {
                for (key, member) in members {
                    match member.as_str() {
                        Some(model) if key == "model" => models.push(model),
                        _ => pending.push(member),
                    }
                }
            }
            serde_json::Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
}

/// Checks the calls a batch's input file makes, after `batch_create` itself passed
/// [`authorize`]: each (operation, deployment) must be granted to `principal` by a rule that
/// covers that operation, as if the call were made directly. The refusal names the first line
/// that makes an ungranted call.
pub fn authorize_batch(
    rules: &[AccessRule],
    principal: &Principal,
    calls: &[BatchCall],
) -> Result<(), GatewayError> {
    match calls
        .iter()
        .find(|call| !grants(rules, principal, call.operation.as_str(), &call.deployment))
    {
        Some(call) => Err(GatewayError::BatchCallNotPermitted {
            line: call.line,
            deployment: truncated(&call.deployment),
            operation: call.operation.as_str(),
        }),
        None => Ok(()),
    }
}

/// Checks the deployment a run runs when it names no `model` (its assistant's, read from the
/// member the run goes to; see `assistant_model`), after the run itself passed [`authorize`]:
/// it must be granted to `principal` for the run's operation as if the run named it.
pub fn authorize_assistant_model(
    rules: &[AccessRule],
    principal: &Principal,
    operation: OperationId,
    deployment: &str,
) -> Result<(), GatewayError> {
    if grants(rules, principal, operation.as_str(), deployment) {
        return Ok(());
    }
    Err(GatewayError::AssistantModelNotPermitted {
        deployment: truncated(deployment),
        operation: operation.as_str(),
    })
}

/// Whether a rule for `principal` and `operation` grants `deployment`.
fn grants(rules: &[AccessRule], principal: &Principal, operation: &str, deployment: &str) -> bool {
    rules.iter().any(|rule| {
        applies(rule, principal, operation)
            && rule
                .deployments
                .iter()
                .any(|pattern| glob_matches(pattern, deployment))
    })
}

/// Whether `rule` is one for `principal` and `operation`.
fn applies(rule: &AccessRule, principal: &Principal, operation: &str) -> bool {
    names(rule, principal) && covers_operation(rule, operation)
}

/// The calls on the resource routes that make a deployment run although their path names none:
/// an assistant's creation or change, or a run (Azure's Assistants take a deployment name in
/// `model`), and a fine-tuning job (billed by the hour of training its base `model`, a name such
/// as `gpt-4o-mini-2024-07-18`, which a rule grants with a pattern such as `gpt-4o-mini*`).
const RESOURCE_CALLS_RUNNING_A_MODEL: &[OperationId] = &[
    OperationId::CreateAssistant,
    OperationId::ModifyAssistant,
    OperationId::CreateRun,
    OperationId::CreateThreadAndRun,
    OperationId::FineTuningCreate,
];

/// Whether `rule` grants to `principal`.
fn names(rule: &AccessRule, principal: &Principal) -> bool {
    match &rule.grantee {
        Grantee::Subscription { id } => principal
            .subscription
            .as_ref()
            .is_some_and(|subscription| subscription.id == *id),
        Grantee::Group { id, .. } => principal.user.as_ref().is_some_and(|user| {
            user.groups
                .iter()
                .any(|group| group.eq_ignore_ascii_case(id))
        }),
        Grantee::User { id } => principal
            .user
            .as_ref()
            .is_some_and(|user| user.object_id.eq_ignore_ascii_case(id)),
        Grantee::AppRole { value } => principal
            .user
            .as_ref()
            .is_some_and(|user| user.roles.iter().any(|role| role == value)),
    }
}

fn covers_operation(rule: &AccessRule, operation: &str) -> bool {
    rule.operations.is_empty()
        || rule
            .operations
            .iter()
            .any(|pattern| glob_matches(pattern, operation))
}

/// A client-supplied name, shortened for an error message.
fn truncated(name: &str) -> String {
    const MAX: usize = 128;
    if name.len() <= MAX {
        return name.to_owned();
    }
    let mut end = MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gatehouse_schema::OperationId;
    use gatehouse_schema::config::{KeyHash, Subscription, SubscriptionState};

    use super::*;
    use crate::entra::EntraIdentity;

    fn rule(grantee: Grantee, deployments: &[&str], operations: &[&str]) -> AccessRule {
        AccessRule {
            id: "r".to_owned(),
            grantee,
            deployments: deployments.iter().map(|d| (*d).to_owned()).collect(),
            operations: operations.iter().map(|o| (*o).to_owned()).collect(),
            resources: false,
        }
    }

    fn user(groups: &[&str]) -> Principal {
        Principal {
            subscription: None,
            user: Some(Arc::new(EntraIdentity {
                object_id: "u1".to_owned(),
                tenant_id: "t".to_owned(),
                name: None,
                username: None,
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                roles: vec!["Gatehouse.Caller".to_owned()],
                app_id: None,
                app_only: false,
                groups_overage: false,
            })),
        }
    }

    fn call(deployment: Option<&str>, operation: OperationId) -> Call {
        Call::for_test(operation, deployment)
    }

    fn group(id: &str) -> Grantee {
        Grantee::Group {
            id: id.to_owned(),
            display_name: String::new(),
        }
    }

    #[test]
    fn a_member_of_two_groups_gets_the_union() {
        let rules = [
            rule(group("g-chat"), &["gpt-4o"], &["chatcompletions_create"]),
            rule(group("g-embed"), &["text-embedding-*"], &[]),
        ];
        let both = user(&["g-chat", "G-EMBED"]);
        let chat = call(Some("gpt-4o"), OperationId::ChatCompletionsCreate);
        let embed = call(
            Some("text-embedding-3-small"),
            OperationId::EmbeddingsCreate,
        );
        assert!(authorize(Some(&rules), &both, &chat).is_ok());
        assert!(authorize(Some(&rules), &both, &embed).is_ok());
        let only_chat = user(&["g-chat"]);
        assert!(authorize(Some(&rules), &only_chat, &embed).is_err());
        // The chat rule grants chat only.
        let embed_on_gpt = call(Some("gpt-4o"), OperationId::EmbeddingsCreate);
        assert!(authorize(Some(&rules), &only_chat, &embed_on_gpt).is_err());
        let nobody = user(&[]);
        assert!(matches!(
            authorize(Some(&rules), &nobody, &chat),
            Err(GatewayError::NotPermitted { deployment: Some(d), operation: "chatcompletions_create" }) if d == "gpt-4o"
        ));
    }

    #[test]
    fn subscriptions_users_roles_and_resources() {
        let subscription = Principal {
            subscription: Some(Arc::new(Subscription {
                id: "team-a".to_owned(),
                display_name: String::new(),
                product: None,
                primary_key_hash: KeyHash([0; 32]),
                secondary_key_hash: None,
                secondary_expires_at: None,
                state: SubscriptionState::Active,
                expires_at: None,
            })),
            user: None,
        };
        let mut files = rule(
            Grantee::Subscription {
                id: "team-a".to_owned(),
            },
            &[],
            &["files_*"],
        );
        files.resources = true;
        let rules = [
            files,
            rule(
                Grantee::User {
                    id: "U1".to_owned(),
                },
                &["o1"],
                &[],
            ),
            rule(
                Grantee::AppRole {
                    value: "Gatehouse.Caller".to_owned(),
                },
                &["gpt-4o-mini"],
                &[],
            ),
        ];
        let upload = call(None, OperationId::FilesUpload);
        assert!(authorize(Some(&rules), &subscription, &upload).is_ok());
        assert!(authorize(Some(&rules), &user(&[]), &upload).is_err());
        let o1 = call(Some("o1"), OperationId::ChatCompletionsCreate);
        assert!(authorize(Some(&rules), &user(&[]), &o1).is_ok());
        assert!(authorize(Some(&rules), &subscription, &o1).is_err());
        let mini = call(Some("gpt-4o-mini"), OperationId::ChatCompletionsCreate);
        assert!(authorize(Some(&rules), &user(&[]), &mini).is_ok());
        // A resources rule does not grant the model an assistant, a run or a fine-tuning job
        // names.
        let mut assistants = rule(
            Grantee::Subscription {
                id: "team-a".to_owned(),
            },
            &["gpt-4o-mini"],
            &[],
        );
        assistants.resources = true;
        let rules_for_assistants = [assistants];
        for (operation, model, allowed) in [
            (OperationId::CreateAssistant, Some("gpt-4o-mini"), true),
            (OperationId::CreateAssistant, Some("o1"), false),
            (OperationId::CreateRun, Some("O1"), false),
            (OperationId::CreateThreadAndRun, Some("o1"), false),
            (OperationId::ModifyAssistant, Some("o1"), false),
            (OperationId::CreateRun, None, true),
            (OperationId::FineTuningCreate, Some("gpt-4o-mini"), true),
            (
                OperationId::FineTuningCreate,
                Some("gpt-4o-2024-08-06"),
                false,
            ),
            // A file's purpose names no deployment.
            (OperationId::FilesUpload, Some("o1"), true),
        ] {
            let mut resource_call = call(None, operation);
            resource_call.peek = Some(crate::peek::RequestPeek {
                model: model.map(str::to_owned),
                ..Default::default()
            });
            let result = authorize(Some(&rules_for_assistants), &subscription, &resource_call);
            assert_eq!(result.is_ok(), allowed, "{operation:?} with {model:?}");
            if let Err(GatewayError::NotPermitted { deployment, .. }) = result {
                assert_eq!(deployment.as_deref(), model);
            }
        }
        // No rules at all: allowed; an empty list: denied.
        assert!(authorize(None, &subscription, &o1).is_ok());
        assert!(authorize(Some(&[]), &subscription, &o1).is_err());
    }
}
