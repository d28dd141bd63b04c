//! The JSON-RPC reader of MCP rules (`egress/src/intercept/jsonrpc.rs`) never panics, and its
//! filters never let a denied tool through: whatever the bytes, a tools list that comes out of
//! `filter_tools`, or out of `SseFilter` fed the bytes in two pieces, names no tool the
//! filter rejects (here: every name starting with `deny`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_egress::intercept::jsonrpc::{self, SseFilter};

fn allowed(name: &str) -> bool {
    !name.starts_with("deny")
}

/// Every tool name in the results' tools lists of one JSON-RPC answer (a message or a batch).
fn listed(value: &serde_json::Value) -> Vec<String> {
    let one = |m: &serde_json::Value| -> Vec<String> {
        m.get("result")
            .and_then(|r| r.get("tools"))
            .and_then(|t| t.as_array())
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|t| t.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    match value {
        serde_json::Value::Array(items) => items.iter().flat_map(one).collect(),
        other => one(other),
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = jsonrpc::read(data);
    if let Ok(f) = jsonrpc::filter_tools(data, &allowed) {
        let out = f.bytes.as_deref().unwrap_or(data);
        let value = jsonrpc::parse_strict(out).expect("what passed must parse");
        assert!(listed(&value).iter().all(|n| allowed(n)), "a denied tool passed");
    }
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut sse = SseFilter::default();
    let mut out = Vec::new();
    let ok = sse
        .push(&data[..cut], &allowed)
        .and_then(|a| {
            out.extend(a);
            sse.push(&data[cut..], &allowed)
        })
        .and_then(|b| {
            out.extend(b);
            sse.finish(&allowed)
        })
        .map(|c| out.extend(c));
    if ok.is_ok() {
        // What the agent gets reads again event by event: unchanged when nothing is denied,
        // and with no denied tool left to take out.
        let mut again = SseFilter::default();
        let mut same = again.push(&out, &|_| true).expect("the output reads again");
        same.extend(again.finish(&|_| true).expect("the output reads again"));
        assert_eq!(same, out);
        let mut check = SseFilter::default();
        check.push(&out, &allowed).expect("the output reads again");
        check.finish(&allowed).expect("the output reads again");
        assert!(check.hidden.is_empty(), "a denied tool passed the SSE filter");
    }
});
