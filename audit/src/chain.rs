//! The hash chain: every record carries, under `unmapped.moat`, its sequence number in the run
//! (`seq`), the previous record's hash (`prev`) and its own (`hash`): SHA-256 over the
//! record's canonical serialisation, which is its JSON with every object's keys sorted, no
//! insignificant whitespace, and without `unmapped.moat.hash` and `unmapped.moat.signature`
//! (a checkpoint's signature is over the hash, so it cannot be inside it).

use ring::digest::{SHA256, digest};
use serde_json::Value;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev` of the first record of a log that had none before it.
pub const GENESIS: Hash = [0; 32];

/// Writes `v` canonically: keys sorted by their UTF-8 bytes at every level, serde_json's
/// compact output for everything else (its escaping is deterministic).
fn canonical_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // A string key serialises as a JSON string; cannot fail into a Vec.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                if let Some(v) = map.get(k) {
                    canonical_into(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_into(item, out);
            }
            out.push(b']');
        }
        scalar => push_json(scalar, out),
    }
}

fn push_json(v: &Value, out: &mut Vec<u8>) {
    // Writing a scalar `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// The canonical serialisation of `record`, the chain fields `hash` and `signature` left out.
pub fn canonical(record: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let stripped = strip(record);
    canonical_into(stripped.as_ref().unwrap_or(record), &mut out);
    out
}

/// `record` without `unmapped.moat.hash` and `.signature`, if it has either.
fn strip(record: &Value) -> Option<Value> {
    let moat = record.get("unmapped")?.get("moat")?.as_object()?;
    if !moat.contains_key("hash") && !moat.contains_key("signature") {
        return None;
    }
    let mut copy = record.clone();
    if let Some(m) = copy
        .get_mut("unmapped")
        .and_then(|u| u.get_mut("moat"))
        .and_then(Value::as_object_mut)
    {
        m.remove("hash");
        m.remove("signature");
    }
    Some(copy)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The record's hash: SHA-256 of its canonical serialisation.
pub fn hash(record: &Value) -> Hash {
    sha256(&canonical(record))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses 64 hex digits.
pub fn parse_hash(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_sorts_keys_at_every_level_and_leaves_out_hash_and_signature() {
        let rec = json!({
            "b": 1, "a": [{"z": "é", "y": null}],
            "unmapped": {"moat": {"seq": 3, "hash": "x", "signature": "y", "prev": "p"}},
        });
        assert_eq!(
            String::from_utf8(canonical(&rec)).unwrap(),
            r#"{"a":[{"y":null,"z":"é"}],"b":1,"unmapped":{"moat":{"prev":"p","seq":3}}}"#
        );
    }

    #[test]
    fn the_hash_changes_with_any_field_but_not_with_the_hash_field() {
        let rec = json!({"a": 1, "unmapped": {"moat": {"seq": 0}}});
        let mut hashed = rec.clone();
        hashed["unmapped"]["moat"]["hash"] = json!("anything");
        assert_eq!(hash(&rec), hash(&hashed));
        let mut edited = rec.clone();
        edited["a"] = json!(2);
        assert_ne!(hash(&rec), hash(&edited));
    }

    #[test]
    fn hex_round_trips() {
        let h = hash(&json!({}));
        assert_eq!(parse_hash(&hex(&h)), Some(h));
        assert_eq!(parse_hash("zz"), None);
    }
}
