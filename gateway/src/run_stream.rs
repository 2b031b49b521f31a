//! An Assistants run's stream, reassembled for the record.
//!
//! A run streamed by `create_run`, `create_thread_and_run` or `submit_tool_outputs` with
//! `"stream": true` is a sequence of named events whose data are the objects they concern:
//! `thread.run.*` the run (its status changing; `thread.run.completed` holds its `usage`),
//! `thread.message.created|in_progress|completed|incomplete` a message whole, `thread.message.delta`
//! a piece of a message's text, `thread.run.step.*` the run's steps, and `done` with `[DONE]` at
//! the end (OpenAI's API reference, "Assistants streaming events", which Azure OpenAI's Assistants
//! follow). The record keeps the run as its last event gave it, with the messages the stream wrote
//! under `messages`: each the last whole object given, or, for one cut before its
//! `thread.message.completed`, the text its deltas brought, marked `"status": "incomplete"`.
//! Steps are not kept (their usage is in the run's).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// A run's stream so far.
#[derive(Debug, Default)]
pub(crate) struct RunSoFar {
    /// The run as the last `thread.run.*` event gave it.
    run: Option<Value>,
    /// Messages in the order the stream first named them.
    messages: Vec<MessageSoFar>,
}

/// One message of the stream.
#[derive(Debug)]
struct MessageSoFar {
    id: String,
    /// The message as the last whole event gave it.
    whole: Option<Value>,
    /// Text parts by content `index`, joined from the deltas since that event.
    text: BTreeMap<u64, String>,
}

impl RunSoFar {
    /// Takes in an event's data, an object of type `object` (`thread.run`, `thread.message`,
    /// `thread.message.delta`, `thread.run.step`, …).
    pub(crate) fn event(&mut self, object: &str, data: &Value) {
        match object {
            "thread.run" => self.run = Some(data.clone()),
            "thread.message" => {
                let message = self.message(data);
                message.whole = Some(data.clone());
                message.text.clear();
            }
            "thread.message.delta" => {
                let parts = data
                    .pointer("/delta/content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten();
                let pieces: Vec<(u64, &str)> = parts
                    .filter_map(|part| {
                        let index = part.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let text = part.pointer("/text/value").and_then(Value::as_str)?;
                        Some((index, text))
                    })
                    .collect();
                let message = self.message(data);
                for (index, text) in pieces {
                    message.text.entry(index).or_default().push_str(text);
                }
            }
            _ => {}
        }
    }

    /// Whether the stream named a run or a message.
    pub(crate) fn is_empty(&self) -> bool {
        self.run.is_none() && self.messages.is_empty()
    }

    /// The run with its `messages`, as the record keeps it.
    pub(crate) fn into_response(self) -> Value {
        let mut response = match self.run {
            Some(Value::Object(run)) => run,
            _ => Map::from_iter([("object".to_owned(), json!("thread.run"))]),
        };
        let messages = self.messages.into_iter().map(MessageSoFar::into_message);
        response.insert("messages".to_owned(), Value::Array(messages.collect()));
        Value::Object(response)
    }

    /// The message `data` is about (its `id`), added when new.
    fn message(&mut self, data: &Value) -> &mut MessageSoFar {
        let id = data.get("id").and_then(Value::as_str).unwrap_or_default();
        let at = match self.messages.iter().position(|m| m.id == id) {
            Some(at) => at,
            None => {
                self.messages.push(MessageSoFar {
                    id: id.to_owned(),
                    whole: None,
                    text: BTreeMap::new(),
                });
                self.messages.len() - 1
            }
        };
        &mut self.messages[at]
    }
}

impl MessageSoFar {
    fn into_message(self) -> Value {
        let mut message = match self.whole {
            Some(Value::Object(message)) => message,
            _ => Map::from_iter([
                ("id".to_owned(), json!(self.id)),
                ("object".to_owned(), json!("thread.message")),
                ("role".to_owned(), json!("assistant")),
            ]),
        };
        if self.text.is_empty() {
            return Value::Object(message);
        }
        // Text came after the last whole message: the message as far as its deltas go. A part
        // index past the parts known is the next part, so that an index the backend sends never
        // makes the record hold more than the text it sent.
        let mut content = match message.remove("content") {
            Some(Value::Array(parts)) => parts,
            _ => Vec::new(),
        };
        for (index, text) in self.text {
            let at = usize::try_from(index).ok().filter(|&at| at < content.len());
            let known = at
                .and_then(|at| content[at].pointer("/text/value"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let part = json!({"type": "text", "text": {"value": format!("{known}{text}"), "annotations": []}});
            match at {
                Some(at) => content[at] = part,
                None => content.push(part),
            }
        }
        message.insert("content".to_owned(), Value::Array(content));
        message.insert("status".to_owned(), json!("incomplete"));
        Value::Object(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(events: &[Value]) -> Value {
        let mut run = RunSoFar::default();
        for event in events {
            run.event(event["object"].as_str().unwrap(), event);
        }
        run.into_response()
    }

    fn delta(id: &str, text: &str) -> Value {
        json!({"id": id, "object": "thread.message.delta",
               "delta": {"content": [{"index": 0, "type": "text", "text": {"value": text, "annotations": []}}]}})
    }

    fn message(id: &str, status: &str, text: Option<&str>) -> Value {
        let content = text.map_or_else(
            || json!([]),
            |text| json!([{"type": "text", "text": {"value": text, "annotations": []}}]),
        );
        json!({"id": id, "object": "thread.message", "role": "assistant", "status": status,
               "run_id": "run_1", "content": content})
    }

    fn run(status: &str) -> Value {
        let usage = (status == "completed")
            .then(|| json!({"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}));
        json!({"id": "run_1", "object": "thread.run", "status": status, "model": "gpt-4o",
               "thread_id": "thread_1", "usage": usage})
    }

    #[test]
    fn a_completed_run_keeps_its_final_state_and_whole_messages() {
        let response = feed(&[
            run("queued"),
            run("in_progress"),
            json!({"id": "step_1", "object": "thread.run.step", "type": "message_creation", "usage": null}),
            message("msg_1", "in_progress", None),
            delta("msg_1", "Hel"),
            delta("msg_1", "lo"),
            message("msg_1", "completed", Some("Hello")),
            run("completed"),
        ]);
        assert_eq!(response["status"], "completed");
        assert_eq!(response["usage"]["total_tokens"], 39);
        assert_eq!(
            response["messages"],
            json!([message("msg_1", "completed", Some("Hello"))])
        );
    }

    #[test]
    fn a_message_cut_before_it_completed_keeps_the_text_its_deltas_brought() {
        let response = feed(&[
            run("in_progress"),
            message("msg_1", "completed", Some("First.")),
            message("msg_2", "in_progress", None),
            delta("msg_2", "Sec"),
            delta("msg_2", "ond"),
        ]);
        assert_eq!(response["status"], "in_progress");
        let messages = response["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0]["content"][0]["text"]["value"], "First.");
        assert_eq!(messages[1]["content"][0]["text"]["value"], "Second");
        assert_eq!(messages[1]["status"], "incomplete");
        // Deltas of a message never announced whole; a part index far past the parts there are
        // is the next part, not room for billions.
        let mut far = delta("msg_8", "Far");
        far["delta"]["content"][0]["index"] = json!(4_000_000_000_u64);
        let response = feed(&[delta("msg_8", "Near"), far]);
        let parts = response["messages"][0]["content"].as_array().unwrap();
        let texts: Vec<&str> = parts
            .iter()
            .map(|p| p["text"]["value"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["Near", "Far"]);
        let response = feed(&[delta("msg_9", "Only deltas")]);
        assert_eq!(response["object"], "thread.run");
        assert_eq!(response["messages"][0]["id"], "msg_9");
        assert_eq!(
            response["messages"][0]["content"][0]["text"]["value"],
            "Only deltas"
        );
    }
}
