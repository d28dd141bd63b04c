//! The JSON-RPC 2.0 reader of MCP rules: pure functions over bytes (no I/O), bounded, fuzzed
//! (`fuzz/fuzz_targets/mcp_jsonrpc.rs`).
//!
//! - [`read`]: a POST body (one message or a batch) into the messages the rules judge: kind,
//!   method, and for `tools/call` the tool.
//! - [`filter_tools`]: a JSON answer with every denied tool taken out of any `tools` list of a
//!   result (a `tools/list` answer), re-serialised only when something was taken out.
//! - [`SseFilter`]: the same over a `text/event-stream`, event by event as it streams.
//!
//! Every input is parsed strictly before anything is judged or passed: at most
//! [`MAX_BODY`] bytes, nesting at most [`MAX_DEPTH`] deep, no key twice in an object (a parser
//! that takes the first `name` and one that takes the last would see two different tools), and
//! every message a JSON-RPC 2.0 object. What does not parse is an error, never passed as is.

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Largest JSON-RPC body (or SSE event) read; a larger one is refused.
pub const MAX_BODY: usize = 1024 * 1024;

/// Deepest nesting of arrays and objects accepted (serde_json's own limit is 128).
pub const MAX_DEPTH: usize = 64;

/// The method whose requests name a tool, and the one whose answers list tools.
pub use moat_policy::mcp_rules::TOOLS_CALL;

/// Why bytes are not JSON-RPC the rules can judge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonRpcError {
    /// More than [`MAX_BODY`] bytes.
    #[error("over {MAX_BODY} bytes")]
    TooLarge,
    /// Not JSON, nested deeper than [`MAX_DEPTH`], or a key given twice.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// JSON, but not a JSON-RPC 2.0 message or batch of them.
    #[error("not JSON-RPC 2.0: {0}")]
    NotJsonRpc(String),
}

/// What one message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A method call that expects an answer (has an `id`).
    Request,
    /// A method call without an `id`.
    Notification,
    /// An answer (`result` or `error`) to the other side's request.
    Response,
}

/// One JSON-RPC message, as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Request, notification or response.
    pub kind: Kind,
    /// The `id` (requests and responses; `Null` where absent).
    pub id: Value,
    /// The method (requests and notifications).
    pub method: Option<String>,
    /// For `tools/call`: `params.name`, if it is a string.
    pub tool: Option<String>,
}

/// A POST body: its messages, and whether they came as a batch (a JSON array).
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    /// `true` when the body was an array.
    pub batch: bool,
    /// The messages, in order.
    pub messages: Vec<Message>,
}

/// Parses `bytes` as one JSON value, strictly (see the module's docs).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonRpcError> {
    if bytes.len() > MAX_BODY {
        return Err(JsonRpcError::TooLarge);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict { depth: 0 }
        .deserialize(&mut de)
        .map_err(|e| JsonRpcError::Json(e.to_string()))?;
    de.end().map_err(|e| JsonRpcError::Json(e.to_string()))?;
    Ok(value)
}

/// Reads a POST body: one JSON-RPC message, or a non-empty batch of them.
pub fn read(bytes: &[u8]) -> Result<Body, JsonRpcError> {
    let value = parse_strict(bytes)?;
    let (batch, items) = items(&value)?;
    let messages = items
        .into_iter()
        .map(message)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Body { batch, messages })
}

/// The messages of a value: itself, or the items of a non-empty array.
fn items(value: &Value) -> Result<(bool, Vec<&Value>), JsonRpcError> {
    match value {
        Value::Array(items) if items.is_empty() => {
            Err(JsonRpcError::NotJsonRpc("an empty batch".into()))
        }
        Value::Array(items) => Ok((true, items.iter().collect())),
        other => Ok((false, vec![other])),
    }
}

/// One message, checked for the shape JSON-RPC 2.0 gives it.
fn message(value: &Value) -> Result<Message, JsonRpcError> {
    let bad = |why: &str| Err(JsonRpcError::NotJsonRpc(why.to_owned()));
    let Value::Object(obj) = value else {
        return bad("a message that is not an object");
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return bad("a message without \"jsonrpc\": \"2.0\"");
    }
    let id = obj.get("id").cloned();
    if let Some(id) = &id
        && !matches!(id, Value::String(_) | Value::Number(_) | Value::Null)
    {
        return bad("an id that is not a string, number or null");
    }
    match (
        obj.get("method"),
        obj.contains_key("result") || obj.contains_key("error"),
    ) {
        (Some(Value::String(method)), false) => {
            let tool = (method == TOOLS_CALL)
                .then(|| obj.get("params")?.get("name")?.as_str().map(str::to_owned))
                .flatten();
            Ok(Message {
                kind: if id.is_some() {
                    Kind::Request
                } else {
                    Kind::Notification
                },
                id: id.unwrap_or(Value::Null),
                method: Some(method.clone()),
                tool,
            })
        }
        (Some(_), false) => bad("a method that is not a string"),
        (None, true) if id.is_some() => Ok(Message {
            kind: Kind::Response,
            id: id.unwrap_or(Value::Null),
            method: None,
            tool: None,
        }),
        _ => bad("neither a request, a notification nor a response"),
    }
}

/// A JSON answer with the tools `allowed` rejects taken out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filtered {
    /// The new bytes, when a tool was taken out; `None`: pass the input unchanged.
    pub bytes: Option<Vec<u8>>,
    /// The names of the tools taken out (`?` for a tool without a string name).
    pub hidden: Vec<String>,
}

/// Parses a JSON answer (one message or a batch) and takes out of every result's `tools` list
/// (the shape of a `tools/list` answer, wherever it comes) each tool whose name `allowed`
/// rejects, and each that has no string name.
pub fn filter_tools(
    bytes: &[u8],
    allowed: &dyn Fn(&str) -> bool,
) -> Result<Filtered, JsonRpcError> {
    let mut value = parse_strict(bytes)?;
    for item in items(&value)?.1 {
        message(item)?;
    }
    let mut hidden = Vec::new();
    let mut each = |msg: &mut Value| {
        let Some(tools) = msg
            .get_mut("result")
            .and_then(|r| r.get_mut("tools"))
            .and_then(Value::as_array_mut)
        else {
            return;
        };
        tools.retain(|tool| match tool.get("name").and_then(Value::as_str) {
            Some(name) if allowed(name) => true,
            Some(name) => {
                hidden.push(name.to_owned());
                false
            }
            None => {
                hidden.push("?".to_owned());
                false
            }
        });
    };
    match &mut value {
        Value::Array(items) => items.iter_mut().for_each(&mut each),
        one => each(one),
    }
    if hidden.is_empty() {
        return Ok(Filtered::default());
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| JsonRpcError::Json(e.to_string()))?;
    Ok(Filtered {
        bytes: Some(bytes),
        hidden,
    })
}

/// [`filter_tools`] over a `text/event-stream` as it arrives: each event's `data` is parsed and
/// filtered; an event whose tools list lost a tool is written again (its other fields as they
/// were, the new JSON as one `data` line), every other event passes byte for byte.
#[derive(Debug, Default)]
pub struct SseFilter {
    /// Bytes of the event being received (and lines of it already split).
    buf: Vec<u8>,
    /// Tools taken out so far.
    pub hidden: Vec<String>,
}

impl SseFilter {
    /// Takes the next bytes of the stream; returns what may go to the agent now (every whole
    /// event so far). An event over [`MAX_BODY`], or one whose data is not JSON-RPC, is an
    /// error: the stream must be cut.
    pub fn push(
        &mut self,
        chunk: &[u8],
        allowed: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<u8>, JsonRpcError> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            out.extend_from_slice(&self.event(&event, allowed)?);
        }
        if self.buf.len() > MAX_BODY {
            return Err(JsonRpcError::TooLarge);
        }
        Ok(out)
    }

    /// The stream ended: whatever is left (an event without its blank line) is filtered too.
    pub fn finish(&mut self, allowed: &dyn Fn(&str) -> bool) -> Result<Vec<u8>, JsonRpcError> {
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            return Ok(rest);
        }
        self.event(&rest, allowed)
    }

    /// Filters one event (its bytes up to and including the blank line that ends it).
    fn event(
        &mut self,
        event: &[u8],
        allowed: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<u8>, JsonRpcError> {
        let mut data: Vec<&[u8]> = Vec::new();
        let mut others: Vec<&[u8]> = Vec::new();
        for (line, whole) in lines(event) {
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &[][..]),
            };
            if field == b"data" {
                data.push(value);
            } else if !line.is_empty() {
                others.push(whole);
            }
        }
        // The event's data: its data lines joined by '\n', as a client reads them.
        let data = data.join(&b'\n');
        if data.iter().all(u8::is_ascii_whitespace) {
            // No data (a comment, a priming event with an id only): nothing to judge.
            return Ok(event.to_vec());
        }
        let filtered = filter_tools(&data, allowed)?;
        let Some(json) = filtered.bytes else {
            return Ok(event.to_vec());
        };
        self.hidden.extend(filtered.hidden);
        let mut out = Vec::with_capacity(json.len() + 64);
        for whole in others {
            out.extend_from_slice(whole);
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Ok(out)
    }
}

/// Where the first whole event of `buf` ends (after its blank line), if one is whole. Lines end
/// in CRLF, LF or CR; a CR at the very end may be the first half of a CRLF, so it waits.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some((len, eol)) = line_at(buf, start) {
        let next = start + len + eol;
        if len == 0 {
            return Some(next);
        }
        start = next;
    }
    None
}

/// The line at `start`: its length without the terminator and the terminator's length, if the
/// line is whole.
fn line_at(buf: &[u8], start: usize) -> Option<(usize, usize)> {
    let rest = buf.get(start..)?;
    let i = rest.iter().position(|b| *b == b'\n' || *b == b'\r')?;
    match (rest[i], rest.get(i + 1)) {
        (b'\r', Some(b'\n')) => Some((i, 2)),
        (b'\r', None) => None,
        _ => Some((i, 1)),
    }
}

/// The lines of a whole event: each without and with its terminator (a last line without one
/// is taken as it is).
fn lines(event: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < event.len() {
        match line_at(event, start) {
            Some((len, eol)) => {
                out.push((&event[start..start + len], &event[start..start + len + eol]));
                start += len + eol;
            }
            None => {
                let rest = &event[start..];
                let bare = rest.strip_suffix(b"\r").unwrap_or(rest);
                out.push((bare, rest));
                break;
            }
        }
    }
    out
}

/// A JSON value, strictly: no key twice in an object, at most [`MAX_DEPTH`] levels.
struct Strict {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl Strict {
    fn deeper<E: serde::de::Error>(&self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format!("nested deeper than {MAX_DEPTH}")));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict { depth: inner.depth })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(Strict { depth: inner.depth })?;
            if obj.insert(key.clone(), v).is_some() {
                return Err(A::Error::custom(format!(
                    "the key {key:?} twice in one object"
                )));
            }
        }
        Ok(Value::Object(obj))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(name: &str) -> bool {
        name != "delete_everything"
    }

    #[test]
    fn a_tool_call_is_read_with_its_tool() {
        let b = read(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#).unwrap();
        assert!(!b.batch);
        assert_eq!(
            b.messages,
            vec![Message {
                kind: Kind::Request,
                id: Value::from(3),
                method: Some("tools/call".into()),
                tool: Some("echo".into()),
            }]
        );
    }

    #[test]
    fn a_batch_is_read_item_by_item() {
        let b = read(
            br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},
                 {"jsonrpc":"2.0","id":"a","method":"tools/list"},
                 {"jsonrpc":"2.0","id":7,"result":{}}]"#,
        )
        .unwrap();
        assert!(b.batch);
        let kinds: Vec<Kind> = b.messages.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, [Kind::Notification, Kind::Request, Kind::Response]);
        assert_eq!(b.messages[1].id, Value::from("a"));
    }

    #[test]
    fn what_is_not_json_rpc_is_refused() {
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            b"{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"x\"}",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":7}",
            b"{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"x\"}",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\",\"result\":1}",
            b"{\"jsonrpc\":\"2.0\",\"result\":1}",
            b"[1]",
            b"{\"jsonrpc\":\"2.0\",\"method\":\"x\"} trailing",
            b"\"jsonrpc\"",
        ] {
            assert!(read(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_so_no_parser_sees_another_tool() {
        let e = read(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_everything"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn nesting_is_bounded_below_serde_jsons_own_limit() {
        let nest = |n: usize| {
            format!(
                "{{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":{}1{}}}",
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // The message object is one level, so MAX_DEPTH - 1 arrays fit.
        assert!(read(nest(MAX_DEPTH - 1).as_bytes()).is_ok());
        let e = read(nest(MAX_DEPTH).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("nested deeper"), "{e}");
        // Far past serde_json's 128: refused, without exhausting the stack.
        assert!(read(nest(100_000).as_bytes()).is_err());
    }

    #[test]
    fn size_is_bounded() {
        let pad = " ".repeat(MAX_BODY);
        let body = format!("{{\"jsonrpc\":\"2.0\",\"method\":\"x\"}}{pad}");
        assert_eq!(read(body.as_bytes()), Err(JsonRpcError::TooLarge));
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"delete_everything","inputSchema":{}},{"name":"echo","inputSchema":{}}]}}"#;

    #[test]
    fn a_tools_list_answer_loses_its_denied_tools() {
        let f = filter_tools(LIST.as_bytes(), &allowed).unwrap();
        assert_eq!(f.hidden, vec!["delete_everything".to_owned()]);
        let v: Value = serde_json::from_slice(&f.bytes.unwrap()).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["result"]["tools"][0]["name"], "echo");
        assert_eq!(v["id"], 2);
    }

    #[test]
    fn an_answer_with_nothing_to_take_out_passes_unchanged() {
        let other =
            br#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"1e400x"}]}}"#;
        assert_eq!(filter_tools(other, &allowed).unwrap(), Filtered::default());
        let f = filter_tools(LIST.as_bytes(), &|_| true).unwrap();
        assert_eq!(f, Filtered::default());
    }

    #[test]
    fn a_tool_without_a_string_name_is_taken_out() {
        let f = filter_tools(
            br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":5},{"title":"x"}]}}"#,
            &|_| true,
        )
        .unwrap();
        assert_eq!(f.hidden, vec!["?".to_owned(), "?".to_owned()]);
    }

    #[test]
    fn a_batch_answer_is_filtered_item_by_item() {
        let batch = format!("[{LIST},{LIST}]");
        let f = filter_tools(batch.as_bytes(), &allowed).unwrap();
        assert_eq!(f.hidden.len(), 2);
        let text = String::from_utf8(f.bytes.unwrap()).unwrap();
        assert!(!text.contains("delete_everything"), "{text}");
    }

    #[test]
    fn an_unparsable_answer_is_an_error() {
        assert!(filter_tools(b"<html>", &allowed).is_err());
        assert!(filter_tools(b"{\"tools\":[]}", &allowed).is_err());
    }

    fn sse(input: &[&[u8]]) -> Result<(String, Vec<String>), JsonRpcError> {
        let mut f = SseFilter::default();
        let mut out = Vec::new();
        for chunk in input {
            out.extend(f.push(chunk, &allowed)?);
        }
        out.extend(f.finish(&allowed)?);
        Ok((String::from_utf8(out).unwrap(), f.hidden))
    }

    #[test]
    fn sse_events_are_filtered_as_they_stream_even_split_anywhere() {
        let stream = format!("event: message\r\nid: 9\r\ndata: {LIST}\r\n\r\n: comment\n\n");
        let bytes = stream.as_bytes();
        for cut in 0..bytes.len() {
            let (out, hidden) = sse(&[&bytes[..cut], &bytes[cut..]]).unwrap();
            assert!(!out.contains("delete_everything"), "{cut}: {out}");
            assert!(out.contains("\"echo\""), "{out}");
            assert!(
                out.starts_with("event: message\r\nid: 9\r\ndata: {"),
                "{out}"
            );
            assert!(out.ends_with("\n\n: comment\n\n"), "{out}");
            assert_eq!(hidden, vec!["delete_everything".to_owned()]);
        }
    }

    #[test]
    fn sse_data_split_over_lines_is_joined_before_it_is_read() {
        // Split between two members: the joining newline is whitespace there.
        let (head, tail) = LIST.split_at(LIST.find("\"result\"").unwrap());
        let stream = format!("data: {head}\ndata:{tail}\n\n");
        let (out, hidden) = sse(&[stream.as_bytes()]).unwrap();
        assert_eq!(hidden.len(), 1);
        assert!(!out.contains("delete_everything"));
    }

    #[test]
    fn sse_events_without_tools_pass_byte_for_byte() {
        let stream = "id: 1\r\ndata: \r\n\r\nevent: message\rdata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\r\r";
        let (out, hidden) = sse(&[stream.as_bytes()]).unwrap();
        assert_eq!(out, stream);
        assert!(hidden.is_empty());
    }

    #[test]
    fn an_unparsable_or_oversized_sse_event_is_an_error() {
        assert!(sse(&[b"data: not json\n\n"]).is_err());
        assert!(
            sse(&[b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{},\"result\":{}}\n\n"])
                .is_err()
        );
        // A last event without its blank line is still read.
        assert!(sse(&[b"data: not json"]).is_err());
        let big = vec![b'x'; MAX_BODY + 1];
        assert_eq!(sse(&[b"data: ", &big]), Err(JsonRpcError::TooLarge));
    }
}
