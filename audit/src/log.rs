//! The audit log writer: JSON Lines, one record a line, every record chained and the chain
//! fields written here (so no producer can forget them), signed checkpoints, and the run's
//! own records (start, checkpoint, end: OCSF Event Log Activity, class 1008).
//!
//! A run is every record from a start record (`seq` 0) to its end record. The start record
//! names what the producer says was in force (the egress proxy: the policy's profile digest
//! and signing key), and the audit key; the end record counts the run's records per class and
//! is the completeness marker. The start's `prev` is the hash of the last record already in the
//! file, so runs appended to one file form one chain.
//!
//! Checkpoints: the start, every `records` records or `interval` (on [`Log::tick`]), and the
//! end are signed with the audit key (see `key.rs`).
//!
//! A record that cannot be written does not advance the chain: the next one written takes its
//! `seq` and says, in `unmapped.moat.unwritten_before`, how many were lost before it; a line
//! cut short by the failure is ended with a newline before the next record, so the verifier
//! reads it as a torn line, not a record.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Seek as _, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::chain::{self, GENESIS, Hash};
use crate::key::{AuditKey, PublicKey};
use crate::ocsf::{self, EVENT_LOG_ACTIVITY, Product, Severity, Skeleton, Status};

/// Event Log Activity's activities, as the log's own records use them.
pub const START_ACTIVITY: u32 = 6;
/// The run ended: the completeness marker.
pub const END_ACTIVITY: u32 = 7;
/// OCSF "Other": a checkpoint, or a change of the policy in force (by `activity_name`).
pub const OTHER_ACTIVITY: u32 = 99;
/// `activity_name` of a checkpoint.
pub const CHECKPOINT: &str = "Checkpoint";
/// `activity_name` of a policy change during a run.
pub const POLICY: &str = "Policy";

/// How often checkpoints are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoints {
    /// After this many records since the last checkpoint.
    pub records: u64,
    /// Or on the first [`Log::tick`] this long after it, if any record was written since.
    pub interval: Duration,
}

impl Default for Checkpoints {
    /// Every 1000 records or 10 seconds: a signature costs about 20 µs, a hundredth of what
    /// a thousand records cost to write, and at most ten seconds of records are only chained.
    fn default() -> Self {
        Checkpoints {
            records: 1000,
            interval: Duration::from_secs(10),
        }
    }
}

/// Receives every record once it is written (the OTLP exporter). Must not block.
pub trait Export: Send + Sync {
    /// One written record: its line as written (JSON, chain fields included, newline ended).
    /// A copy of the bytes is all the writer's thread should pay; parsing it is the exporter's.
    fn offer(&self, line: &[u8]);

    /// The run ended: send what is queued, waiting at most `wait` (the process may be about to
    /// exit, which would lose the last batch). Records offered later are not sent.
    fn close(&self, wait: std::time::Duration) {
        let _ = wait;
    }
}

/// How long the end of a run waits for its last records to be exported.
pub const EXPORT_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The writer, and whether the last record was cut short.
struct Sink {
    writer: Box<dyn Write + Send>,
    /// A record was partly written: the next one starts on a new line.
    torn: bool,
}

impl Sink {
    /// Writes one whole line, noting whether a failure left part of it behind.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.torn {
            self.writer.write_all(b"\n")?;
            self.torn = false;
        }
        let mut done = 0;
        while done < line.len() {
            match self.writer.write(&line[done..]) {
                Ok(0) => {
                    self.torn = done > 0;
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.torn = done > 0;
                    return Err(e);
                }
            }
        }
        self.writer.flush()
    }
}

struct State {
    sink: Sink,
    key: Option<AuditKey>,
    /// Within a run (its start written, its end not).
    running: bool,
    /// The next record's `seq`.
    seq: u64,
    /// The last written record's hash.
    prev: Hash,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Records written in this run per class, the run's own records included.
    by_class: BTreeMap<u32, u64>,
    /// Records that could not be written since the last one that was.
    unwritten_before: u64,
    /// Records that could not be written in this run.
    unwritten: u64,
    /// What the producer last said is in force ([`Log::begin`]): every run's start names it,
    /// also a run started after a first attempt to write its start failed.
    subject: Value,
}

/// The audit log.
pub struct Log {
    state: Mutex<State>,
    product: Product,
    every: Checkpoints,
    export: Option<Box<dyn Export>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("product", &self.product.name)
            .finish_non_exhaustive()
    }
}

/// Locks `m`, also after a panic elsewhere (the audit must keep working).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The hash of the last chained record in the file at `path` (GENESIS if it has none, or does
/// not exist): what a new run appended to it links to. Only the file's last 1 MiB is read.
pub fn last_hash(path: &Path) -> io::Result<Hash> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(GENESIS),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    // A device (/dev/null, /dev/full) or a pipe has no records to link to.
    if !meta.is_file() {
        return Ok(GENESIS);
    }
    let from = meta.len().saturating_sub(1 << 20);
    f.seek(io::SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    f.take(1 << 20).read_to_end(&mut tail)?;
    let found = tail
        .split(|b| *b == b'\n')
        .rev()
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .find_map(|rec| {
            rec.pointer("/unmapped/moat/hash")
                .and_then(Value::as_str)
                .and_then(chain::parse_hash)
        });
    Ok(found.unwrap_or(GENESIS))
}

impl Log {
    /// A log written to `out`, its checkpoints signed with `key` (unsigned without one: the
    /// verifier says so), its first record linked to `prev` ([`GENESIS`] for a new file).
    pub fn new(
        out: Box<dyn Write + Send>,
        product: Product,
        key: Option<AuditKey>,
        prev: Hash,
    ) -> Log {
        Log {
            state: Mutex::new(State {
                sink: Sink {
                    writer: out,
                    torn: false,
                },
                key,
                running: false,
                seq: 0,
                prev,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                by_class: BTreeMap::new(),
                unwritten_before: 0,
                unwritten: 0,
                subject: Value::Null,
            }),
            product,
            every: Checkpoints::default(),
            export: None,
        }
    }

    /// Appends to `path`, creating it (mode 0600) if needed, the new run linked to the last
    /// record already there.
    pub fn append_to(path: &Path, product: Product, key: Option<AuditKey>) -> io::Result<Log> {
        use std::os::unix::fs::OpenOptionsExt;
        let prev = last_hash(path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Log::new(Box::new(file), product, key, prev))
    }

    /// Signs checkpoints with `key` from now on (before the first record: the start record
    /// names it).
    pub fn set_key(&mut self, key: AuditKey) {
        lock(&self.state).key = Some(key);
    }

    /// Checkpoints as often as `every` says.
    pub fn set_checkpoints(&mut self, every: Checkpoints) {
        self.every = every;
    }

    /// Sends every record written to `export` too.
    pub fn set_export(&mut self, export: Box<dyn Export>) {
        self.export = Some(export);
    }

    /// The public half of the key that signs the checkpoints, if there is one.
    pub fn public_key(&self) -> Option<PublicKey> {
        lock(&self.state).key.as_ref().map(AuditKey::public)
    }

    /// Starts a run naming `subject` (what was in force: the egress proxy's policy), or, within
    /// a run, records that `subject` is in force from now on (a policy reload).
    pub fn begin(&self, subject: Value) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.subject = subject.clone();
        if st.running {
            let mut rec = self.own_record(OTHER_ACTIVITY, POLICY, Status::Success);
            rec["message"] = json!("policy in force changed");
            set(&mut rec, "policy", subject);
            return self.write(&mut st, rec, false);
        }
        self.start(&mut st)
    }

    /// Appends `record`, its chain fields added; starts a run first if none is open, and signs
    /// a checkpoint after it if one is due.
    pub fn append(&self, record: Value) -> io::Result<()> {
        let mut st = lock(&self.state);
        if !st.running {
            self.start(&mut st)?;
        }
        self.write(&mut st, record, false)?;
        if st.since_checkpoint >= self.every.records {
            // A checkpoint that fails is tried again after the next record.
            let _ = self.checkpoint(&mut st);
        }
        Ok(())
    }

    /// Signs a checkpoint if records were written since the last and `interval` has passed.
    /// The egress proxy calls this every second.
    pub fn tick(&self) {
        let mut st = lock(&self.state);
        if st.running
            && st.since_checkpoint > 0
            && st.last_checkpoint.elapsed() >= self.every.interval
        {
            let _ = self.checkpoint(&mut st);
        }
    }

    /// Ends the run: the signed end record, with the run's record counts per class and `extra`
    /// (the producer's own counts) under `unmapped.moat.end`. A record appended later starts a
    /// new run. Nothing is written if no run is open.
    pub fn finish(&self, extra: Value) -> io::Result<()> {
        let mut st = lock(&self.state);
        if !st.running {
            return Ok(());
        }
        let mut rec = self.own_record(END_ACTIVITY, "Stop", Status::Success);
        let records: u64 = st.by_class.values().sum();
        let by_class: serde_json::Map<String, Value> = st
            .by_class
            .iter()
            .map(|(class, n)| (class.to_string(), json!(n)))
            .collect();
        let mut end = json!({
            "complete": true,
            // The start record and every one after it, this one not included.
            "records": records,
            "by_class": by_class,
            "unwritten": st.unwritten + st.unwritten_before,
        });
        if let (Value::Object(end), Value::Object(extra)) = (&mut end, extra) {
            end.extend(extra);
        }
        rec["message"] = json!(format!(
            "audit run ended: {records} records before this one, complete"
        ));
        set(&mut rec, "end", end);
        self.write(&mut st, rec, true)?;
        st.running = false;
        drop(st);
        if let Some(export) = &self.export {
            export.close(EXPORT_CLOSE_WAIT);
        }
        Ok(())
    }

    /// The skeleton of the log's own records.
    fn own_record(&self, activity_id: u32, activity_name: &str, status: Status) -> Value {
        let mut rec = Skeleton {
            class: EVENT_LOG_ACTIVITY,
            activity_id,
            activity_name,
            severity: Severity::Informational,
            status: Some(status),
            time: ocsf::now_millis(),
            product: self.product,
        }
        .record();
        rec["log_name"] = json!(self.product.log_name);
        rec["log_provider"] = json!(self.product.name);
        rec
    }

    fn start(&self, st: &mut State) -> io::Result<()> {
        st.seq = 0;
        st.by_class.clear();
        st.unwritten = 0;
        let mut rec = self.own_record(START_ACTIVITY, "Start", Status::Success);
        let key = st.key.as_ref().map(|k| {
            let public = k.public();
            json!({ "fingerprint": public.fingerprint(), "public_key": public.to_line() })
        });
        rec["message"] = json!(match &key {
            Some(_) => "audit run started; checkpoints signed with the audit key",
            None => "audit run started; no audit key: checkpoints are not signed",
        });
        set(&mut rec, "policy", st.subject.clone());
        set(&mut rec, "audit_key", key.unwrap_or(Value::Null));
        self.write(st, rec, true)?;
        st.running = true;
        Ok(())
    }

    fn checkpoint(&self, st: &mut State) -> io::Result<()> {
        let mut rec = self.own_record(OTHER_ACTIVITY, CHECKPOINT, Status::Success);
        rec["message"] = json!(format!(
            "audit checkpoint after {} records",
            st.since_checkpoint
        ));
        self.write(st, rec, true)
    }

    /// Adds the chain fields (and a signature, if `sign` and there is a key), writes the
    /// record, and advances the chain only if it was written.
    fn write(&self, st: &mut State, mut rec: Value, sign: bool) -> io::Result<()> {
        let class = rec["class_uid"]
            .as_u64()
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(0);
        let Some(moat) = ocsf::moat_fields(&mut rec) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an audit record must be a JSON object",
            ));
        };
        moat.insert("seq".into(), json!(st.seq));
        moat.insert("prev".into(), json!(chain::hex(&st.prev)));
        if st.unwritten_before > 0 {
            moat.insert("unwritten_before".into(), json!(st.unwritten_before));
        }
        let hash = chain::hash(&rec);
        if let Some(moat) = ocsf::moat_fields(&mut rec) {
            moat.insert("hash".into(), json!(chain::hex(&hash)));
            if let (true, Some(key)) = (sign, &st.key) {
                moat.insert("signature".into(), json!(key.sign(&hash)));
            }
        }
        let mut line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        line.push(b'\n');
        match st.sink.write_line(&line) {
            Ok(()) => {
                st.seq += 1;
                st.prev = hash;
                *st.by_class.entry(class).or_default() += 1;
                st.unwritten += std::mem::take(&mut st.unwritten_before);
                if sign {
                    st.since_checkpoint = 0;
                    st.last_checkpoint = Instant::now();
                } else {
                    st.since_checkpoint += 1;
                }
                if let Some(export) = &self.export {
                    export.offer(&line);
                }
                Ok(())
            }
            Err(e) => {
                st.unwritten_before += 1;
                Err(e)
            }
        }
    }
}

/// Sets `unmapped.moat.<name>` of `rec`.
fn set(rec: &mut Value, name: &str, value: Value) {
    if let Some(moat) = ocsf::moat_fields(rec) {
        moat.insert(name.into(), value);
    }
}

#[cfg(test)]
mod cost {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An HTTP Activity record as the egress proxy writes one (about 1.2 KB of JSON).
    fn http_record(i: u64) -> Value {
        let mut rec = Skeleton {
            class: crate::ocsf::HTTP_ACTIVITY,
            activity_id: 3,
            activity_name: "Get",
            severity: Severity::Informational,
            status: Some(Status::Success),
            time: 1_765_000_000_000 + i,
            product: Product {
                name: "moat egress proxy",
                log_name: "egress",
            },
        }
        .record();
        let more = json!({
            "action_id": 1, "action": "Allowed", "disposition_id": 1, "disposition": "Allowed",
            "src_endpoint": { "uid": "workspace", "name": "workspace" },
            "dst_endpoint": { "hostname": "api.github.com", "ip": "140.82.112.6", "port": 443 },
            "http_request": {
                "http_method": "GET",
                "url": { "hostname": "api.github.com", "path": "/repos/moat/moat/pulls",
                         "port": 443, "scheme": "https", "query_string": "[redacted]" },
                "version": "HTTP/1.1",
            },
            "http_response": { "code": 200 },
            "firewall_rule": { "name": "github", "uid": "github" },
            "traffic": { "bytes_out": 0, "bytes_in": 5120, "bytes": 5120 },
            "message": "forwarded GET https://api.github.com/repos/moat/moat/pulls -> 200",
            "unmapped": { "moat": { "flow_uid": format!("workspace-{i}"), "request": 1,
                                    "secrets_injected": ["github"] } },
        });
        if let (Value::Object(r), Value::Object(m)) = (&mut rec, more) {
            r.extend(m);
        }
        rec
    }

    /// Records per second on one core: serialised and written (what the audit cost before the
    /// chain), through the chained log (hash, checkpoints every 1000 signed), and with the OTLP
    /// export's share on the writer's thread (a clone into the queue) and on its own thread
    /// (protobuf encoding, per record of a 512-record batch). Writes go to a sink: the disk is
    /// not what is measured.
    /// `cargo test --release -p moat-audit --lib records_per_second -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement, run by hand"]
    fn records_per_second() {
        let n = 100_000u64;
        let records: Vec<Value> = (0..n).map(http_record).collect();
        let rate = |d: Duration| n as f64 / d.as_secs_f64();

        let mut sink = std::io::sink();
        let t = Instant::now();
        for r in &records {
            let mut line = serde_json::to_vec(r).unwrap();
            line.push(b'\n');
            sink.write_all(&line).unwrap();
        }
        let plain = t.elapsed();

        // The producers hand their record over; the bench clones it, which this much is.
        let t = Instant::now();
        for r in &records {
            std::hint::black_box(r.clone());
        }
        let clone = t.elapsed();

        let log = Log::new(
            Box::new(std::io::sink()),
            Product {
                name: "bench",
                log_name: "bench",
            },
            AuditKey::ephemeral().ok(),
            GENESIS,
        );
        let t = Instant::now();
        for r in &records {
            log.append(r.clone()).unwrap();
        }
        let chained = t.elapsed();

        // The export's share on the writer's thread: what `Exporter::offer` does (a copy of
        // the line into the bounded queue), without the exporter's thread competing for the
        // core; and that thread's share (parsing the line back, encoding the batch), alone.
        struct Offer(tokio::sync::mpsc::Sender<Vec<u8>>);
        impl Export for Offer {
            fn offer(&self, line: &[u8]) {
                let _ = self.0.try_send(line.to_vec());
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(usize::try_from(n).unwrap() + 16);
        let mut log = Log::new(
            Box::new(std::io::sink()),
            Product {
                name: "bench",
                log_name: "bench",
            },
            AuditKey::ephemeral().ok(),
            GENESIS,
        );
        log.set_export(Box::new(Offer(tx)));
        let t = Instant::now();
        for r in &records {
            log.append(r.clone()).unwrap();
        }
        let exported = t.elapsed();
        let mut lines = Vec::new();
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }

        let t = Instant::now();
        let mut bytes = 0;
        let mut batch = Vec::with_capacity(512);
        for line in lines {
            batch.extend(crate::export::parse_line(line));
            if batch.len() == 512 {
                bytes += crate::export::encode("bench", &batch).len();
                batch.clear();
            }
        }
        bytes += crate::export::encode("bench", &batch).len();
        let encode = t.elapsed();

        let sample = serde_json::to_vec(&records[0]).unwrap().len();
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        eprintln!(
            "clone (in the chained figures, not in production): {:.2} us",
            us(clone)
        );
        eprintln!(
            "record of {sample} B: written {:.0}/s ({:.2} us); chained {:.0}/s ({:.2} us); \
             chained + export queue {:.0}/s ({:.2} us); export thread (parse, encode) \
             {:.0}/s ({:.2} us, {} B/record)",
            rate(plain),
            plain.as_secs_f64() * 1e6 / n as f64,
            rate(chained),
            chained.as_secs_f64() * 1e6 / n as f64,
            rate(exported),
            exported.as_secs_f64() * 1e6 / n as f64,
            rate(encode),
            encode.as_secs_f64() * 1e6 / n as f64,
            bytes / usize::try_from(n).unwrap(),
        );
    }
}
