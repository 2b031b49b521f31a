//! Step 4: what a request is — operation id, deployment, route style, object ids.
//!
//! Accepts the route styles clients use (`azure-specs.md` §1.1, §1.8):
//! - Azure classic deployment routes: `/openai/deployments/{d}/chat/completions?api-version=…`;
//! - Azure resource routes: `/openai/files`, `/openai/batches/{id}`, `/openai/responses`, …;
//! - Azure v1 routes: `/openai/v1/chat/completions`, model in the body;
//! - OpenAI routes: `/v1/chat/completions`, model in the body.
//!
//! The operation id is the same whatever the style.

use std::sync::OnceLock;

use bytes::Bytes;
use gatehouse_schema::OperationId;
use http::{HeaderMap, Method, header};

use crate::error::GatewayError;
use crate::peek::RequestPeek;

/// How the client addressed the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteStyle {
    /// `/openai/deployments/{d}/…` (deployment in the path).
    AzureDeployment,
    /// `/openai/{resource}…` with `api-version`.
    AzureResource,
    /// `/openai/v1/…`.
    AzureV1,
    /// `/v1/…` (OpenAI).
    OpenAi,
}

/// What kind of body the operation takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body expected.
    None,
    /// A JSON object.
    Json,
    /// `multipart/form-data`.
    Multipart,
}

/// Which stateful object family an id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFamily {
    /// Uploaded files.
    File,
    /// Batch jobs.
    Batch,
    /// Fine-tuning jobs.
    FineTuningJob,
    /// Assistants.
    Assistant,
    /// Threads.
    Thread,
    /// Stored responses.
    Response,
    /// Vector stores.
    VectorStore,
    /// Chat completions stored with `"store": true`.
    ChatCompletion,
    /// Uploads of a file in parts.
    Upload,
    /// Containers (the code interpreter's sandboxes).
    Container,
    /// Conversations of the Responses API.
    Conversation,
    /// Evals (and their runs, addressed under them).
    Eval,
}

impl ObjectFamily {
    /// Whether objects of the family are made by model calls (a stored response, a stored chat
    /// completion): such a call is retried on another member as every model call is, since a
    /// second copy costs tokens but breaks nothing; other creates are not sent twice.
    pub fn made_by_model_calls(self) -> bool {
        matches!(self, ObjectFamily::Response | ObjectFamily::ChatCompletion)
    }
}

/// A classified request.
#[derive(Debug, Clone)]
pub struct Call {
    /// The operation.
    pub operation: OperationId,
    /// How the client addressed it.
    pub style: RouteStyle,
    /// Deployment (Azure) or model (OpenAI style) the call names, if any.
    pub deployment: Option<String>,
    /// Path segments after the style prefix: `["chat", "completions"]`, `["files", "file-1", "content"]`.
    pub op_path: Vec<String>,
    /// `api-version` of the client, if given.
    pub api_version: Option<String>,
    /// The stateful object the path addresses (the call must go where it was created).
    pub object: Option<(ObjectFamily, String)>,
    /// The family of object this call creates, if it creates one.
    pub creates: Option<ObjectFamily>,
    /// The body kind the operation takes.
    pub body_kind: BodyKind,
    /// Whether the client asked for a stream.
    pub is_stream: bool,
    /// A form's `prompt` field (an image edit's, a transcription's), for the record.
    pub form_prompt: Option<String>,
    /// A form's `model` field: its position among the form's parts and its value, as the form
    /// reader saw them (so that the member's name replaces that very part).
    pub form_model: Option<(usize, String)>,
    /// What the hot path reads from a JSON body (`None` when the body is not JSON).
    pub peek: Option<RequestPeek>,
    /// The image deployment a Responses call's `image_generation` tool runs on Azure, named in
    /// [`IMAGE_GENERATION_DEPLOYMENT`] (`None` on other operations, or when the header is absent).
    pub image_deployment: Option<String>,
    /// The JSON body's bytes, parsed into [`Call::json`] only when something needs the tree.
    json_body: Bytes,
    json: OnceLock<Option<serde_json::Value>>,
}

impl Call {
    /// A call with only an operation and a deployment, for tests of later pipeline steps.
    #[cfg(test)]
    pub(crate) fn for_test(operation: OperationId, deployment: Option<&str>) -> Call {
        Call {
            operation,
            style: RouteStyle::AzureDeployment,
            deployment: deployment.map(str::to_owned),
            op_path: Vec::new(),
            api_version: None,
            object: None,
            creates: None,
            body_kind: BodyKind::None,
            is_stream: false,
            form_prompt: None,
            form_model: None,
            peek: None,
            image_deployment: None,
            json_body: Bytes::new(),
            json: OnceLock::new(),
        }
    }

    /// The JSON body's bytes, when the body is JSON.
    pub fn json_bytes(&self) -> Option<&[u8]> {
        self.peek.as_ref()?;
        Some(&self.json_body)
    }

    /// The `model` the JSON body names when the call is one of `operations`: the deployment a
    /// call on the resource routes makes run although its path names none (an assistant's or a
    /// run's `model`, a fine-tuning job's base model).
    pub fn body_model_of(&self, operations: &[OperationId]) -> Option<&str> {
        if !operations.contains(&self.operation) {
            return None;
        }
        self.peek.as_ref()?.model.as_deref()
    }

    /// The parsed JSON body, when the body is JSON; parsed on first use (capture, estimation,
    /// renaming the model, object references), never on the plain forwarding path.
    pub fn json(&self) -> Option<&serde_json::Value> {
        self.peek.as_ref()?;
        self.json
            .get_or_init(|| serde_json::from_slice(&self.json_body).ok())
            .as_ref()
    }
}

/// The request header in which Azure OpenAI takes the image deployment that a Responses call's
/// `image_generation` tool runs ("Image generation" in Azure's Responses API how-to; OpenAI takes
/// the model in the tool's `model` instead).
pub const IMAGE_GENERATION_DEPLOYMENT: &str = "x-ms-oai-image-generation-deployment";

/// The longest deployment name Azure accepts.
const MAX_NAME: usize = 64;
/// The longest object id accepted in a path.
const MAX_ID: usize = 128;

/// Classifies a request by method, path, query, headers and body.
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Call, GatewayError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (style, deployment, rest) = match segments.as_slice() {
        ["openai", "deployments", deployment, rest @ ..] if !rest.is_empty() => (
            RouteStyle::AzureDeployment,
            Some(valid_name(deployment)?),
            rest,
        ),
        ["openai", "v1", rest @ ..] => (RouteStyle::AzureV1, None, rest),
        ["openai", rest @ ..] => (RouteStyle::AzureResource, None, rest),
        ["v1", rest @ ..] => (RouteStyle::OpenAi, None, rest),
        _ => return Err(GatewayError::UnknownRoute),
    };
    let rest: Vec<&str> = rest.iter().copied().filter(|s| !s.is_empty()).collect();
    let mut route = route_of(method, &rest)?;
    if style == RouteStyle::AzureDeployment && !route.deployment_scoped {
        return Err(GatewayError::UnknownRoute);
    }

    let api_version = query_param(query, "api-version");
    // Azure's versions are dates with an optional `-preview`, or `preview`/`latest` on v1: a
    // value with other characters (a NUL, a line break) is refused before it reaches a backend,
    // a log line or the record.
    if let Some(version) = &api_version
        && (version.is_empty()
            || version.len() > 64
            || !version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')))
    {
        return Err(GatewayError::BadRequest {
            message: "The api-version query parameter is not valid: use a version such as \
                      `2024-10-21` or `2025-04-01-preview`."
                .to_owned(),
            param: Some("api-version"),
        });
    }
    // As sent: a multipart boundary is matched byte for byte (browsers send capitals in theirs).
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if route.operation == OperationId::CreateContainerFile && is_multipart(content_type) {
        // A container file is uploaded as a form or named (`file_id`) in a JSON body.
        route.body_kind = BodyKind::Multipart;
    }
    let (peek, tree) = parse_body(route.body_kind, content_type, body)?;
    // A chat completion made with `"store": true` is kept by its member, which alone can answer
    // about it afterwards.
    if route.operation == OperationId::ChatCompletionsCreate
        && peek.as_ref().and_then(|peek| peek.store) == Some(true)
    {
        route.creates = Some(ObjectFamily::ChatCompletion);
    }
    // A model call's form is read for its `model` and `stream` fields (a file upload's is not).
    let mut form = if route.body_kind == BodyKind::Multipart
        && (deployment.is_some() || route.model_in_body)
    {
        Some(form_fields(content_type, body)?)
    } else {
        None
    };
    let is_stream = match &form {
        Some(form) => form.asks_for_a_stream(),
        None => peek.as_ref().and_then(|p| p.stream).unwrap_or(false),
    };
    let form_prompt = form.as_mut().and_then(|form| form.prompt.take());
    let form_model = form
        .as_ref()
        .and_then(|form| Some((form.model_part?, form.model.clone()?)));

    let deployment = match deployment {
        Some(d) => {
            // On a deployment route the path names the deployment the call is judged by: a form
            // whose `model` field names another is refused (a JSON body's is replaced; a form's
            // is set to the path's for a member that reads it there, `proxy::upstream_body`).
            if let Some(model) = form.as_ref().and_then(|form| form.model.as_deref())
                && !model.eq_ignore_ascii_case(&d)
            {
                return Err(GatewayError::BadRequest {
                    message: format!(
                        "The form's `model` field names another deployment than the path (`{d}`): \
                         leave it out or set it to the same name."
                    ),
                    param: Some("model"),
                });
            }
            Some(d)
        }
        None if route.model_in_body => {
            let model = match (&peek, form) {
                (Some(peek), _) => peek.model.clone(),
                (None, Some(form)) => form.model,
                (None, None) => None,
            };
            match model {
                Some(model) => Some(valid_name(&model)?),
                // Responses may name no model when they continue a stored one.
                None if route.operation == OperationId::CreateResponse => None,
                None => {
                    return Err(GatewayError::BadRequest {
                        message: "The request names no model: set `model` to a deployment name."
                            .to_owned(),
                        param: Some("model"),
                    });
                }
            }
        }
        None => None,
    };
    let mut image_headers = headers.get_all(IMAGE_GENERATION_DEPLOYMENT).iter();
    let image_deployment = match image_headers.next() {
        Some(value) if route.operation == OperationId::CreateResponse => {
            // Given twice, the member might run either: refused as a body member given twice is.
            let named = value
                .to_str()
                .ok()
                .filter(|_| image_headers.next().is_none())
                .and_then(|name| valid_name(name).ok());
            Some(named.ok_or_else(|| GatewayError::BadRequest {
                message: format!(
                    "The `{IMAGE_GENERATION_DEPLOYMENT}` header does not name one valid \
                     deployment: give it once, with letters, digits, '.', '_', '-' and ':' (at \
                     most 64 characters)."
                ),
                param: None,
            })?)
        }
        _ => None,
    };

    let call = Call {
        operation: route.operation,
        style,
        deployment,
        op_path: rest.iter().map(|s| (*s).to_owned()).collect(),
        api_version,
        object: route.object,
        creates: route.creates,
        body_kind: route.body_kind,
        is_stream,
        form_prompt,
        form_model,
        image_deployment,
        json_body: if peek.is_some() {
            body.clone()
        } else {
            Bytes::new()
        },
        json: tree.map_or_else(OnceLock::new, |tree| OnceLock::from(Some(tree))),
        peek,
    };
    // The model a run or an eval run names is the deployment its limits count by and its access
    // rules judge: a name, as a path's deployment is.
    if let Some(model) = crate::limits::deployment_run(&call)
        && call.deployment.is_none()
    {
        valid_name(model)?;
    }
    Ok(call)
}

/// The Realtime API's WebSocket paths, by route style: `/openai/realtime` (Azure classic, the
/// deployment in `deployment`), `/openai/v1/realtime` (Azure v1) and `/v1/realtime` (OpenAI),
/// the model in `model`. `None` for any other path.
pub(crate) fn realtime_style(path: &str) -> Option<RouteStyle> {
    match path.trim_end_matches('/') {
        "/openai/realtime" => Some(RouteStyle::AzureResource),
        "/openai/v1/realtime" => Some(RouteStyle::AzureV1),
        "/v1/realtime" => Some(RouteStyle::OpenAi),
        _ => None,
    }
}

/// Classifies a Realtime API session by its query: the deployment it names (`deployment`, as
/// Azure's SDKs send it, else `model`, as the v1 and OpenAI routes take it) and the client's
/// `api-version`.
pub(crate) fn realtime(style: RouteStyle, query: Option<&str>) -> Result<Call, GatewayError> {
    let named = query_param(query, "deployment").or_else(|| query_param(query, "model"));
    let Some(named) = named else {
        return Err(GatewayError::BadRequest {
            message: "The Realtime API call names no deployment: add `deployment=` (Azure) or \
                      `model=` to the URL's query."
                .to_owned(),
            param: Some("deployment"),
        });
    };
    let deployment = valid_name(&named)?;
    let api_version = query_param(query, "api-version");
    if let Some(version) = &api_version
        && (version.is_empty()
            || version.len() > 64
            || !version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')))
    {
        return Err(GatewayError::BadRequest {
            message: "The api-version query parameter is not valid.".to_owned(),
            param: Some("api-version"),
        });
    }
    Ok(Call {
        operation: OperationId::RealtimeSession,
        style,
        deployment: Some(deployment),
        op_path: vec!["realtime".to_owned()],
        api_version,
        object: None,
        creates: None,
        body_kind: BodyKind::None,
        is_stream: true,
        form_prompt: None,
        form_model: None,
        peek: None,
        image_deployment: None,
        json_body: Bytes::new(),
        json: OnceLock::new(),
    })
}

/// What a method and path make: the operation and how it is called.
pub(crate) struct Route {
    pub(crate) operation: OperationId,
    pub(crate) body_kind: BodyKind,
    /// Whether the Azure classic deployment route exists for it.
    deployment_scoped: bool,
    /// Whether non-deployment styles name the model in the body.
    pub(crate) model_in_body: bool,
    object: Option<(ObjectFamily, String)>,
    creates: Option<ObjectFamily>,
}

fn inference(operation: OperationId, body_kind: BodyKind) -> Route {
    Route {
        operation,
        body_kind,
        deployment_scoped: true,
        model_in_body: true,
        object: None,
        creates: None,
    }
}

fn resource(operation: OperationId, body_kind: BodyKind) -> Route {
    Route {
        operation,
        body_kind,
        deployment_scoped: false,
        model_in_body: false,
        object: None,
        creates: None,
    }
}

fn on(route: Route, family: ObjectFamily, id: &str) -> Result<Route, GatewayError> {
    Ok(Route {
        object: Some((family, valid_id(id)?)),
        ..route
    })
}

fn creating(route: Route, family: ObjectFamily) -> Route {
    Route {
        creates: Some(family),
        ..route
    }
}

/// The route of a method and the path segments after the style prefix (`["chat", "completions"]`).
pub(crate) fn route_of(method: &Method, rest: &[&str]) -> Result<Route, GatewayError> {
    use BodyKind::{Json, Multipart, None as NoBody};
    use ObjectFamily as F;
    use OperationId as Op;
    let get = method == Method::GET;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    let route = match rest {
        ["chat", "completions"] if post => inference(Op::ChatCompletionsCreate, Json),
        ["chat", "completions"] if get => resource(Op::ListChatCompletions, NoBody),
        ["chat", "completions", id] if get => on(
            resource(Op::GetChatCompletion, NoBody),
            F::ChatCompletion,
            id,
        )?,
        ["chat", "completions", id] if post => on(
            resource(Op::UpdateChatCompletion, Json),
            F::ChatCompletion,
            id,
        )?,
        ["chat", "completions", id] if delete => on(
            resource(Op::DeleteChatCompletion, NoBody),
            F::ChatCompletion,
            id,
        )?,
        ["chat", "completions", id, "messages"] if get => on(
            resource(Op::GetChatCompletionMessages, NoBody),
            F::ChatCompletion,
            id,
        )?,
        ["completions"] if post => inference(Op::CompletionsCreate, Json),
        ["embeddings"] if post => inference(Op::EmbeddingsCreate, Json),
        ["images", "generations"] if post => inference(Op::ImageGenerationsCreate, Json),
        ["images", "edits"] if post => inference(Op::ImageEditsCreate, Multipart),
        ["images", "variations"] if post => inference(Op::ImageVariationsCreate, Multipart),
        ["audio", "transcriptions"] if post => inference(Op::TranscriptionsCreate, Multipart),
        ["audio", "translations"] if post => inference(Op::TranslationsCreate, Multipart),
        ["audio", "speech"] if post => inference(Op::SpeechCreate, Json),

        ["responses"] if post => Route {
            deployment_scoped: false,
            ..creating(inference(Op::CreateResponse, Json), F::Response)
        },
        ["responses", id] if get => on(resource(Op::GetResponse, NoBody), F::Response, id)?,
        ["responses", id] if delete => on(resource(Op::DeleteResponse, NoBody), F::Response, id)?,
        ["responses", id, "cancel"] if post => {
            on(resource(Op::CancelResponse, Json), F::Response, id)?
        }
        ["responses", id, "input_items"] if get => {
            on(resource(Op::GetInputItems, NoBody), F::Response, id)?
        }

        ["files"] if get => resource(Op::FilesList, NoBody),
        ["files"] if post => creating(resource(Op::FilesUpload, Multipart), F::File),
        ["files", "import"] if post => creating(resource(Op::FilesImport, Json), F::File),
        ["files", id] if get => on(resource(Op::FilesGet, NoBody), F::File, id)?,
        ["files", id] if delete => on(resource(Op::FilesDelete, NoBody), F::File, id)?,
        ["files", id, "content"] if get => on(resource(Op::FilesGetContent, NoBody), F::File, id)?,

        ["uploads"] if post => creating(resource(Op::CreateUpload, Json), F::Upload),
        ["uploads", id, "parts"] if post => {
            on(resource(Op::AddUploadPart, Multipart), F::Upload, id)?
        }
        ["uploads", id, "complete"] if post => {
            on(resource(Op::CompleteUpload, Json), F::Upload, id)?
        }
        ["uploads", id, "cancel"] if post => on(resource(Op::CancelUpload, Json), F::Upload, id)?,

        ["batches"] if get => resource(Op::BatchList, NoBody),
        ["batches"] if post => creating(resource(Op::BatchCreate, Json), F::Batch),
        ["batches", id] if get => on(resource(Op::BatchGet, NoBody), F::Batch, id)?,
        ["batches", id, "cancel"] if post => on(resource(Op::BatchCancel, Json), F::Batch, id)?,

        ["fine_tuning", "jobs"] if get => resource(Op::FineTuningList, NoBody),
        ["fine_tuning", "jobs"] if post => {
            creating(resource(Op::FineTuningCreate, Json), F::FineTuningJob)
        }
        ["fine_tuning", "jobs", id] if get => {
            on(resource(Op::FineTuningGet, NoBody), F::FineTuningJob, id)?
        }
        ["fine_tuning", "jobs", id, action] if post => {
            let op = match *action {
                "cancel" => Op::FineTuningCancel,
                "pause" => Op::FineTuningPause,
                "resume" => Op::FineTuningResume,
                _ => return Err(GatewayError::UnknownRoute),
            };
            on(resource(op, Json), F::FineTuningJob, id)?
        }
        ["fine_tuning", "jobs", id, "events"] if get => on(
            resource(Op::FineTuningGetEvents, NoBody),
            F::FineTuningJob,
            id,
        )?,
        ["fine_tuning", "jobs", id, "checkpoints"] if get => on(
            resource(Op::FineTuningGetCheckpoints, NoBody),
            F::FineTuningJob,
            id,
        )?,

        ["models"] if get => resource(Op::ModelsList, NoBody),
        ["models", id] if get => {
            valid_id(id)?;
            resource(Op::ModelsGet, NoBody)
        }

        ["assistants"] if get => resource(Op::ListAssistants, NoBody),
        ["assistants"] if post => creating(resource(Op::CreateAssistant, Json), F::Assistant),
        ["assistants", id] if get => on(resource(Op::GetAssistant, NoBody), F::Assistant, id)?,
        ["assistants", id] if post => on(resource(Op::ModifyAssistant, Json), F::Assistant, id)?,
        ["assistants", id] if delete => {
            on(resource(Op::DeleteAssistant, NoBody), F::Assistant, id)?
        }

        ["threads"] if post => creating(resource(Op::CreateThread, Json), F::Thread),
        ["threads", "runs"] if post => creating(resource(Op::CreateThreadAndRun, Json), F::Thread),
        ["threads", id] if get => on(resource(Op::GetThread, NoBody), F::Thread, id)?,
        ["threads", id] if post => on(resource(Op::ModifyThread, Json), F::Thread, id)?,
        ["threads", id] if delete => on(resource(Op::DeleteThread, NoBody), F::Thread, id)?,
        ["threads", id, "messages"] if get => {
            on(resource(Op::ListMessages, NoBody), F::Thread, id)?
        }
        ["threads", id, "messages"] if post => {
            on(resource(Op::CreateMessage, Json), F::Thread, id)?
        }
        ["threads", id, "messages", m] if get => {
            on_with(resource(Op::GetMessage, NoBody), F::Thread, id, m)?
        }
        ["threads", id, "messages", m] if post => {
            on_with(resource(Op::ModifyMessage, Json), F::Thread, id, m)?
        }
        ["threads", id, "messages", m] if delete => {
            on_with(resource(Op::DeleteMessage, NoBody), F::Thread, id, m)?
        }
        ["threads", id, "runs"] if get => on(resource(Op::ListRuns, NoBody), F::Thread, id)?,
        ["threads", id, "runs"] if post => on(resource(Op::CreateRun, Json), F::Thread, id)?,
        ["threads", id, "runs", r] if get => {
            on_with(resource(Op::GetRun, NoBody), F::Thread, id, r)?
        }
        ["threads", id, "runs", r] if post => {
            on_with(resource(Op::ModifyRun, Json), F::Thread, id, r)?
        }
        ["threads", id, "runs", r, "submit_tool_outputs"] if post => {
            on_with(resource(Op::SubmitToolOutputsToRun, Json), F::Thread, id, r)?
        }
        ["threads", id, "runs", r, "cancel"] if post => {
            on_with(resource(Op::CancelRun, Json), F::Thread, id, r)?
        }
        ["threads", id, "runs", r, "steps"] if get => {
            on_with(resource(Op::ListRunSteps, NoBody), F::Thread, id, r)?
        }
        ["threads", id, "runs", r, "steps", s] if get => {
            valid_id(s)?;
            on_with(resource(Op::GetRunStep, NoBody), F::Thread, id, r)?
        }

        ["vector_stores"] if get => resource(Op::ListVectorStores, NoBody),
        ["vector_stores"] if post => {
            creating(resource(Op::CreateVectorStore, Json), F::VectorStore)
        }
        ["vector_stores", id] if get => {
            on(resource(Op::GetVectorStore, NoBody), F::VectorStore, id)?
        }
        ["vector_stores", id] if post => {
            on(resource(Op::ModifyVectorStore, Json), F::VectorStore, id)?
        }
        ["vector_stores", id] if delete => {
            on(resource(Op::DeleteVectorStore, NoBody), F::VectorStore, id)?
        }
        ["vector_stores", id, "search"] if post => {
            on(resource(Op::SearchVectorStore, Json), F::VectorStore, id)?
        }
        ["vector_stores", id, "files"] if get => on(
            resource(Op::ListVectorStoreFiles, NoBody),
            F::VectorStore,
            id,
        )?,
        ["vector_stores", id, "files"] if post => on(
            resource(Op::CreateVectorStoreFile, Json),
            F::VectorStore,
            id,
        )?,
        ["vector_stores", id, "files", f] if get => on_with(
            resource(Op::GetVectorStoreFile, NoBody),
            F::VectorStore,
            id,
            f,
        )?,
        ["vector_stores", id, "files", f] if post => on_with(
            resource(Op::UpdateVectorStoreFileAttributes, Json),
            F::VectorStore,
            id,
            f,
        )?,
        ["vector_stores", id, "files", f, "content"] if get => on_with(
            resource(Op::RetrieveVectorStoreFileContent, NoBody),
            F::VectorStore,
            id,
            f,
        )?,
        ["vector_stores", id, "files", f] if delete => on_with(
            resource(Op::DeleteVectorStoreFile, NoBody),
            F::VectorStore,
            id,
            f,
        )?,
        ["vector_stores", id, "file_batches"] if post => on(
            resource(Op::CreateVectorStoreFileBatch, Json),
            F::VectorStore,
            id,
        )?,
        ["vector_stores", id, "file_batches", b] if get => on_with(
            resource(Op::GetVectorStoreFileBatch, NoBody),
            F::VectorStore,
            id,
            b,
        )?,
        ["vector_stores", id, "file_batches", b, "cancel"] if post => on_with(
            resource(Op::CancelVectorStoreFileBatch, Json),
            F::VectorStore,
            id,
            b,
        )?,
        ["vector_stores", id, "file_batches", b, "files"] if get => on_with(
            resource(Op::ListVectorStoreFileBatchFiles, NoBody),
            F::VectorStore,
            id,
            b,
        )?,

        ["conversations"] if post => {
            creating(resource(Op::CreateConversation, Json), F::Conversation)
        }
        ["conversations", id] if get => {
            on(resource(Op::GetConversation, NoBody), F::Conversation, id)?
        }
        ["conversations", id] if post => {
            on(resource(Op::UpdateConversation, Json), F::Conversation, id)?
        }
        ["conversations", id] if delete => on(
            resource(Op::DeleteConversation, NoBody),
            F::Conversation,
            id,
        )?,
        ["conversations", id, "items"] if get => on(
            resource(Op::ListConversationItems, NoBody),
            F::Conversation,
            id,
        )?,
        ["conversations", id, "items"] if post => on(
            resource(Op::CreateConversationItems, Json),
            F::Conversation,
            id,
        )?,
        ["conversations", id, "items", item] if get => on_with(
            resource(Op::GetConversationItem, NoBody),
            F::Conversation,
            id,
            item,
        )?,
        ["conversations", id, "items", item] if delete => on_with(
            resource(Op::DeleteConversationItem, NoBody),
            F::Conversation,
            id,
            item,
        )?,

        ["evals"] if get => resource(Op::ListEvals, NoBody),
        ["evals"] if post => creating(resource(Op::CreateEval, Json), F::Eval),
        ["evals", id] if get => on(resource(Op::GetEval, NoBody), F::Eval, id)?,
        ["evals", id] if post => on(resource(Op::UpdateEval, Json), F::Eval, id)?,
        ["evals", id] if delete => on(resource(Op::DeleteEval, NoBody), F::Eval, id)?,
        ["evals", id, "runs"] if get => on(resource(Op::GetEvalRuns, NoBody), F::Eval, id)?,
        ["evals", id, "runs"] if post => on(resource(Op::CreateEvalRun, Json), F::Eval, id)?,
        ["evals", id, "runs", run] if get => {
            on_with(resource(Op::GetEvalRun, NoBody), F::Eval, id, run)?
        }
        ["evals", id, "runs", run] if post => {
            on_with(resource(Op::CancelEvalRun, Json), F::Eval, id, run)?
        }
        ["evals", id, "runs", run] if delete => {
            on_with(resource(Op::DeleteEvalRun, NoBody), F::Eval, id, run)?
        }
        ["evals", id, "runs", run, "output_items"] if get => on_with(
            resource(Op::GetEvalRunOutputItems, NoBody),
            F::Eval,
            id,
            run,
        )?,
        ["evals", id, "runs", run, "output_items", item] if get => {
            valid_id(item)?;
            on_with(resource(Op::GetEvalRunOutputItem, NoBody), F::Eval, id, run)?
        }

        ["containers"] if get => resource(Op::ListContainers, NoBody),
        ["containers"] if post => creating(resource(Op::CreateContainer, Json), F::Container),
        ["containers", id] if get => on(resource(Op::RetrieveContainer, NoBody), F::Container, id)?,
        ["containers", id] if delete => {
            on(resource(Op::DeleteContainer, NoBody), F::Container, id)?
        }
        ["containers", id, "files"] if get => {
            on(resource(Op::ListContainerFiles, NoBody), F::Container, id)?
        }
        ["containers", id, "files"] if post => {
            on(resource(Op::CreateContainerFile, Json), F::Container, id)?
        }
        ["containers", id, "files", f] if get => on_with(
            resource(Op::RetrieveContainerFile, NoBody),
            F::Container,
            id,
            f,
        )?,
        ["containers", id, "files", f] if delete => on_with(
            resource(Op::DeleteContainerFile, NoBody),
            F::Container,
            id,
            f,
        )?,
        ["containers", id, "files", f, "content"] if get => on_with(
            resource(Op::RetrieveContainerFileContent, NoBody),
            F::Container,
            id,
            f,
        )?,
        // Ephemeral client secrets (and the sessions and WebRTC calls they open) would let a
        // browser reach the member directly, past the access rules, the limits and the record.
        ["realtime", ..] | ["realtimeapi", ..] => {
            return Err(GatewayError::NotServed(REALTIME_SIDE_CHANNELS));
        }
        ["videos", ..] | ["video", ..] => return Err(GatewayError::NotServed(VIDEOS)),
        _ => return Err(GatewayError::UnknownRoute),
    };
    Ok(route)
}

/// Why the Realtime API's client secrets, sessions and WebRTC calls are not served.
const REALTIME_SIDE_CHANNELS: &str = "Realtime client secrets, sessions and WebRTC calls are not \
    served through this gateway: an ephemeral key would let a browser reach Azure OpenAI directly, \
    past the gateway's access rules, limits and audit record. Open the Realtime API over its \
    WebSocket through the gateway instead (wss://…/openai/v1/realtime?model=…).";

/// Why video generation is not served.
const VIDEOS: &str = "Video generation (Sora) is not routed through this gateway.";

fn on_with(
    route: Route,
    family: ObjectFamily,
    id: &str,
    child: &str,
) -> Result<Route, GatewayError> {
    valid_id(child)?;
    on(route, family, id)
}

/// A deployment or model name: letters, digits, `.`, `_`, `-`, at most 64, not only dots.
pub(crate) fn valid_name(name: &str) -> Result<String, GatewayError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        && !name.bytes().all(|b| b == b'.');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(GatewayError::BadRequest {
            message: "The deployment name is not valid: use letters, digits, '.', '_', '-' and ':' (at most 64 characters).".to_owned(),
            param: Some("model"),
        })
    }
}

/// An object id in a path: the same alphabet as names, at most 128 characters.
pub(crate) fn valid_id(id: &str) -> Result<String, GatewayError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        && !id.bytes().all(|b| b == b'.');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(GatewayError::BadRequest {
            message: "The object id in the path is not valid.".to_owned(),
            param: None,
        })
    }
}

/// The first value of a query parameter (percent-decoded).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Checks a body against the operation's kind; a JSON body is read for what the hot path needs
/// (and, only when that fast read declines it, parsed whole — the tree is returned then, so that
/// an invalid body gets the parser's own message).
#[allow(clippy::type_complexity)]
fn parse_body(
    kind: BodyKind,
    content_type: &str,
    body: &Bytes,
) -> Result<(Option<RequestPeek>, Option<serde_json::Value>), GatewayError> {
    // Media types are case-insensitive (RFC 9110, section 8.3.1).
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    let is = |name: &str| media_type.eq_ignore_ascii_case(name);
    match kind {
        BodyKind::Json if !body.is_empty() => {
            let suffix = media_type
                .len()
                .checked_sub(5)
                .map(|at| &media_type.as_bytes()[at..]);
            if !(is("application/json")
                || suffix.is_some_and(|suffix| suffix.eq_ignore_ascii_case(b"+json"))
                || media_type.is_empty())
            {
                return Err(unsupported(format!(
                    "This operation takes a JSON body; the request's Content-Type is `{media_type}`."
                )));
            }
            let duplicate = |member: &'static str| GatewayError::BadRequest {
                message: format!(
                    "The request body gives `{member}` more than once: send it once (servers \
                     differ in which one they take)."
                ),
                param: Some(member),
            };
            if let Some(peek) = RequestPeek::read(body) {
                if let Some(member) = peek.duplicate {
                    return Err(duplicate(member));
                }
                return Ok((Some(peek), None));
            }
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|error| GatewayError::BadRequest {
                    message: format!("The request body is not valid JSON: {error}."),
                    param: None,
                })?;
            if !value.is_object() {
                return Err(GatewayError::BadRequest {
                    message: "The request body must be a JSON object.".to_owned(),
                    param: None,
                });
            }
            if let Some(member) = RequestPeek::duplicate_in(body) {
                return Err(duplicate(member));
            }
            // Valid, but declined by the fast read: read the same fields from the tree.
            let peek = RequestPeek::of_tree(&value);
            Ok((Some(peek), Some(value)))
        }
        BodyKind::Multipart if !is("multipart/form-data") => Err(unsupported(format!(
            "This operation takes a multipart/form-data body; the request's Content-Type is `{media_type}`."
        ))),
        _ => Ok((None, None)),
    }
}

/// Whether a Content-Type names a form (`multipart/form-data`, in any case).
fn is_multipart(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
}

fn unsupported(message: String) -> GatewayError {
    GatewayError::UnsupportedMediaType { message }
}

/// The text fields of a buffered multipart body the gateway reads for its judgement.
#[derive(Debug, Default)]
struct FormFields {
    /// The `model` field: the deployment a v1 or OpenAI-style form names.
    model: Option<String>,
    /// The `stream` field: `true` when the client asks for the answer as events (a transcription).
    stream: Option<String>,
    /// The `prompt` field: an image edit's instruction, a transcription's hint (the record's
    /// `RequestMessages`).
    prompt: Option<String>,
    /// The position of the `model` field among the form's parts (counting every part).
    model_part: Option<usize>,
}

impl FormFields {
    /// Whether the form asks for a streamed answer, as the SDKs spell it (`stream=true`).
    fn asks_for_a_stream(&self) -> bool {
        self.stream
            .as_deref()
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"))
    }
}

/// Reads the text fields the gateway judges a form by ([`FormFields`]) in one pass over a
/// buffered multipart body, without copying file parts. A form that carries one of them twice is
/// refused: the gateway would judge the call by one of them and the member might run the other
/// (servers differ in which one they take). So is a form the gateway cannot read whole, and a part
/// that names itself in a way the reader does not see (`NAME="model"`, `name*=…`: parameter names
/// ignore case, and a backend may read them) — what the gateway cannot read, it cannot judge.
fn form_fields(content_type: &str, body: &Bytes) -> Result<FormFields, GatewayError> {
    let unreadable = |problem: String| GatewayError::BadRequest {
        message: format!("The multipart form cannot be read: {problem}."),
        param: None,
    };
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| unreadable("its Content-Type names no boundary".to_owned()))?;
    let stream = futures::stream::once(futures::future::ready(Ok::<Bytes, std::io::Error>(
        body.clone(),
    )));
    let delimiter = format!("--{boundary}").into_bytes();
    let starts: Vec<usize> = delimiter_starts(body, &delimiter)
        .take(MAX_FORM_PARTS + 2)
        .collect();
    // The form reader takes the first delimiter wherever it is; the gateway's own reading (and
    // the member's) only at the start of the body or of a line.
    if memchr::memmem::find(body, &delimiter) != starts.first().copied() {
        return Err(unreadable(
            "its first boundary delimiter does not start the body or a line".to_owned(),
        ));
    }
    // A part's data ends where the next part's delimiter starts, the last where the closing one
    // does: n parts have n + 1 delimiters.
    if starts.len() > MAX_FORM_PARTS + 1 {
        return Err(unreadable(format!(
            "it has more than {MAX_FORM_PARTS} parts"
        )));
    }
    // The reader keeps one of a part's repeated headers; a backend may take another.
    if part_heads(body, &starts, delimiter.len()).any(|head| {
        head.split(|&b| b == b'\n')
            .filter(|line| {
                line.len() >= 20 && line[..20].eq_ignore_ascii_case(b"content-disposition:")
            })
            .count()
            > 1
    }) {
        return Err(unreadable(
            "a part has more than one Content-Disposition header".to_owned(),
        ));
    }
    let mut multipart = multer::Multipart::new(stream, boundary);
    // The whole body is already in memory, so every poll below is ready at once.
    futures::executor::block_on(async {
        let mut fields = FormFields::default();
        for part in 0.. {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(error) => return Err(unreadable(error.to_string())),
            };
            if let Some(disposition) = field.headers().get(http::header::CONTENT_DISPOSITION) {
                // The reader takes the first `name=` it finds in the header's bytes, quoted or
                // not; a backend parses the parameters. Both must see one and the same name.
                let ambiguous = || {
                    unreadable(
                        "a part's Content-Disposition names it more than once or ambiguously (one `name` parameter, outside any quoted value)".to_owned(),
                    )
                };
                match disposition_name(disposition.as_bytes()) {
                    Err(NameProblem::Spelling) => {
                        return Err(unreadable(
                            "a part's Content-Disposition spells its `name` parameter other than `name=` in lower case".to_owned(),
                        ));
                    }
                    Err(NameProblem::Repeated) => return Err(ambiguous()),
                    Ok(name) if name.as_deref() != field.name() => return Err(ambiguous()),
                    Ok(_) => {}
                }
            } else {
                return Err(unreadable(
                    "a part has no Content-Disposition header".to_owned(),
                ));
            }
            let (name, slot) = match field.name() {
                Some("model") => ("model", &mut fields.model),
                Some("stream") => ("stream", &mut fields.stream),
                Some("prompt") => ("prompt", &mut fields.prompt),
                _ => continue,
            };
            if slot.is_some() {
                return Err(GatewayError::BadRequest {
                    message: format!("The form has more than one `{name}` field: send it once."),
                    param: Some(name),
                });
            }
            if name == "model" {
                fields.model_part = Some(part);
            }
            *slot = Some(
                field
                    .text()
                    .await
                    .map_err(|error| unreadable(error.to_string()))?,
            );
        }
        Ok(fields)
    })
}

/// The most parts a multipart form may have (an upload, a transcription or an image edit has a
/// handful): past it the form is refused before it is read further.
const MAX_FORM_PARTS: usize = 1_000;

/// Where each delimiter line (`delimiter` is `--` and the boundary) of a multipart `body`
/// starts: at the body's start or after a CRLF. A part's data ends at the next one, as the form
/// reader ends it.
pub(crate) fn delimiter_starts<'a>(
    body: &'a [u8],
    delimiter: &'a [u8],
) -> impl Iterator<Item = usize> + 'a {
    memchr::memmem::find_iter(body, delimiter)
        .filter(move |&at| at == 0 || body[..at].ends_with(b"\r\n"))
}

/// The head (header lines) of each part of a multipart `body`, whose delimiter lines (of
/// `length` bytes) start at `starts`: from after a delimiter line to the blank line, looked for
/// only up to the next delimiter (a head does not run past it), so that reading every head
/// reads the body once.
fn part_heads<'a>(
    body: &'a [u8],
    starts: &'a [usize],
    length: usize,
) -> impl Iterator<Item = &'a [u8]> {
    starts.iter().enumerate().filter_map(move |(index, &at)| {
        let end = starts.get(index + 1).copied().unwrap_or(body.len());
        let part = body.get(at + length..end)?;
        let blank = memchr::memmem::find(part, b"\r\n\r\n")?;
        Some(&part[..blank])
    })
}

/// Why a part's `Content-Disposition` does not name it plainly.
#[derive(Debug, PartialEq)]
enum NameProblem {
    /// A `name` parameter spelled other than `name=` (another case, or the extended `name*=`),
    /// which the form reader does not take for the name.
    Spelling,
    /// More than one `name` parameter.
    Repeated,
}

/// The `name` parameter of a part's `Content-Disposition`, its parameters read as RFC 7578 and
/// RFC 6266 write them (split at `;` outside quoted strings, a quoted value unescaped): `None`
/// without one.
fn disposition_name(disposition: &[u8]) -> Result<Option<String>, NameProblem> {
    let text = String::from_utf8_lossy(disposition);
    let mut pieces = Vec::new();
    let (mut start, mut in_quotes, mut escaped) = (0, false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            ';' if !in_quotes => {
                pieces.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    pieces.push(&text[start..]);
    // The first piece is the disposition type (`form-data`).
    let parameters: Vec<(&str, &str)> = pieces
        .iter()
        .skip(1)
        .filter_map(|piece| piece.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    if parameters.iter().any(|(key, _)| {
        let lower = key.to_ascii_lowercase();
        (lower == "name" && *key != "name") || lower.starts_with("name*")
    }) {
        return Err(NameProblem::Spelling);
    }
    let mut names = parameters.iter().filter(|(key, _)| *key == "name");
    let Some((_, value)) = names.next() else {
        return Ok(None);
    };
    if names.next().is_some() {
        return Err(NameProblem::Repeated);
    }
    let name = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(quoted) => {
            let mut unquoted = String::with_capacity(quoted.len());
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                unquoted.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            unquoted
        }
        None => (*value).to_owned(),
    };
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers
    }

    fn form_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=b".parse().unwrap(),
        );
        headers
    }

    /// A form with a `model` field.
    fn form_body() -> Bytes {
        Bytes::from_static(
            b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndall-e-2\r\n\
              --b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
              Content-Type: image/png\r\n\r\nPNG\r\n--b--\r\n",
        )
    }

    /// Routes the README once listed as unrouted, in each style that has them: their operation,
    /// the object they address and the one they create.
    #[test]
    fn stored_completions_uploads_containers_and_the_rest_are_classified() {
        use ObjectFamily as F;
        use OperationId as Op;
        let json = Bytes::from_static(b"{\"metadata\": {\"k\": \"v\"}}");
        let none = Bytes::new();
        // (method, path after the style prefix, body, operation, addressed object, created family)
        type Case<'a> = (
            Method,
            &'a str,
            &'a Bytes,
            Op,
            Option<(F, &'a str)>,
            Option<F>,
        );
        let cases: Vec<Case> = vec![
            (
                Method::GET,
                "chat/completions",
                &none,
                Op::ListChatCompletions,
                None,
                None,
            ),
            (
                Method::GET,
                "chat/completions/chatcmpl-1",
                &none,
                Op::GetChatCompletion,
                Some((F::ChatCompletion, "chatcmpl-1")),
                None,
            ),
            (
                Method::POST,
                "chat/completions/chatcmpl-1",
                &json,
                Op::UpdateChatCompletion,
                Some((F::ChatCompletion, "chatcmpl-1")),
                None,
            ),
            (
                Method::DELETE,
                "chat/completions/chatcmpl-1",
                &none,
                Op::DeleteChatCompletion,
                Some((F::ChatCompletion, "chatcmpl-1")),
                None,
            ),
            (
                Method::GET,
                "chat/completions/chatcmpl-1/messages",
                &none,
                Op::GetChatCompletionMessages,
                Some((F::ChatCompletion, "chatcmpl-1")),
                None,
            ),
            (
                Method::POST,
                "uploads",
                &json,
                Op::CreateUpload,
                None,
                Some(F::Upload),
            ),
            (
                Method::POST,
                "uploads/upload_1/complete",
                &json,
                Op::CompleteUpload,
                Some((F::Upload, "upload_1")),
                None,
            ),
            (
                Method::POST,
                "uploads/upload_1/cancel",
                &none,
                Op::CancelUpload,
                Some((F::Upload, "upload_1")),
                None,
            ),
            (
                Method::POST,
                "vector_stores/vs_1/files/file-1",
                &json,
                Op::UpdateVectorStoreFileAttributes,
                Some((F::VectorStore, "vs_1")),
                None,
            ),
            (
                Method::GET,
                "vector_stores/vs_1/files/file-1/content",
                &none,
                Op::RetrieveVectorStoreFileContent,
                Some((F::VectorStore, "vs_1")),
                None,
            ),
            (
                Method::GET,
                "containers",
                &none,
                Op::ListContainers,
                None,
                None,
            ),
            (
                Method::POST,
                "containers",
                &json,
                Op::CreateContainer,
                None,
                Some(F::Container),
            ),
            (
                Method::GET,
                "containers/cntr_1",
                &none,
                Op::RetrieveContainer,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (
                Method::DELETE,
                "containers/cntr_1",
                &none,
                Op::DeleteContainer,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (
                Method::GET,
                "containers/cntr_1/files",
                &none,
                Op::ListContainerFiles,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (
                Method::POST,
                "containers/cntr_1/files",
                &json,
                Op::CreateContainerFile,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (
                Method::GET,
                "containers/cntr_1/files/cfile_1",
                &none,
                Op::RetrieveContainerFile,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (
                Method::DELETE,
                "containers/cntr_1/files/cfile_1",
                &none,
                Op::DeleteContainerFile,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (
                Method::GET,
                "containers/cntr_1/files/cfile_1/content",
                &none,
                Op::RetrieveContainerFileContent,
                Some((F::Container, "cntr_1")),
                None,
            ),
            (Method::GET, "evals", &none, Op::ListEvals, None, None),
            (
                Method::POST,
                "evals",
                &json,
                Op::CreateEval,
                None,
                Some(F::Eval),
            ),
            (
                Method::GET,
                "evals/eval_1",
                &none,
                Op::GetEval,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::POST,
                "evals/eval_1",
                &json,
                Op::UpdateEval,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::DELETE,
                "evals/eval_1",
                &none,
                Op::DeleteEval,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::GET,
                "evals/eval_1/runs",
                &none,
                Op::GetEvalRuns,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::POST,
                "evals/eval_1/runs",
                &json,
                Op::CreateEvalRun,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::GET,
                "evals/eval_1/runs/evalrun_1",
                &none,
                Op::GetEvalRun,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::POST,
                "evals/eval_1/runs/evalrun_1",
                &json,
                Op::CancelEvalRun,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::DELETE,
                "evals/eval_1/runs/evalrun_1",
                &none,
                Op::DeleteEvalRun,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::GET,
                "evals/eval_1/runs/evalrun_1/output_items",
                &none,
                Op::GetEvalRunOutputItems,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::GET,
                "evals/eval_1/runs/evalrun_1/output_items/outputitem_1",
                &none,
                Op::GetEvalRunOutputItem,
                Some((F::Eval, "eval_1")),
                None,
            ),
            (
                Method::POST,
                "conversations",
                &json,
                Op::CreateConversation,
                None,
                Some(F::Conversation),
            ),
            (
                Method::GET,
                "conversations/conv_1",
                &none,
                Op::GetConversation,
                Some((F::Conversation, "conv_1")),
                None,
            ),
            (
                Method::POST,
                "conversations/conv_1",
                &json,
                Op::UpdateConversation,
                Some((F::Conversation, "conv_1")),
                None,
            ),
            (
                Method::DELETE,
                "conversations/conv_1",
                &none,
                Op::DeleteConversation,
                Some((F::Conversation, "conv_1")),
                None,
            ),
            (
                Method::GET,
                "conversations/conv_1/items",
                &none,
                Op::ListConversationItems,
                Some((F::Conversation, "conv_1")),
                None,
            ),
            (
                Method::POST,
                "conversations/conv_1/items",
                &json,
                Op::CreateConversationItems,
                Some((F::Conversation, "conv_1")),
                None,
            ),
            (
                Method::GET,
                "conversations/conv_1/items/msg_1",
                &none,
                Op::GetConversationItem,
                Some((F::Conversation, "conv_1")),
                None,
            ),
            (
                Method::DELETE,
                "conversations/conv_1/items/msg_1",
                &none,
                Op::DeleteConversationItem,
                Some((F::Conversation, "conv_1")),
                None,
            ),
        ];
        for prefix in ["/openai/", "/openai/v1/", "/v1/"] {
            for (method, rest, body, operation, object, creates) in &cases {
                let path = format!("{prefix}{rest}");
                let headers = if body.is_empty() {
                    HeaderMap::new()
                } else {
                    json_headers()
                };
                let call = classify(
                    method,
                    &path,
                    Some("api-version=2025-04-01-preview"),
                    &headers,
                    body,
                )
                .unwrap_or_else(|error| panic!("{method} {path}: {error:?}"));
                assert_eq!(call.operation, *operation, "{method} {path}");
                assert_eq!(
                    call.object,
                    object.map(|(family, id)| (family, id.to_owned())),
                    "{method} {path}"
                );
                assert_eq!(call.creates, *creates, "{method} {path}");
                assert_eq!(call.deployment, None, "{method} {path}");
            }
            // None of them is a deployment route.
            let path = "/openai/deployments/gpt-4o/chat/completions/chatcmpl-1";
            assert!(matches!(
                classify(&Method::GET, path, None, &HeaderMap::new(), &none),
                Err(GatewayError::UnknownRoute)
            ));
        }
    }

    #[test]
    fn an_upload_part_and_a_container_file_may_be_forms() {
        let part = classify(
            &Method::POST,
            "/openai/uploads/upload_1/parts",
            Some("api-version=2025-04-01-preview"),
            &form_headers(),
            &form_body(),
        )
        .unwrap();
        assert_eq!(part.operation, OperationId::AddUploadPart);
        assert_eq!(part.body_kind, BodyKind::Multipart);
        // A part must be a form.
        assert!(matches!(
            classify(
                &Method::POST,
                "/openai/uploads/upload_1/parts",
                None,
                &json_headers(),
                &Bytes::from_static(b"{}"),
            ),
            Err(GatewayError::UnsupportedMediaType { .. })
        ));
        // A container file is a form or JSON naming a file.
        let form = classify(
            &Method::POST,
            "/v1/containers/cntr_1/files",
            None,
            &form_headers(),
            &form_body(),
        )
        .unwrap();
        assert_eq!(form.body_kind, BodyKind::Multipart);
        let named = classify(
            &Method::POST,
            "/v1/containers/cntr_1/files",
            None,
            &json_headers(),
            &Bytes::from_static(b"{\"file_id\": \"file-1\"}"),
        )
        .unwrap();
        assert_eq!(named.body_kind, BodyKind::Json);
    }

    #[test]
    fn an_image_variation_names_its_model_in_the_form() {
        let call = classify(
            &Method::POST,
            "/v1/images/variations",
            None,
            &form_headers(),
            &form_body(),
        )
        .unwrap();
        assert_eq!(call.operation, OperationId::ImageVariationsCreate);
        assert_eq!(call.deployment.as_deref(), Some("dall-e-2"));
        assert!(call.operation.is_inference());
    }

    #[test]
    fn only_a_chat_completion_asked_to_be_stored_creates_an_object() {
        let chat = |body: &'static [u8]| {
            classify(
                &Method::POST,
                "/openai/v1/chat/completions",
                None,
                &json_headers(),
                &Bytes::from_static(body),
            )
        };
        let stored = chat(b"{\"model\": \"gpt-4o\", \"store\": true, \"messages\": []}").unwrap();
        assert_eq!(stored.creates, Some(ObjectFamily::ChatCompletion));
        for body in [
            &b"{\"model\": \"gpt-4o\", \"messages\": []}"[..],
            b"{\"model\": \"gpt-4o\", \"store\": false, \"messages\": []}",
            b"{\"model\": \"gpt-4o\", \"store\": \"yes\", \"messages\": []}",
        ] {
            assert_eq!(
                chat(body).unwrap().creates,
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Given twice, a backend could read the other one: refused.
        let twice = chat(b"{\"model\": \"gpt-4o\", \"store\": false, \"store\": true}");
        assert!(
            matches!(
                &twice,
                Err(GatewayError::BadRequest {
                    param: Some("store"),
                    ..
                })
            ),
            "{twice:?}"
        );
        // A name written with escapes is the name a backend reads.
        let escaped =
            chat(b"{\"model\": \"gpt-4o\", \"st\\u006fre\": true, \"messages\": []}").unwrap();
        assert_eq!(escaped.creates, Some(ObjectFamily::ChatCompletion));
    }
}
