//! What a batch runs: the calls its input file names.
//!
//! A batch (`POST …/batches`) names no deployment itself: each line of its input file is one call,
//! `{"custom_id": …, "method": "POST", "url": "/chat/completions", "body": {"model": "<deployment>", …}}`
//! (Azure's batch input format; OpenAI's lines say `/v1/chat/completions`). Authorizing only the
//! `batch_create` call would let a caller run every deployment of the member that holds the file.
//! So before a batch is sent, the gateway reads its input file back from that member (files are
//! immutable, and whoever uploaded it, this is what will run) and every distinct
//! (operation, deployment) of its lines must be granted to the caller exactly as the same call
//! made directly would be.
//!
//! The file is read as it arrives, one line at a time: only the line being read is held, never the
//! whole file, and at most [`MAX_INPUT_FILE_BYTES`] are read.

use std::borrow::Cow;
use std::collections::HashSet;

use gatehouse_schema::OperationId;
use http::{HeaderMap, Method, Uri};
use serde::Deserialize;

use crate::classify::{self, BodyKind};
use crate::member_read::{self, MemberRead};
use crate::pool::Member;

/// The most of an input file the gateway reads. Azure accepts batch input files of up to 200 MB
/// ("Batch limits", Azure OpenAI global batch how-to); a larger file is not a batch Azure runs.
pub const MAX_INPUT_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// One kind of call a batch makes, and the first line that makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchCall {
    /// The operation of the line's `url`.
    pub operation: OperationId,
    /// The line's `body.model`: the deployment that runs it.
    pub deployment: String,
    /// The line's number in the file, from 1.
    pub line: usize,
}

/// Why an input file cannot be authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputFileError {
    /// The file is larger than a batch input file can be.
    #[error(
        "The batch's input file is larger than the gateway reads to check it ({} MiB).",
        MAX_INPUT_FILE_BYTES >> 20
    )]
    TooLarge,
    /// A line is not a batch request the gateway can judge.
    #[error("Line {line} of the batch's input file {problem}.")]
    Line {
        /// The line's number, from 1.
        line: usize,
        /// What is wrong with it, for the caller (never the line's content).
        problem: &'static str,
    },
}

/// Reads an input file chunk by chunk, keeping only the line being read.
#[derive(Debug)]
pub struct InputFileReader {
    /// The most bytes read.
    limit: u64,
    /// The line read so far (its end not yet seen).
    partial: Vec<u8>,
    /// Lines completed so far.
    lines: usize,
    /// Bytes read so far.
    bytes: u64,
    calls: Vec<BatchCall>,
    /// (operation, lower-cased deployment) already in `calls`.
    seen: HashSet<(OperationId, String)>,
}

/// One line, as far as authorization reads it: unknown members are skipped, and a member given
/// twice is an error (the batch runner might read the other one).
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    url: Cow<'a, str>,
    #[serde(borrow)]
    body: LineBody<'a>,
}

#[derive(Deserialize)]
struct LineBody<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    /// A Responses line's tools: an `image_generation` tool runs a model of its own.
    #[serde(default)]
    tools: Option<serde_json::Value>,
}

impl Default for InputFileReader {
    fn default() -> InputFileReader {
        InputFileReader::new()
    }
}

impl InputFileReader {
    /// A reader at the start of a file, reading at most [`MAX_INPUT_FILE_BYTES`].
    pub fn new() -> InputFileReader {
        InputFileReader::reading_at_most(MAX_INPUT_FILE_BYTES)
    }

    /// A reader that refuses a file longer than `limit` bytes.
    fn reading_at_most(limit: u64) -> InputFileReader {
        InputFileReader {
            limit,
            partial: Vec::new(),
            lines: 0,
            bytes: 0,
            calls: Vec::new(),
            seen: HashSet::new(),
        }
    }

    /// Reads the next chunk of the file.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), InputFileError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.limit {
            return Err(InputFileError::TooLarge);
        }
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            if self.partial.is_empty() {
                self.line(&chunk[..end])?;
            } else {
                self.partial.extend_from_slice(&chunk[..end]);
                let line = std::mem::take(&mut self.partial);
                self.line(&line)?;
            }
            chunk = &chunk[end + 1..];
        }
        self.partial.extend_from_slice(chunk);
        Ok(())
    }

    /// Ends the file: the calls it makes, each (operation, deployment) once, in file order.
    pub fn finish(mut self) -> Result<Vec<BatchCall>, InputFileError> {
        let last = std::mem::take(&mut self.partial);
        self.line(&last)?;
        Ok(self.calls)
    }

    fn line(&mut self, line: &[u8]) -> Result<(), InputFileError> {
        self.lines += 1;
        let number = self.lines;
        let refused = |problem| InputFileError::Line {
            line: number,
            problem,
        };
        let line = if number == 1 {
            line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
        } else {
            line
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let raw = line;
        let line: Line<'_> = serde_json::from_slice(raw)
            .map_err(|_| refused("is not a batch request: a JSON object with `url` and `body`"))?;
        let method = match line.method.as_deref() {
            None => Method::POST,
            Some(method) => Method::from_bytes(method.as_bytes())
                .map_err(|_| refused("has a `method` that is not an HTTP method"))?,
        };
        let operation = operation_of(&method, &line.url)
            .ok_or_else(|| refused("has a `url` that is not a model call a batch can make"))?;
        let model = line
            .body
            .model
            .ok_or_else(|| refused("names no `model` in its `body`"))?;
        classify::valid_name(&model)
            .map_err(|_| refused("has a `model` that is not a valid deployment name"))?;
        // A Responses line's image tool runs its own model, judged as the line's; a batch line
        // carries no header, so the tool must name it. A member given twice in one of the
        // line's objects is refused as it is in a direct call.
        let mut tool_models = Vec::new();
        if operation == OperationId::CreateResponse {
            if crate::peek::duplicate_member(raw).is_some() {
                return Err(refused("gives a member more than once in one object"));
            }
            if let Some(tools) = &line.body.tools {
                tool_models = crate::authorize::image_tool_models(tools, None)
                    .map_err(|_| {
                        refused(
                            "has an `image_generation` tool that names no `model` (a batch line \
                             carries no image deployment header): name the deployment in the \
                             tool's `model`",
                        )
                    })?
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
            }
        }
        for deployment in std::iter::once(model.into_owned()).chain(tool_models) {
            if self
                .seen
                .insert((operation, deployment.to_ascii_lowercase()))
            {
                self.calls.push(BatchCall {
                    operation,
                    deployment,
                    line: number,
                });
            }
        }
        Ok(())
    }
}

/// Reads the input file at `uri` (its `…/files/{id}/content`) from `member` with `headers` (the
/// member's credential), within the member's response and idle timeouts: the calls it makes, or
/// why the gateway cannot authorize it.
pub(crate) async fn read_input_file(
    member: &Member,
    uri: Uri,
    headers: HeaderMap,
) -> MemberRead<Result<Vec<BatchCall>, InputFileError>> {
    let response = match member_read::get(member, uri, headers).await.into_read() {
        Ok(response) => response,
        Err(ended) => return ended,
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut reader = InputFileReader::new();
    loop {
        match member_read::next_chunk(member, &mut body).await {
            Ok(Some(data)) => {
                if let Err(error) = reader.push(&data) {
                    return MemberRead::Read(Err(error));
                }
            }
            Ok(None) => break,
            Err(()) => return MemberRead::cut("input_file_cut", status),
        }
    }
    MemberRead::Read(reader.finish())
}

/// The operation a line's `method` and `url` make: a model call with its model in the body, at
/// `/chat/completions` (Azure's form), `/v1/chat/completions` (OpenAI's) or `/openai/v1/…`.
fn operation_of(method: &Method, url: &str) -> Option<OperationId> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.as_slice() {
        ["openai", "v1", rest @ ..] | ["v1", rest @ ..] => rest,
        ["openai", ..] => return None,
        rest => rest,
    };
    let route = classify::route_of(method, rest).ok()?;
    (route.model_in_body && route.body_kind == BodyKind::Json).then_some(route.operation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(file: &str, chunk: usize) -> Result<Vec<BatchCall>, InputFileError> {
        let mut reader = InputFileReader::new();
        for part in file.as_bytes().chunks(chunk) {
            reader.push(part)?;
        }
        reader.finish()
    }

    fn call(operation: OperationId, deployment: &str, line: usize) -> BatchCall {
        BatchCall {
            operation,
            deployment: deployment.to_owned(),
            line,
        }
    }

    #[test]
    fn each_operation_and_deployment_is_named_once_in_file_order() {
        let file = concat!(
            "\u{feff}{\"custom_id\":\"1\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o-batch\",\"messages\":[{\"role\":\"user\",\"content\":\"a \\\"model\\\": o1\"}]}}\n",
            "\r\n",
            "{\"custom_id\":\"2\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\"body\":{\"input\":\"x\",\"model\":\"text-embedding-3-small\"}}\r\n",
            "{\"custom_id\":\"3\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{\"model\":\"GPT-4O-BATCH\"}}\n",
            "{\"custom_id\":\"4\",\"url\":\"/openai/v1/chat/completions\",\"body\":{\"model\":\"o1-batch\"}}",
        );
        let expected = vec![
            call(OperationId::ChatCompletionsCreate, "gpt-4o-batch", 1),
            call(OperationId::EmbeddingsCreate, "text-embedding-3-small", 3),
            call(OperationId::ChatCompletionsCreate, "o1-batch", 5),
        ];
        // However the file is cut into chunks.
        for chunk in [1, 2, 7, 64, file.len()] {
            assert_eq!(read(file, chunk).unwrap(), expected, "chunks of {chunk}");
        }
    }

    #[test]
    fn a_line_the_gateway_cannot_judge_is_refused_by_its_number() {
        let good = "{\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o\"}}\n";
        for (bad, problem) in [
            ("not json", "is not a batch request"),
            ("{\"url\":\"/chat/completions\"}", "is not a batch request"),
            (
                "{\"url\":\"/chat/completions\",\"body\":{\"model\":\"a\",\"model\":\"b\"}}",
                "is not a batch request",
            ),
            (
                "{\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o\"},\"url\":\"/embeddings\"}",
                "is not a batch request",
            ),
            (
                "{\"url\":\"/chat/completions\",\"body\":{\"messages\":[]}}",
                "names no `model`",
            ),
            (
                "{\"url\":\"/chat/completions\",\"body\":{\"model\":\"../o1\"}}",
                "not a valid deployment name",
            ),
            (
                "{\"url\":\"/files\",\"body\":{\"model\":\"gpt-4o\"}}",
                "not a model call",
            ),
            (
                "{\"url\":\"/openai/deployments/o1/chat/completions\",\"body\":{\"model\":\"gpt-4o\"}}",
                "not a model call",
            ),
            (
                "{\"method\":\"GET\",\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o\"}}",
                "not a model call",
            ),
            (
                "{\"url\":\"/audio/transcriptions\",\"body\":{\"model\":\"whisper\"}}",
                "not a model call",
            ),
        ] {
            let file = format!("{good}{good}{bad}\n{good}");
            let error = read(&file, 5).unwrap_err();
            let InputFileError::Line { line, .. } = &error else {
                panic!("{bad}: {error:?}");
            };
            assert_eq!(*line, 3, "{bad}");
            let message = error.to_string();
            assert!(message.contains(problem), "{bad}: {message}");
            assert!(
                !message.contains("gpt-4o") && !message.contains("o1"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_file_larger_than_a_batch_input_is_refused_before_it_is_read_whole() {
        const LIMIT: u64 = 64 * 1024;
        let mut reader = InputFileReader::reading_at_most(LIMIT);
        let line = b"{\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o\"}}\n".repeat(16);
        let mut read = 0;
        let error = loop {
            match reader.push(&line) {
                Ok(()) => read += line.len() as u64,
                Err(error) => break error,
            }
        };
        assert_eq!(error, InputFileError::TooLarge);
        assert!(read <= LIMIT && read + line.len() as u64 > LIMIT);
        // A line without an end is held, and bounded by the same limit.
        let mut reader = InputFileReader::reading_at_most(LIMIT);
        let endless = vec![b'x'; 1024];
        let error = (0..1024).find_map(|_| reader.push(&endless).err()).unwrap();
        assert_eq!(error, InputFileError::TooLarge);
        assert!(reader.partial.len() as u64 <= LIMIT);
        // The limit a member's file is read with is Azure's with room to spare.
        assert_eq!(InputFileReader::new().limit, MAX_INPUT_FILE_BYTES);
    }

    /// A Responses line's `image_generation` tool runs its own model: named as a call of the
    /// line, judged as the line's model is. A tool naming none, or a member given twice in one
    /// of the line's objects (a tool's `type` or `model`), is refused.
    #[test]
    fn a_responses_lines_image_tool_is_a_call_of_its_own() {
        let file = concat!(
            "{\"url\":\"/v1/responses\",\"body\":{\"model\":\"gpt-4o\",\"input\":\"Draw\",\"tools\":[{\"type\":\"web_search\"},{\"type\":\"image_generation\",\"model\":\"gpt-image-1\"}]}}\n",
            "{\"url\":\"/v1/responses\",\"body\":{\"model\":\"gpt-4o\",\"input\":\"Hi\"}}\n",
        );
        assert_eq!(
            read(file, 7).unwrap(),
            vec![
                call(OperationId::CreateResponse, "gpt-4o", 1),
                call(OperationId::CreateResponse, "gpt-image-1", 1),
            ]
        );
        for (bad, problem) in [
            (
                "{\"url\":\"/v1/responses\",\"body\":{\"model\":\"gpt-4o\",\"tools\":[{\"type\":\"image_generation\"}]}}",
                "names no `model`",
            ),
            (
                "{\"url\":\"/v1/responses\",\"body\":{\"model\":\"gpt-4o\",\"tools\":[{\"type\":\"image_generation\",\"type\":\"function\",\"name\":\"f\"}]}}",
                "more than once",
            ),
        ] {
            let error = read(&format!("{bad}\n"), 9).unwrap_err();
            assert!(error.to_string().contains(problem), "{bad}: {error}");
        }
    }

    #[test]
    fn an_empty_file_makes_no_call() {
        assert_eq!(read("", 4).unwrap(), Vec::new());
        assert_eq!(read("\n \n", 4).unwrap(), Vec::new());
    }
}
