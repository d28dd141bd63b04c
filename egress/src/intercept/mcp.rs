//! MCP rules on an intercepted flow: the streamable HTTP transport's requests to the rule's MCP
//! endpoint are read as JSON-RPC (jsonrpc.rs) and judged message by message, and its answers
//! have the tools the rules deny taken out of every `tools/list` result before a byte of them
//! reaches the agent.
//!
//! ```text
//!  request on the endpoint path (http.rs, after the HTTP rules)
//!    POST    body read whole (at most jsonrpc::MAX_BODY: else 413), parsed strictly (else
//!            400), every message judged: any denied -> 403 with a JSON-RPC error per request
//!            naming the rule, nothing forwarded; all allowed -> the bytes as received
//!    GET     the server's SSE stream: forwarded, its events filtered like any answer
//!    DELETE  the session's end: forwarded
//!    other   403 (the transport has no other method)
//!  answer (2xx)
//!    application/json     read whole (bounded), parsed, tools lists filtered
//!    text/event-stream    event by event as it streams (each bounded), same filter
//!    empty                passed
//!    anything else        refused: 502 (fail closed)
//! ```
//!
//! A batch is refused whole when one of its messages is denied: forwarding the others would
//! mean merging the upstream's answer (JSON or a stream) with the proxy's errors, and an agent
//! that sent them together may rely on them going together. Answers to the server's own
//! requests (a client's `result` or `error`) are not judged: they carry no method.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use moat_policy::{HttpAction, McpRules};
use serde_json::{Value, json};

use super::BodyError;
use super::inject::Refusal;
use super::jsonrpc::{self, JsonRpcError, Kind, MAX_BODY, SseFilter};
use crate::outcome::Reason;

/// The JSON-RPC error code of a message the egress policy refuses (in the range JSON-RPC
/// leaves to implementations, -32000 to -32099).
pub const POLICY_ERROR: i64 = -32001;

/// A request to an intercept rule's MCP endpoint.
pub(crate) struct Endpoint {
    rules: McpRules,
    rule: String,
}

/// A refusal of an MCP request: the audited refusal, and the JSON-RPC answer the agent gets
/// instead of a text page, where there is one.
pub(crate) struct McpRefusal {
    pub(crate) refusal: Refusal,
    pub(crate) json: Option<Vec<u8>>,
    /// What the audit record says of the messages.
    pub(crate) note: Option<Value>,
}

impl From<Refusal> for McpRefusal {
    fn from(refusal: Refusal) -> Self {
        McpRefusal {
            refusal,
            json: None,
            note: None,
        }
    }
}

/// The request's endpoint, when the flow's rule has MCP rules and the request is for their
/// endpoint. Where the endpoint is one path, the request's path is normalised first (and sent
/// upstream in that form, as for HTTP rules); a path with no normal form is refused, and so is
/// an HTTP method the transport does not have (before the body is read).
pub(crate) fn endpoint(
    rule: &moat_policy::Rule,
    method: &Method,
    uri: &mut Uri,
) -> Result<Option<Endpoint>, Refusal> {
    let Some(rules) = &rule.mcp else {
        return Ok(None);
    };
    if rules.path.is_some() {
        super::inject::set_normal_path(uri, |why| Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: Reason::RequestRefused,
            detail: format!(
                "the request path cannot be normalised for rule {:?}'s MCP rules: {why}",
                rule.name
            ),
        })?;
    }
    if !rules.covers(uri.path()) {
        return Ok(None);
    }
    if ![Method::POST, Method::GET, Method::DELETE].contains(method) {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: Reason::McpDenied,
            detail: format!(
                "{method} is not part of MCP's streamable HTTP transport (POST, GET, DELETE): \
                 refused on rule {:?}'s MCP endpoint",
                rule.name
            ),
        });
    }
    Ok(Some(Endpoint {
        rules: rules.clone(),
        rule: rule.name.clone(),
    }))
}

impl Endpoint {
    /// Judges a request to the endpoint; returns the body to forward and what the audit record
    /// says of its messages.
    pub(crate) async fn check_request(
        &self,
        method: &Method,
        headers: &mut HeaderMap,
        body: Incoming,
    ) -> Result<(RequestBody, Option<Value>), McpRefusal> {
        if *method == Method::GET || *method == Method::DELETE {
            return Ok((body.map_err(BodyError::from).boxed_unsync(), None));
        }
        let bytes = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                let too_large = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                let (status, detail) = if too_large {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the JSON-RPC body is over {MAX_BODY} bytes"),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("the JSON-RPC body could not be read: {e}"),
                    )
                };
                return Err(malformed(status, detail, None));
            }
        };
        let parsed = jsonrpc::read(&bytes).map_err(|e| {
            let code = match e {
                JsonRpcError::NotJsonRpc(_) => -32600,
                _ => -32700,
            };
            let status = if e == JsonRpcError::TooLarge {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            let detail = format!("the body on rule {:?}'s MCP endpoint is {e}", self.rule);
            let answer = error_message(&Value::Null, code, &format!("moat egress: {detail}"), None);
            malformed(status, detail, Some(answer))
        })?;
        let mut seen = Vec::new();
        let mut denied = Vec::new();
        for m in &parsed.messages {
            let Some(name) = m.method.as_deref() else {
                seen.push(json!({ "response": true }));
                continue;
            };
            let verdict = self.rules.decide(name, m.tool.as_deref());
            let mut entry = json!({ "method": name, "mcp_rule": verdict.rule_name() });
            if let Some(tool) = &m.tool {
                entry["tool"] = json!(tool);
            }
            seen.push(entry);
            if verdict.action == HttpAction::Deny {
                denied.push((m, verdict));
            }
        }
        let note = json!({ "messages": seen, "batch": parsed.batch });
        let Some((first, verdict)) = denied.first() else {
            headers.remove(http::header::TRANSFER_ENCODING);
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            let body = Full::new(bytes).map_err(|n| match n {}).boxed_unsync();
            return Ok((body, Some(note)));
        };
        let what = |m: &jsonrpc::Message| match (&m.method, &m.tool) {
            (Some(method), Some(tool)) => format!("{method} of tool {tool:?}"),
            (Some(method), None) => method.clone(),
            (None, _) => "a response".to_owned(),
        };
        let why = |m: &jsonrpc::Message, v: &moat_policy::McpVerdict| {
            format!(
                "{} is denied by {} of rule {:?}'s MCP rules",
                what(m),
                v.rule_name(),
                self.rule
            )
        };
        let detail = if parsed.batch {
            format!(
                "a batch of {} messages is refused whole: {}",
                parsed.messages.len(),
                why(first, verdict)
            )
        } else {
            why(first, verdict)
        };
        let data = |v: &moat_policy::McpVerdict| json!({ "reason": Reason::McpDenied.code(), "rule": self.rule, "mcp_rule": v.rule_name() });
        // One error per request of the batch (JSON-RPC answers no notification): the denied
        // ones say why, the others that they went unsent with them.
        let answer = if parsed.batch && parsed.messages.iter().any(|m| m.kind == Kind::Request) {
            let errors: Vec<Value> = parsed
                .messages
                .iter()
                .filter(|m| m.kind == Kind::Request)
                .map(|m| match denied.iter().find(|(d, _)| std::ptr::eq(*d, m)) {
                    Some((_, v)) => error_value(
                        &m.id,
                        POLICY_ERROR,
                        &format!("moat egress refused this request: {}", why(m, v)),
                        Some(data(v)),
                    ),
                    None => error_value(
                        &m.id,
                        POLICY_ERROR,
                        &format!("moat egress did not send this request: {detail}"),
                        Some(data(verdict)),
                    ),
                })
                .collect();
            serde_json::to_vec(&errors).unwrap_or_default()
        } else {
            let id = if first.kind == Kind::Request {
                first.id.clone()
            } else {
                Value::Null
            };
            error_message(
                &id,
                POLICY_ERROR,
                &format!("moat egress refused this request: {detail}"),
                Some(data(verdict)),
            )
        };
        Err(McpRefusal {
            refusal: Refusal {
                status: StatusCode::FORBIDDEN,
                reason: Reason::McpDenied,
                detail,
            },
            json: Some(answer),
            note: Some(note),
        })
    }

    /// Filters an answer from the endpoint (see the module's docs). A 2xx answer that is not
    /// JSON-RPC is refused (502) when it can still be; an SSE stream that stops being JSON-RPC
    /// is cut, and `seen` says why for the audit record.
    pub(crate) async fn filter_response(
        &self,
        parts: &mut http::response::Parts,
        body: Incoming,
    ) -> Result<(ResponseBody, Seen), Refusal> {
        let seen = Seen::default();
        let pass = |body: Incoming| body.map_err(BodyError::from).boxed();
        if !parts.status.is_success() || body.is_end_stream() {
            return Ok((pass(body), seen));
        }
        let refuse = |detail: String| Refusal {
            status: StatusCode::BAD_GATEWAY,
            reason: Reason::McpResponseRefused,
            detail: format!("the answer on rule {:?}'s MCP endpoint {detail}", self.rule),
        };
        let media = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let rules = self.rules.clone();
        match media.as_str() {
            "application/json" => {
                let bytes = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => return Err(refuse(format!("could not be read whole: {e}"))),
                };
                let filtered =
                    jsonrpc::filter_tools(&bytes, &|t| rules.tool(t).action == HttpAction::Allow)
                        .map_err(|e| refuse(format!("is {e}")))?;
                let bytes = match filtered.bytes {
                    Some(new) => {
                        seen.hide(filtered.hidden);
                        Bytes::from(new)
                    }
                    None => bytes,
                };
                parts.headers.remove(http::header::TRANSFER_ENCODING);
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Ok((Full::new(bytes).map_err(|n| match n {}).boxed(), seen))
            }
            "text/event-stream" => {
                // Events can change length: the stream is framed by the connection instead.
                parts.headers.remove(http::header::CONTENT_LENGTH);
                let body = SseBody {
                    inner: body,
                    filter: SseFilter::default(),
                    rules,
                    seen: seen.clone(),
                    done: false,
                };
                Ok((body.boxed(), seen))
            }
            other => Err(refuse(format!(
                "has content type {other:?}, neither application/json nor text/event-stream"
            ))),
        }
    }
}

/// A request's body on its way upstream (before the placeholder scan).
pub(crate) type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// An answer's body on its way to the agent.
pub(crate) type ResponseBody = BoxBody<Bytes, BodyError>;

/// What filtering an answer came to, for its audit record (filled in as an SSE stream runs).
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen(Arc<Mutex<SeenInner>>);

#[derive(Debug, Default)]
struct SeenInner {
    hidden: Vec<String>,
    problem: Option<String>,
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeenInner> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn hide(&self, tools: Vec<String>) {
        self.lock().hidden.extend(tools);
    }

    /// Why the stream was cut, if it was.
    pub(crate) fn problem(&self) -> Option<String> {
        self.lock().problem.clone()
    }

    /// The tools taken out of the answer, for the audit record.
    pub(crate) fn hidden(&self) -> Vec<String> {
        self.lock().hidden.clone()
    }
}

/// An SSE answer, filtered event by event ([`SseFilter`]); what does not parse ends it with an
/// error (the agent sees the stream cut, never the event).
struct SseBody {
    inner: Incoming,
    filter: SseFilter,
    rules: McpRules,
    seen: Seen,
    done: bool,
}

impl SseBody {
    fn fail(&mut self, e: &JsonRpcError) -> BodyError {
        self.done = true;
        let why = format!("SSE event is {e}: the stream was cut");
        self.seen.lock().problem = Some(why.clone());
        BodyError(why)
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let rules = &this.rules;
            let allowed = |t: &str| rules.tool(t).action == HttpAction::Allow;
            let out = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    // Trailers carry no events.
                    Err(_) => continue,
                    Ok(data) => this.filter.push(&data, &allowed),
                },
                Poll::Ready(None) => {
                    this.done = true;
                    this.filter.finish(&allowed)
                }
            };
            let hidden = std::mem::take(&mut this.filter.hidden);
            if !hidden.is_empty() {
                this.seen.hide(hidden);
            }
            match out {
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes))))),
                Err(e) => return Poll::Ready(Some(Err(this.fail(&e)))),
            }
        }
    }
}

fn malformed(status: StatusCode, detail: String, json: Option<Vec<u8>>) -> McpRefusal {
    McpRefusal {
        refusal: Refusal {
            status,
            reason: Reason::McpMalformed,
            detail,
        },
        json,
        note: None,
    }
}

fn error_value(id: &Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({ "code": code, "message": message });
    if let Some(data) = data {
        error["data"] = data;
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": error })
}

fn error_message(id: &Value, code: i64, message: &str, data: Option<Value>) -> Vec<u8> {
    serde_json::to_vec(&error_value(id, code, message, data)).unwrap_or_default()
}
