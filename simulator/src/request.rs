//! Extractors shared by the handlers: the JSON body, the deployment in the path, multipart forms.

use std::collections::HashMap;

use axum::extract::multipart::MultipartRejection;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Path, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// A request body that must be a JSON object. An empty body reads as `{}`.
pub(crate) struct JsonBody(pub(crate) Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::bad_body(format!("Could not read the request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::bad_body(
                "The request body must be a JSON object.",
            )),
            Err(e) => Err(ApiError::bad_body(format!(
                "We could not parse the JSON body of your request: {e}"
            ))),
        }
    }
}

/// The `{deployment}` segment of an Azure classic route, absent on the other route styles.
pub(crate) struct DeploymentInPath(pub(crate) Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for DeploymentInPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        Ok(Self(params.remove("deployment")))
    }
}

impl DeploymentInPath {
    /// The model to answer as: the deployment from the path, else `model` from the body.
    pub(crate) fn model(&self, body_model: Option<&str>) -> Result<String, ApiError> {
        match (&self.0, body_model) {
            (Some(deployment), _) => Ok(deployment.clone()),
            (None, Some(model)) if !model.is_empty() => Ok(model.to_owned()),
            _ => Err(ApiError::invalid_field(
                "model",
                "you must provide a model parameter",
            )),
        }
    }
}

/// A file part of a multipart form.
pub(crate) struct UploadedFile {
    pub(crate) filename: String,
    pub(crate) bytes: Bytes,
}

/// A multipart/form-data body read whole: text fields and the `file` part.
pub(crate) struct Form {
    pub(crate) fields: HashMap<String, String>,
    pub(crate) file: Option<UploadedFile>,
}

impl Form {
    /// Reads every part of the form.
    pub(crate) async fn read(
        multipart: Result<Multipart, MultipartRejection>,
    ) -> Result<Self, ApiError> {
        let mut multipart = multipart.map_err(|e| {
            ApiError::bad_body(format!(
                "Expected a multipart/form-data body: {}",
                e.body_text()
            ))
        })?;
        let mut form = Self {
            fields: HashMap::new(),
            file: None,
        };
        while let Some(field) = multipart.next_field().await.map_err(bad_multipart)? {
            let name = field.name().unwrap_or_default().to_owned();
            if name == "file" {
                let filename = field.file_name().unwrap_or("file").to_owned();
                let bytes = field.bytes().await.map_err(bad_multipart)?;
                form.file = Some(UploadedFile { filename, bytes });
            } else {
                let text = field.text().await.map_err(bad_multipart)?;
                form.fields.insert(name, text);
            }
        }
        Ok(form)
    }

    /// A text field, if present and not empty.
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The `file` part, or the 400 that says it is missing.
    pub(crate) fn require_file(&self) -> Result<&UploadedFile, ApiError> {
        self.file
            .as_ref()
            .ok_or_else(|| ApiError::invalid_field("file", "The 'file' part is required."))
    }
}

fn bad_multipart(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::bad_body(format!(
        "Malformed multipart/form-data body: {}",
        e.body_text()
    ))
}
