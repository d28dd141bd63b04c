//! Verifies an audit log: every record's hash, the chain of `seq` and `prev` from record to
//! record and from run to run, every checkpoint's signature, and that every run ends in its
//! end record with the counts it claims. Each finding names the line it is at.
//!
//! What a verified log proves, and what it does not, is in docs/audit.md.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::chain::{self, Hash};
use crate::key::PublicKey;
use crate::log::{CHECKPOINT, END_ACTIVITY, OTHER_ACTIVITY, START_ACTIVITY};
use crate::ocsf::EVENT_LOG_ACTIVITY;

/// What is wrong at one place of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The record's content does not match its hash: it was changed after it was written.
    Edited,
    /// `seq` jumps forward: records before this one are missing.
    Missing {
        /// The `seq` expected here.
        expected: u64,
        /// The `seq` found.
        found: u64,
    },
    /// `seq` repeats or goes back: this record was inserted, or records were reordered.
    OutOfOrder {
        /// The `seq` expected here.
        expected: u64,
        /// The `seq` found.
        found: u64,
    },
    /// The `seq` is the one expected but `prev` is not the hash of the record before: a record
    /// before it was replaced, or records were removed and others put in their place.
    Unlinked,
    /// A run starts where the one before had not ended, or a new run does not link to the
    /// record before it.
    RunUnlinked,
    /// A signed record's signature does not verify: the records up to it were rewritten (and
    /// rehashed), or it was signed by another key.
    BadSignature,
    /// The run is signed by a key other than the one given to check it with.
    WrongKey {
        /// The fingerprint of the key the run names.
        found: String,
    },
    /// A checkpoint without a signature (the writer had no key).
    Unsigned,
    /// A line without chain fields, or not a JSON object, where a record should be.
    NotChained,
    /// The end record's counts are not what the run holds.
    CountMismatch {
        /// What the end record says.
        claimed: u64,
        /// What the run holds.
        found: u64,
    },
    /// Records after the run's end record, before any new run's start.
    AfterEnd,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Edited => write!(
                f,
                "record changed after it was written (its hash does not match its content)"
            ),
            Finding::Missing { expected, found } => write!(
                f,
                "records missing before this one: seq {found} where {expected} was expected"
            ),
            Finding::OutOfOrder { expected, found } => write!(
                f,
                "record inserted or out of order: seq {found} where {expected} was expected"
            ),
            Finding::Unlinked => write!(
                f,
                "record does not follow the one before it (prev is not its hash): a record \
                 before it was replaced"
            ),
            Finding::RunUnlinked => write!(
                f,
                "run does not link to the record before it: records between them were removed \
                 or changed"
            ),
            Finding::BadSignature => write!(
                f,
                "signature does not verify: records up to here were rewritten, or signed by \
                 another key"
            ),
            Finding::WrongKey { found } => {
                write!(f, "run signed by key {found}, not the key given")
            }
            Finding::Unsigned => write!(f, "checkpoint not signed (the writer had no audit key)"),
            Finding::NotChained => write!(f, "not a chained audit record"),
            Finding::CountMismatch { claimed, found } => write!(
                f,
                "end record counts {claimed} records, the run holds {found}"
            ),
            Finding::AfterEnd => write!(f, "record after its run's end record"),
        }
    }
}

/// One run of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The line of its start record.
    pub start_line: usize,
    /// The line of its end record, if it has one.
    pub end_line: Option<usize>,
    /// The line of its last signed record whose signature verified.
    pub last_checkpoint: Option<usize>,
    /// Its records, the start and end included.
    pub records: u64,
    /// The fingerprint of the key its start record names.
    pub key: Option<String>,
    /// The policy its start record names (and any later policy record).
    pub policy: Vec<Value>,
}

/// The verifier's findings over one log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Chained records read.
    pub records: u64,
    /// The runs, in order.
    pub runs: Vec<Run>,
    /// What is wrong, by line (1-based).
    pub findings: Vec<(usize, Finding)>,
    /// Lines that are not records and that the chain steps over intact: lines a failed write
    /// cut short (the writer ends them with a newline before the next record).
    pub torn: Vec<usize>,
    /// Records lost to write failures, as the records after them say
    /// (`unwritten_before`), by line.
    pub unwritten: Vec<(usize, u64)>,
    /// Whether the signatures were checked against a key given from outside the log.
    pub key_given: bool,
}

impl Report {
    /// No record was changed, removed, inserted or moved, and every signature verified.
    pub fn intact(&self) -> bool {
        self.findings.is_empty()
    }

    /// Intact, and every run ends in its end record.
    pub fn complete(&self) -> bool {
        self.intact() && self.runs.iter().all(|r| r.end_line.is_some()) && !self.runs.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (line, finding) in &self.findings {
            writeln!(f, "line {line}: {finding}")?;
        }
        for line in &self.torn {
            writeln!(
                f,
                "line {line}: a record cut short by a failed write (not part of the chain)"
            )?;
        }
        for (line, n) in &self.unwritten {
            writeln!(
                f,
                "line {line}: {n} record(s) could not be written before this one (the audit was \
                 failing; new flows were refused meanwhile)"
            )?;
        }
        for run in &self.runs {
            match (run.end_line, run.last_checkpoint) {
                (Some(end), _) => writeln!(
                    f,
                    "run at lines {}-{end}: {} records, complete",
                    run.start_line, run.records
                )?,
                (None, Some(cp)) => writeln!(
                    f,
                    "run at line {}: {} records, no end record: the log ends (cut, or its writer \
                     crashed or still runs) after line {cp}, the last signed checkpoint; records \
                     after it are chained but not signed",
                    run.start_line, run.records
                )?,
                (None, None) => writeln!(
                    f,
                    "run at line {}: {} records, no end record and no verified checkpoint",
                    run.start_line, run.records
                )?,
            }
        }
        let verdict = if !self.intact() {
            "TAMPERED"
        } else if self.complete() {
            "intact and complete"
        } else {
            "intact but INCOMPLETE"
        };
        let key = if self.key_given {
            "signatures checked against the given key"
        } else {
            "signatures checked against the key the log names (give --pubkey to check it is yours)"
        };
        write!(f, "{} records: {verdict}; {key}", self.records)
    }
}

struct Rec<'a> {
    seq: Option<u64>,
    prev: Option<Hash>,
    hash: Option<Hash>,
    signature: Option<&'a str>,
    class: Option<u64>,
    activity: Option<u64>,
    activity_name: Option<&'a str>,
    moat: &'a serde_json::Map<String, Value>,
}

fn fields(v: &Value) -> Option<Rec<'_>> {
    let moat = v.pointer("/unmapped/moat")?.as_object()?;
    Some(Rec {
        seq: moat.get("seq").and_then(Value::as_u64),
        prev: moat
            .get("prev")
            .and_then(Value::as_str)
            .and_then(chain::parse_hash),
        hash: moat
            .get("hash")
            .and_then(Value::as_str)
            .and_then(chain::parse_hash),
        signature: moat.get("signature").and_then(Value::as_str),
        class: v.get("class_uid").and_then(Value::as_u64),
        activity: v.get("activity_id").and_then(Value::as_u64),
        activity_name: v.get("activity_name").and_then(Value::as_str),
        moat,
    })
}

/// Verifies the log `text`; signatures against `key` if given, else against the key each run's
/// start record names.
pub fn verify(text: &str, key: Option<&PublicKey>) -> Report {
    let mut report = Report {
        key_given: key.is_some(),
        ..Report::default()
    };
    // The last good record: its line, seq and hash.
    let mut last: Option<(u64, Hash)> = None;
    let mut run_key: Option<PublicKey> = None;
    let mut ended = false;
    let mut by_class: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            report.torn.push(lineno);
            continue;
        };
        let Some(rec) = fields(&value) else {
            report.findings.push((lineno, Finding::NotChained));
            continue;
        };
        let (Some(seq), Some(prev), Some(hash)) = (rec.seq, rec.prev, rec.hash) else {
            report.findings.push((lineno, Finding::NotChained));
            continue;
        };
        report.records += 1;
        let own = rec.class == Some(u64::from(EVENT_LOG_ACTIVITY.uid));
        let is_start = own && rec.activity == Some(u64::from(START_ACTIVITY)) && seq == 0;
        let is_end = own && rec.activity == Some(u64::from(END_ACTIVITY));
        let is_checkpoint = own
            && rec.activity == Some(u64::from(OTHER_ACTIVITY))
            && rec.activity_name == Some(CHECKPOINT);
        if chain::hash(&value) != hash {
            report.findings.push((lineno, Finding::Edited));
        }
        if let Some(n) = rec.moat.get("unwritten_before").and_then(Value::as_u64) {
            report.unwritten.push((lineno, n));
        }
        if is_start {
            // A run before without its end record (a crash) leaves the chain whole; the report
            // says that run is incomplete.
            let linked = match last {
                Some((_, h)) => prev == h,
                // The log's first record: a new file, or one whose earlier records were
                // rotated away (its prev says so).
                None => true,
            };
            if !linked {
                report.findings.push((lineno, Finding::RunUnlinked));
            }
            run_key = rec
                .moat
                .get("audit_key")
                .and_then(|k| k.get("public_key"))
                .and_then(Value::as_str)
                .and_then(|s| PublicKey::parse(s).ok());
            if let (Some(given), Some(named)) = (key, &run_key)
                && given != named
            {
                report.findings.push((
                    lineno,
                    Finding::WrongKey {
                        found: named.fingerprint(),
                    },
                ));
            }
            let policy = rec.moat.get("policy").cloned().unwrap_or(Value::Null);
            report.runs.push(Run {
                start_line: lineno,
                end_line: None,
                last_checkpoint: None,
                records: 0,
                key: run_key.map(|k| k.fingerprint()),
                policy: vec![policy],
            });
            ended = false;
            by_class.clear();
        } else {
            if report.runs.is_empty() {
                // The log starts inside a run: its start was cut (or rotated) away.
                report.runs.push(Run {
                    start_line: lineno,
                    end_line: None,
                    last_checkpoint: None,
                    records: 0,
                    key: None,
                    policy: Vec::new(),
                });
                report.findings.push((
                    lineno,
                    Finding::Missing {
                        expected: 0,
                        found: seq,
                    },
                ));
            } else if ended {
                report.findings.push((lineno, Finding::AfterEnd));
            }
            if let Some((last_seq, last_hash)) = last {
                let expected = last_seq + 1;
                if seq > expected {
                    report.findings.push((
                        lineno,
                        Finding::Missing {
                            expected,
                            found: seq,
                        },
                    ));
                } else if seq < expected {
                    report.findings.push((
                        lineno,
                        Finding::OutOfOrder {
                            expected,
                            found: seq,
                        },
                    ));
                } else if prev != last_hash {
                    report.findings.push((lineno, Finding::Unlinked));
                }
            }
            if own
                && rec.activity == Some(u64::from(OTHER_ACTIVITY))
                && let (Some(run), Some(policy)) = (report.runs.last_mut(), rec.moat.get("policy"))
            {
                run.policy.push(policy.clone());
            }
        }
        // Signatures: the start, every checkpoint and the end are signed.
        if is_start || is_end || is_checkpoint {
            match (rec.signature, key.or(run_key.as_ref())) {
                (Some(sig), Some(k)) => {
                    if k.verify(&hash, sig) && chain::hash(&value) == hash {
                        if let Some(run) = report.runs.last_mut() {
                            run.last_checkpoint = Some(lineno);
                        }
                    } else {
                        report.findings.push((lineno, Finding::BadSignature));
                    }
                }
                (None, _) | (_, None) => report.findings.push((lineno, Finding::Unsigned)),
            }
        }
        let class = rec.class.unwrap_or(0);
        if let Some(run) = report.runs.last_mut() {
            run.records += 1;
            if is_end {
                run.end_line = Some(lineno);
                let claimed = rec
                    .moat
                    .get("end")
                    .and_then(|e| e.get("records"))
                    .and_then(Value::as_u64);
                let found: u64 = by_class.values().sum();
                if claimed != Some(found) {
                    report.findings.push((
                        lineno,
                        Finding::CountMismatch {
                            claimed: claimed.unwrap_or(0),
                            found,
                        },
                    ));
                }
                ended = true;
            }
        }
        *by_class.entry(class).or_default() += 1;
        last = Some((seq, hash));
    }
    report
}
