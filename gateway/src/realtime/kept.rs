//! What a Realtime session's record keeps as it goes: the events, a line each, and the items of
//! the user's messages and the responses' output, each within its capture limit.

use serde_json::Value;

use crate::capture::BodyCapture;

/// Appends one event to a capture, a line each: its text as it came, or, when it carries
/// credentials (an MCP tool's `headers`, `authorization`), its tree re-serialized with them
/// redacted ([`crate::body_credentials::redacted_realtime_event`]). A capture that keeps
/// nothing more (a limit of 0, or reached) is not written.
pub(super) fn keep_event(capture: &mut BodyCapture, text: &str, event: &Value) {
    if capture.limit() == 0 || capture.truncated() {
        return;
    }
    let redacted = crate::body_credentials::redacted_realtime_event(event);
    if !capture.is_empty() {
        capture.push(b"\n");
    }
    capture.push(redacted.as_deref().unwrap_or(text).as_bytes());
}

/// The items of a JSON array (the user's messages, the responses' output) kept as the session
/// goes, as text up to a capture limit: what the array's text would be, cut at the limit. An
/// item is serialized only as far as it fits; with a limit of 0 (metadata only) nothing is.
pub(super) struct KeptItems(BodyCapture);

impl KeptItems {
    pub(super) fn new(limit: usize) -> KeptItems {
        KeptItems(BodyCapture::new(limit))
    }

    /// Appends `item`, as far as it fits.
    pub(super) fn push(&mut self, item: &Value) {
        let kept = &mut self.0;
        if kept.limit() == 0 || kept.truncated() {
            return;
        }
        kept.push(if kept.is_empty() { b"[" } else { b"," });
        // Stops at the limit (the writer fails there), flagged as cut.
        let _ = serde_json::to_writer(CaptureWriter(kept), item);
    }

    /// The array's text (`None` when it has no item, or the limit is 0), and whether something
    /// was left out (its closing bracket, at least).
    pub(super) fn finish(mut self) -> (Option<String>, bool) {
        if self.0.is_empty() {
            return (None, false);
        }
        if !self.0.truncated() {
            self.0.push(b"]");
        }
        let truncated = self.0.truncated();
        (self.0.into_text(), truncated)
    }
}

/// Writes into a capture, failing once it is full so that what writes stops there.
struct CaptureWriter<'a>(&'a mut BodyCapture);

impl std::io::Write for CaptureWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.push(bytes);
        if self.0.truncated() {
            return Err(std::io::Error::other("the capture limit is reached"));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn items_are_kept_within_the_limit_as_they_come() {
        let item = json!({"type": "message", "content": [{"text": "Say hello"}]});
        let whole = json!([item, item]).to_string();
        // Room for both: the array's text as it would be whole.
        let mut roomy = KeptItems::new(whole.len());
        roomy.push(&item);
        roomy.push(&item);
        assert_eq!(roomy.finish(), (Some(whole.clone()), false));
        // Cut where the whole text would be (its closing bracket too), flagged.
        for limit in [1, 20, whole.len() - 1] {
            let mut tight = KeptItems::new(limit);
            tight.push(&item);
            tight.push(&item);
            let kept = whole.get(..limit).map(str::to_owned);
            assert_eq!(tight.finish(), (kept, true), "{limit}");
        }
        // Metadata only: nothing kept, nothing flagged.
        let mut none = KeptItems::new(0);
        none.push(&item);
        assert_eq!(none.finish(), (None, false));
        assert_eq!(KeptItems::new(64).finish(), (None, false));
    }
}
