//! The route table. Every operation is served under every route style it exists in, by the same
//! handler:
//!
//! | style | prefix | model from | `api-version` |
//! |---|---|---|---|
//! | OpenAI | `/v1` | body | ignored |
//! | Azure v1 | `/openai/v1` | body | ignored |
//! | Azure classic, deployment routes | `/openai/deployments/{deployment}` | path | required |
//! | Azure classic, resource routes | `/openai` | body | required |
//!
//! Deployment routes carry the inference operations only; resource routes carry the rest
//! (files, batches, responses, …), as in Azure. Unknown routes, and classic routes without
//! `api-version`, get Azure's 404.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};

use crate::control;
use crate::error::{self, ApiError};
use crate::inference::{audio, chat, completions, embeddings, images, realtime, responses};
use crate::objects::{assistants, batches, files, models, stored_completions};
use crate::observe::{self, MAX_BODY_BYTES};
use crate::state::SimulatorState;

const OPENAI_STYLE: &str = "/v1";
const AZURE_V1: &str = "/openai/v1";
const AZURE_DEPLOYMENT: &str = "/openai/deployments/{deployment}";
const AZURE_CLASSIC: &str = "/openai";

type Routes = Vec<(&'static str, MethodRouter<SimulatorState>)>;

/// Operations a model deployment answers.
fn inference_routes() -> Routes {
    vec![
        ("/chat/completions", post(chat::create)),
        ("/completions", post(completions::create)),
        ("/embeddings", post(embeddings::create)),
        ("/images/generations", post(images::generate)),
        ("/audio/transcriptions", post(audio::transcribe)),
        ("/audio/translations", post(audio::translate)),
        ("/audio/speech", post(audio::speak)),
    ]
}

/// Operations on the resource as a whole: stored objects (stored chat completions among them),
/// the Responses API, the Realtime API (a WebSocket that names its deployment in the query),
/// models.
fn resource_routes() -> Routes {
    vec![
        ("/chat/completions", get(stored_completions::list)),
        (
            "/chat/completions/{completion_id}",
            get(stored_completions::retrieve)
                .post(stored_completions::update)
                .delete(stored_completions::delete),
        ),
        (
            "/chat/completions/{completion_id}/messages",
            get(stored_completions::messages),
        ),
        ("/realtime", get(realtime::connect)),
        ("/responses", post(responses::create)),
        (
            "/responses/{response_id}",
            get(responses::retrieve).delete(responses::delete),
        ),
        ("/files", get(files::list).post(files::upload)),
        (
            "/files/{file_id}",
            get(files::retrieve).delete(files::delete),
        ),
        ("/files/{file_id}/content", get(files::content)),
        ("/batches", get(batches::list).post(batches::create)),
        ("/batches/{batch_id}", get(batches::retrieve)),
        ("/batches/{batch_id}/cancel", post(batches::cancel)),
        (
            "/assistants",
            get(assistants::list_assistants).post(assistants::create_assistant),
        ),
        (
            "/assistants/{assistant_id}",
            get(assistants::retrieve_assistant).delete(assistants::delete_assistant),
        ),
        ("/threads", post(assistants::create_thread)),
        (
            "/threads/{thread_id}",
            get(assistants::retrieve_thread).delete(assistants::delete_thread),
        ),
        (
            "/vector_stores",
            get(assistants::list_vector_stores).post(assistants::create_vector_store),
        ),
        (
            "/vector_stores/{vector_store_id}",
            get(assistants::retrieve_vector_store).delete(assistants::delete_vector_store),
        ),
        ("/models", get(models::list)),
        ("/models/{model_id}", get(models::retrieve)),
    ]
}

/// The whole simulator: API routes (counted, recorded, subject to auth and faults) and the
/// `/_simulator` control routes (none of that).
pub(crate) fn router(state: SimulatorState) -> Router {
    let mut api = Router::new();
    for prefix in [OPENAI_STYLE, AZURE_V1] {
        for (path, route) in inference_routes().into_iter().chain(resource_routes()) {
            api = api.route(&format!("{prefix}{path}"), route);
        }
    }
    for (prefix, routes) in [
        (AZURE_DEPLOYMENT, inference_routes()),
        (AZURE_CLASSIC, resource_routes()),
    ] {
        for (path, route) in routes {
            let route = route.route_layer(middleware::from_fn(require_api_version));
            api = api.route(&format!("{prefix}{path}"), route);
        }
    }
    let api = api
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ));

    Router::new()
        .nest("/_simulator", control::router())
        .merge(api)
        .layer(middleware::map_response_with_state(
            state.clone(),
            observe::stamp,
        ))
        .with_state(state)
}

/// Azure classic routes answer 404 without `api-version`; so does the simulator, which catches
/// a client (or gateway) that drops the query.
async fn require_api_version(request: Request, next: Next) -> Response {
    let has_version = request.uri().query().is_some_and(|query| {
        query.split('&').any(|pair| {
            pair.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        })
    });
    if has_version {
        next.run(request).await
    } else {
        ApiError::not_found().into_response()
    }
}
