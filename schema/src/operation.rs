//! Operation ids: what a call does, independent of the route style it came in on.
//!
//! The values are the `operationId`s of the Azure OpenAI OpenAPI specs, lower-cased, so that both
//! the published KQL (`OperationId == 'completions_create'`) and its later version
//! (`tolower(OperationId) in (...)`) match (see `azure-specs.md` §2.8). Inference ids come from the
//! inference spec (2023-05-15 / 2025-03-01-preview); files, batches, fine-tuning and models from the
//! authoring spec (2024-10-21); assistants, threads, responses and vector stores from the
//! 2025-03-01-preview spec that Microsoft's AI-Gateway labs import; containers from the labs' v1
//! spec (`AIFoundryOpenAIV1.json`). Stored chat completions, image variations and uploads are in
//! neither Azure spec: their ids are those of the OpenAI spec the labs import for OpenAI
//! backends (`LLMOpenAI.json`), lower-cased likewise, and so are conversations' (Azure documents
//! them in its v1 REST reference, "Conversations", `{endpoint}/openai/v1/conversations`, with
//! OpenAI's paths) and evals' (Azure OpenAI's evaluation API, `{endpoint}/openai/evals` from
//! api-version 2025-04-01-preview and on v1, with OpenAI's paths).

use serde::{Deserialize, Serialize};

macro_rules! operations {
    ($( $(#[$doc:meta])* $variant:ident => $id:literal ),* $(,)?) => {
        /// The operation a request performs, named by its lower-cased Azure spec id.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum OperationId {
            $( $(#[$doc])* #[serde(rename = $id)] $variant, )*
        }

        impl OperationId {
            /// Every operation id, in declaration order.
            pub const ALL: &'static [OperationId] = &[$(OperationId::$variant),*];

            /// The lower-cased Azure spec id, as it appears in `ApiManagementGatewayLogs.OperationId`.
            pub const fn as_str(self) -> &'static str {
                match self { $(OperationId::$variant => $id,)* }
            }

            /// Parses a lower-cased spec id (case-insensitively).
            pub fn parse(id: &str) -> Option<Self> {
                let id = id.to_ascii_lowercase();
                match id.as_str() { $($id => Some(OperationId::$variant),)* _ => None }
            }
        }
    };
}

operations! {
    /// Chat completions.
    ChatCompletionsCreate => "chatcompletions_create",
    /// Legacy completions.
    CompletionsCreate => "completions_create",
    /// Embeddings.
    EmbeddingsCreate => "embeddings_create",
    /// Image generation.
    ImageGenerationsCreate => "imagegenerations_create",
    /// Image edits.
    ImageEditsCreate => "imageedits_create",
    /// Image variations (multipart; OpenAI's `createImageVariation`).
    ImageVariationsCreate => "createimagevariation",
    /// Audio transcription (multipart).
    TranscriptionsCreate => "transcriptions_create",
    /// Audio translation (multipart).
    TranslationsCreate => "translations_create",
    /// Text to speech (binary response).
    SpeechCreate => "speech_create",
    /// A Realtime API session over a WebSocket. API Management's WebSocket APIs have one
    /// operation, `onHandshake`, under which it logs the connection.
    RealtimeSession => "onhandshake",
    /// Stored chat completions: list (OpenAI's `listChatCompletions`).
    ListChatCompletions => "listchatcompletions",
    /// Stored chat completions: get one.
    GetChatCompletion => "getchatcompletion",
    /// Stored chat completions: change the metadata of one.
    UpdateChatCompletion => "updatechatcompletion",
    /// Stored chat completions: delete one.
    DeleteChatCompletion => "deletechatcompletion",
    /// Stored chat completions: the messages of one.
    GetChatCompletionMessages => "getchatcompletionmessages",
    /// Responses API: create.
    CreateResponse => "create_response",
    /// Responses API: get.
    GetResponse => "get_response",
    /// Responses API: delete.
    DeleteResponse => "delete_response",
    /// Responses API: cancel a background response.
    CancelResponse => "cancel_response",
    /// Responses API: input items of a stored response.
    GetInputItems => "get_input_items",
    /// Files: list.
    FilesList => "files_list",
    /// Files: upload (multipart).
    FilesUpload => "files_upload",
    /// Files: import from a URL.
    FilesImport => "files_import",
    /// Files: get metadata.
    FilesGet => "files_get",
    /// Files: delete.
    FilesDelete => "files_delete",
    /// Files: download content.
    FilesGetContent => "files_getcontent",
    /// Uploads: begin a file upload in parts (OpenAI's `createUpload`).
    CreateUpload => "createupload",
    /// Uploads: add a part (multipart).
    AddUploadPart => "adduploadpart",
    /// Uploads: complete, making the file.
    CompleteUpload => "completeupload",
    /// Uploads: cancel.
    CancelUpload => "cancelupload",
    /// Batches: create.
    BatchCreate => "batch_create",
    /// Batches: list.
    BatchList => "batch_list",
    /// Batches: get.
    BatchGet => "batch_get",
    /// Batches: cancel.
    BatchCancel => "batch_cancel",
    /// Fine-tuning: create a job.
    FineTuningCreate => "finetuning_create",
    /// Fine-tuning: list jobs.
    FineTuningList => "finetuning_list",
    /// Fine-tuning: get a job.
    FineTuningGet => "finetuning_get",
    /// Fine-tuning: cancel a job.
    FineTuningCancel => "finetuning_cancel",
    /// Fine-tuning: pause a job.
    FineTuningPause => "finetuning_pause",
    /// Fine-tuning: resume a job.
    FineTuningResume => "finetuning_resume",
    /// Fine-tuning: events of a job.
    FineTuningGetEvents => "finetuning_getevents",
    /// Fine-tuning: checkpoints of a job.
    FineTuningGetCheckpoints => "finetuning_getcheckpoints",
    /// Models: list.
    ModelsList => "models_list",
    /// Models: get one.
    ModelsGet => "models_get",
    /// Assistants: create.
    CreateAssistant => "create_assistant",
    /// Assistants: list.
    ListAssistants => "list_assistants",
    /// Assistants: get.
    GetAssistant => "get_assistant",
    /// Assistants: modify.
    ModifyAssistant => "modify_assistant",
    /// Assistants: delete.
    DeleteAssistant => "delete_assistant",
    /// Threads: create.
    CreateThread => "create_thread",
    /// Threads: create and run in one call.
    CreateThreadAndRun => "create_thread_and_run",
    /// Threads: get.
    GetThread => "get_thread",
    /// Threads: modify.
    ModifyThread => "modify_thread",
    /// Threads: delete.
    DeleteThread => "delete_thread",
    /// Messages: create.
    CreateMessage => "create_message",
    /// Messages: list.
    ListMessages => "list_messages",
    /// Messages: get.
    GetMessage => "get_message",
    /// Messages: modify.
    ModifyMessage => "modify_message",
    /// Messages: delete.
    DeleteMessage => "delete_message",
    /// Runs: create.
    CreateRun => "create_run",
    /// Runs: list.
    ListRuns => "list_runs",
    /// Runs: get.
    GetRun => "get_run",
    /// Runs: modify.
    ModifyRun => "modify_run",
    /// Runs: submit tool outputs.
    SubmitToolOutputsToRun => "submit_tool_outputs_to_run",
    /// Runs: cancel.
    CancelRun => "cancel_run",
    /// Run steps: list.
    ListRunSteps => "list_run_steps",
    /// Run steps: get.
    GetRunStep => "get_run_step",
    /// Vector stores: create.
    CreateVectorStore => "create_vector_store",
    /// Vector stores: list.
    ListVectorStores => "list_vector_stores",
    /// Vector stores: get.
    GetVectorStore => "get_vector_store",
    /// Vector stores: modify.
    ModifyVectorStore => "modify_vector_store",
    /// Vector stores: delete.
    DeleteVectorStore => "delete_vector_store",
    /// Vector stores: search.
    SearchVectorStore => "search_vector_store",
    /// Vector store files: create.
    CreateVectorStoreFile => "create_vector_store_file",
    /// Vector store files: list.
    ListVectorStoreFiles => "list_vector_store_files",
    /// Vector store files: get.
    GetVectorStoreFile => "get_vector_store_file",
    /// Vector store files: delete.
    DeleteVectorStoreFile => "delete_vector_store_file",
    /// Vector store files: change a file's attributes.
    UpdateVectorStoreFileAttributes => "update_vector_store_file_attributes",
    /// Vector store files: the parsed content of a file.
    RetrieveVectorStoreFileContent => "retrieve_vector_store_file_content",
    /// Vector store file batches: create.
    CreateVectorStoreFileBatch => "create_vector_store_file_batch",
    /// Vector store file batches: get.
    GetVectorStoreFileBatch => "get_vector_store_file_batch",
    /// Vector store file batches: cancel.
    CancelVectorStoreFileBatch => "cancel_vector_store_file_batch",
    /// Vector store file batches: list files.
    ListVectorStoreFileBatchFiles => "list_vector_store_file_batch_files",
    /// Conversations (the Responses API's stored conversations): create.
    CreateConversation => "createconversation",
    /// Conversations: get.
    GetConversation => "getconversation",
    /// Conversations: update (metadata).
    UpdateConversation => "updateconversation",
    /// Conversations: delete.
    DeleteConversation => "deleteconversation",
    /// Conversation items: list.
    ListConversationItems => "listconversationitems",
    /// Conversation items: add.
    CreateConversationItems => "createconversationitems",
    /// Conversation items: get.
    GetConversationItem => "getconversationitem",
    /// Conversation items: delete.
    DeleteConversationItem => "deleteconversationitem",
    /// Evals: list.
    ListEvals => "listevals",
    /// Evals: create.
    CreateEval => "createeval",
    /// Evals: get.
    GetEval => "geteval",
    /// Evals: update (name, metadata).
    UpdateEval => "updateeval",
    /// Evals: delete.
    DeleteEval => "deleteeval",
    /// Eval runs: list.
    GetEvalRuns => "getevalruns",
    /// Eval runs: create (the run calls the member's models).
    CreateEvalRun => "createevalrun",
    /// Eval runs: get.
    GetEvalRun => "getevalrun",
    /// Eval runs: cancel.
    CancelEvalRun => "cancelevalrun",
    /// Eval runs: delete.
    DeleteEvalRun => "deleteevalrun",
    /// Eval run output items: list.
    GetEvalRunOutputItems => "getevalrunoutputitems",
    /// Eval run output items: get.
    GetEvalRunOutputItem => "getevalrunoutputitem",
    /// Containers (the code interpreter's sandboxes): list.
    ListContainers => "listcontainers",
    /// Containers: create.
    CreateContainer => "createcontainer",
    /// Containers: get.
    RetrieveContainer => "retrievecontainer",
    /// Containers: delete.
    DeleteContainer => "deletecontainer",
    /// Container files: create (multipart upload, or JSON naming an uploaded file).
    CreateContainerFile => "createcontainerfile",
    /// Container files: list.
    ListContainerFiles => "listcontainerfiles",
    /// Container files: get.
    RetrieveContainerFile => "retrievecontainerfile",
    /// Container files: delete.
    DeleteContainerFile => "deletecontainerfile",
    /// Container files: download content.
    RetrieveContainerFileContent => "retrievecontainerfilecontent",
}

impl OperationId {
    /// Whether the call's response carries model output whose tokens count against limits.
    pub const fn is_inference(self) -> bool {
        matches!(
            self,
            OperationId::ChatCompletionsCreate
                | OperationId::CompletionsCreate
                | OperationId::EmbeddingsCreate
                | OperationId::ImageGenerationsCreate
                | OperationId::ImageEditsCreate
                | OperationId::ImageVariationsCreate
                | OperationId::TranscriptionsCreate
                | OperationId::TranslationsCreate
                | OperationId::SpeechCreate
                | OperationId::RealtimeSession
                | OperationId::CreateResponse
                | OperationId::CreateRun
                | OperationId::CreateThreadAndRun
        )
    }
}

impl std::fmt::Display for OperationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_lower_case_and_round_trip() {
        for op in OperationId::ALL {
            assert_eq!(op.as_str(), op.as_str().to_ascii_lowercase());
            assert_eq!(OperationId::parse(op.as_str()), Some(*op));
            let json = serde_json::to_string(op).unwrap();
            assert_eq!(json, format!("\"{}\"", op.as_str()));
        }
        assert_eq!(
            OperationId::parse("ChatCompletions_Create"),
            Some(OperationId::ChatCompletionsCreate)
        );
        assert_eq!(OperationId::parse("nope"), None);
    }
}
