//! Stateful objects: files, batches, assistants, threads, vector stores, stored responses and
//! stored chat completions.
//! Every object belongs to the instance that created it; any other instance answers 404 for its
//! id, which is how a client proves that its calls stick to the right backend.

pub(crate) mod assistants;
pub(crate) mod batches;
pub(crate) mod files;
pub(crate) mod models;
pub(crate) mod stored_completions;

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::error::ApiError;

/// The kinds of objects an instance keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ObjectKind {
    File,
    Batch,
    Assistant,
    Thread,
    VectorStore,
    Response,
    ChatCompletion,
}

impl ObjectKind {
    /// How error messages name the kind.
    fn noun(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Batch => "batch",
            Self::Assistant => "assistant",
            Self::Thread => "thread",
            Self::VectorStore => "vector store",
            Self::Response => "response",
            Self::ChatCompletion => "chat completion",
        }
    }
}

/// One stored object: its JSON as returned to clients and, for files, the uploaded bytes.
#[derive(Debug)]
pub(crate) struct StoredObject {
    kind: ObjectKind,
    order: u64,
    pub(crate) body: Value,
    pub(crate) content: Bytes,
}

/// The objects of one instance, by id.
#[derive(Debug, Default)]
pub(crate) struct ObjectStore {
    by_id: HashMap<String, StoredObject>,
    inserted: u64,
}

impl ObjectStore {
    /// Keeps an object under the `id` field of its body.
    pub(crate) fn insert(&mut self, kind: ObjectKind, body: Value, content: Bytes) {
        let id = body
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        self.inserted += 1;
        let order = self.inserted;
        self.by_id.insert(
            id,
            StoredObject {
                kind,
                order,
                body,
                content,
            },
        );
    }

    /// The object of that kind with that id, or the 404 that says it is not here.
    pub(crate) fn get(&self, kind: ObjectKind, id: &str) -> Result<&StoredObject, ApiError> {
        self.by_id
            .get(id)
            .filter(|o| o.kind == kind)
            .ok_or_else(|| ApiError::no_such_object(kind.noun(), id))
    }

    /// The object of that kind with that id, to change.
    pub(crate) fn get_mut(
        &mut self,
        kind: ObjectKind,
        id: &str,
    ) -> Result<&mut StoredObject, ApiError> {
        self.by_id
            .get_mut(id)
            .filter(|o| o.kind == kind)
            .ok_or_else(|| ApiError::no_such_object(kind.noun(), id))
    }

    /// Removes the object and returns what a delete call answers.
    pub(crate) fn delete(
        &mut self,
        kind: ObjectKind,
        id: &str,
        object: &str,
    ) -> Result<Value, ApiError> {
        self.get(kind, id)?;
        self.by_id.remove(id);
        Ok(json!({"id": id, "object": object, "deleted": true}))
    }

    /// Bodies of every object of that kind, oldest first, that `keep` accepts.
    pub(crate) fn list(&self, kind: ObjectKind, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut objects: Vec<&StoredObject> = self
            .by_id
            .values()
            .filter(|o| o.kind == kind && keep(&o.body))
            .collect();
        objects.sort_by_key(|o| o.order);
        objects.into_iter().map(|o| o.body.clone()).collect()
    }
}

/// A list answer: `{"object": "list", "data": [...], "first_id", "last_id", "has_more": false}`.
pub(crate) fn list_page(data: Vec<Value>) -> Value {
    let id_of = |o: Option<&Value>| o.and_then(|o| o.get("id")).cloned().unwrap_or(Value::Null);
    json!({
        "object": "list",
        "first_id": id_of(data.first()),
        "last_id": id_of(data.last()),
        "has_more": false,
        "data": data,
    })
}
