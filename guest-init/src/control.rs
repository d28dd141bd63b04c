//! The VM backend's control stream, on vsock port [`CONTROL_VSOCK_PORT`] (on the host
//! `<uds>_1027`, served by `moat run`). Guest-init connects once at boot; the host writes one
//! JSON line, the [`VmWorkspace`] to run, and later, when `moat run` gets SIGTERM or SIGHUP, a
//! [`VmSignal`] line to pass on to the agent; when the agent is done guest-init writes one JSON
//! line back, the [`VmOutcome`], and powers the VM off. If the stream ends before that (a
//! snapshot resets the VM's vsock transport), guest-init connects again and asks to
//! [`VmReattach`]; the same host answers [`VmReattached`] and the stream goes on there.
//!
//! The host is trusted here (it boots the VM); the guest's answer is only a status the host
//! reports, never a path, port or identity it acts on.

use std::io::{self, BufRead};

use serde::{Deserialize, Serialize};

/// Host vsock port of egress flows (the egress proxy's `<uds>_1025`).
pub const EGRESS_VSOCK_PORT: u32 = 1025;
/// Host vsock port of process events (`<uds>_1026`).
pub const AUDIT_VSOCK_PORT: u32 = 1026;
/// Host vsock port of the control stream (`<uds>_1027`).
pub const CONTROL_VSOCK_PORT: u32 = 1027;
/// Longest control line either side accepts (a corporate CA bundle fits).
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// What the host asks the VM to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmWorkspace {
    /// The workspace hostname.
    pub hostname: String,
    /// argv of the agent; empty means an interactive login shell.
    pub command: Vec<String>,
    /// Extra environment for the agent (credential placeholders and the like).
    pub env: Vec<(String, String)>,
    /// CA certificates (PEM) the workspace trusts besides the root image's: always the egress
    /// proxy's workspace CA.
    pub ca_pem: String,
    /// The agent gets the serial console as its controlling terminal; otherwise it gets no
    /// input and its output passes through unchanged.
    pub interactive: bool,
    /// The host terminal's size (0: unknown).
    pub rows: u16,
    /// The host terminal's size (0: unknown).
    pub cols: u16,
    /// SSH sessions through the trusted access broker (vsock port 22), if the workspace takes
    /// them.
    #[serde(default)]
    pub ssh: Option<crate::session::SshService>,
    /// The highest flow header version the host's egress proxy reads (absent: 1, a host from
    /// before version 2). From 2, flow headers name the program that opened each flow.
    #[serde(default = "flow_header_version_1")]
    pub flow_header_version: u8,
    /// The workspace's services ([`crate::service`]): their models are directories of the root
    /// image, their devices the guest's device nodes (a passed-through GPU's).
    #[serde(default)]
    pub services: Vec<crate::service::ServiceSpec>,
    /// The signed policy's local routes, resolved to the services' ports.
    #[serde(default)]
    pub local_routes: Vec<VmLocalRoute>,
    /// Which machine this is among the restores of one snapshot (0: a machine that booted).
    /// Every restore is a new workspace: its host side made this line (CA, placeholders,
    /// audit) afresh, and guest-init reseeded the kernel's RNG before reading it.
    #[serde(default)]
    pub generation: u64,
    /// guest-init prints its steps after the workspace arrived, with their times, on the
    /// console (`moat run --boot-log`).
    #[serde(default)]
    pub trace_steps: bool,
    /// The host's wall clock when it sent this line (CLOCK_REALTIME, nanoseconds since the
    /// epoch; 0: not given). A restored machine's clock goes on from its snapshot's time, as
    /// far behind as the template is old; guest-init sets it to this before the agent starts
    /// (TLS clients check certificates' validity against it).
    #[serde(default)]
    pub realtime_ns: u64,
}

/// A name the VM's netstack answers with a service on loopback ([`moat_netstack::local`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLocalRoute {
    /// The name.
    pub host: String,
    /// The port the agent connects to on it.
    pub port: u16,
    /// The service's loopback port.
    pub service_port: u16,
}

impl From<&VmLocalRoute> for moat_netstack::LocalRoute {
    fn from(r: &VmLocalRoute) -> Self {
        moat_netstack::LocalRoute {
            host: r.host.clone(),
            port: r.port,
            target: std::net::SocketAddr::from(([127, 0, 0, 1], r.service_port)),
        }
    }
}

/// The host's first line to a VM that is not to run a workspace yet, instead of a workspace.
///
/// `Standby` (a template's host): wait for one without a time limit. guest-init answers
/// [`VmStandingBy::StandingBy`] and waits; the host snapshots the VM there, before anything of
/// a workspace exists in it. A restore of that snapshot resets the vsock transport, which ends
/// the wait: guest-init reseeds the RNG, connects the control stream again, says so
/// ([`VmRestored`]) and reads what its new host sends.
///
/// `Prepare` (a warm pool's host, to a restored machine): mount the workspace's disks now,
/// answer [`VmStandingBy::Prepared`], and wait, untimed, for the workspace: whoever claims the
/// machine from the pool sends it, on this same stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmStandby {
    /// Wait, to be snapshotted.
    Standby,
    /// Mount the disks, then wait for the workspace.
    Prepare,
}

/// guest-init's answers to [`VmStandby`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmStandingBy {
    /// Nothing runs but PID 1, waiting on the stream: ready to be snapshotted.
    StandingBy,
    /// The root and home disks are mounted; nothing of a workspace exists yet.
    Prepared,
}

/// guest-init's first line on the control stream of a restored machine, before the host says
/// anything: it mixed this many bytes of the host's entropy device into the kernel's RNG and
/// rekeyed it. A host refuses a restored machine that does not say so: every restore of one
/// snapshot starts from the same RNG state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmRestored {
    /// The RNG was reseeded.
    Reseeded {
        /// Bytes of host entropy credited.
        bytes: u32,
    },
}

/// guest-init's first line on a control stream it connects again while the agent runs: the
/// stream it had ended (a snapshot of the running VM resets the guest's vsock transport), and
/// it asks its host to take it back (guest-init's `link.rs`). A `moat run` still waiting for
/// this VM's outcome answers [`VmReattached`]; any other answer, or none, means the host is
/// gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmReattach {
    /// Take this VM back.
    Reattach,
}

/// The host's answer to [`VmReattach`]: signals and the outcome go on on this stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmReattached {
    /// Taken back.
    Reattached,
}

fn flow_header_version_1() -> u8 {
    moat_flow_header::VERSION_1
}

/// A signal `moat run` received and passes on to the agent, so that it can shut down in order
/// (the namespace backend does the same through its process tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmSignal {
    /// SIGTERM.
    Terminate,
    /// SIGHUP.
    Hangup,
}

/// How the agent ended, as guest-init reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VmOutcome {
    /// The agent exited with this code (128 + signal if a signal ended it).
    Exited {
        /// The shell's convention.
        code: i32,
    },
    /// The workspace could not be set up; the agent never ran.
    Failed {
        /// Why, for a person.
        error: String,
    },
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes (without the newline).
///
/// # Errors
/// The stream ended first, the line was too long, or reading failed.
pub fn read_line(r: impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r
        .take(u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the control stream closed before a line",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control line too long or unterminated",
        ));
    }
    line.pop();
    Ok(line)
}

/// Parses one control line as `T`.
///
/// # Errors
/// The line is not the JSON of a `T` (unknown fields are refused).
pub fn parse<T: for<'de> Deserialize<'de>>(line: &[u8]) -> io::Result<T> {
    serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One control line for `value`.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_line_round_trips_and_nothing_else_parses_as_one() {
        let line = encode(&VmSignal::Terminate);
        assert_eq!(line, b"\"terminate\"\n");
        let parsed: VmSignal = parse(&line[..line.len() - 1]).unwrap();
        assert_eq!(parsed, VmSignal::Terminate);
        assert!(parse::<VmSignal>(b"\"kill\"").is_err());
        assert!(parse::<VmSignal>(b"{\"exited\":{\"code\":0}}").is_err());
    }

    #[test]
    fn round_trip() {
        let w = VmWorkspace {
            hostname: "workspace".into(),
            command: vec!["curl".into(), "-sS".into()],
            env: vec![("OPENAI_API_KEY".into(), "sk-moat-placeholder".into())],
            ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            interactive: false,
            rows: 50,
            cols: 132,
            ssh: Some(crate::session::SshService {
                user: "agent".into(),
                principal: "agent@ws1".into(),
                host_key: "-----BEGIN OPENSSH PRIVATE KEY-----\n".into(),
                host_certificate: Some("ssh-ed25519-cert-v01@openssh.com AAAA".into()),
                user_ca: "ssh-ed25519 AAAA ca".into(),
            }),
            flow_header_version: moat_flow_header::VERSION_2,
            services: vec![
                crate::service::ServiceSpec::parse_flag("llm:8000=python3 s.py").unwrap(),
            ],
            local_routes: vec![VmLocalRoute {
                host: "inference.local".into(),
                port: 80,
                service_port: 8000,
            }],
            generation: 3,
            trace_steps: true,
            realtime_ns: 1_796_584_817_075_000_000,
        };
        let line = encode(&w);
        let mut r = io::BufReader::new(&line[..]);
        assert_eq!(
            parse::<VmWorkspace>(&read_line(&mut r).unwrap()).unwrap(),
            w
        );
        for o in [
            VmOutcome::Exited { code: 7 },
            VmOutcome::Failed {
                error: "no root disk".into(),
            },
        ] {
            let line = encode(&o);
            let mut r = io::BufReader::new(&line[..]);
            assert_eq!(parse::<VmOutcome>(&read_line(&mut r).unwrap()).unwrap(), o);
        }
    }

    #[test]
    fn standby_is_neither_a_workspace_nor_a_signal() {
        let line = encode(&VmStandby::Standby);
        assert_eq!(line, b"\"standby\"\n");
        let body = &line[..line.len() - 1];
        assert_eq!(parse::<VmStandby>(body).unwrap(), VmStandby::Standby);
        assert!(parse::<VmWorkspace>(body).is_err());
        assert!(parse::<VmSignal>(body).is_err());
        assert_eq!(encode(&VmStandingBy::StandingBy), b"\"standing_by\"\n");
        let prepare = encode(&VmStandby::Prepare);
        assert_eq!(
            parse::<VmStandby>(&prepare[..prepare.len() - 1]).unwrap(),
            VmStandby::Prepare
        );
        assert!(parse::<VmWorkspace>(&prepare[..prepare.len() - 1]).is_err());
        let restored = encode(&VmRestored::Reseeded { bytes: 64 });
        assert_eq!(restored, b"{\"reseeded\":{\"bytes\":64}}\n");
        assert!(parse::<VmOutcome>(&restored[..restored.len() - 1]).is_err());
    }

    #[test]
    fn a_reattach_is_neither_a_workspace_nor_an_outcome_and_only_reattached_answers_it() {
        let line = encode(&VmReattach::Reattach);
        assert_eq!(line, b"\"reattach\"\n");
        let body = &line[..line.len() - 1];
        assert!(parse::<VmOutcome>(body).is_err());
        assert!(parse::<VmStandingBy>(body).is_err());
        let answer = encode(&VmReattached::Reattached);
        assert_eq!(answer, b"\"reattached\"\n");
        assert!(parse::<VmReattached>(&answer[..answer.len() - 1]).is_ok());
        // A new host's first line (a workspace, or standby) is not the answer.
        assert!(parse::<VmReattached>(b"\"standby\"").is_err());
        assert!(parse::<VmReattached>(br#"{"hostname":"w"}"#).is_err());
    }

    #[test]
    fn a_host_that_does_not_say_which_flow_header_it_reads_gets_version_1() {
        let w: VmWorkspace = parse(
            br#"{"hostname":"w","command":[],"env":[],"ca_pem":"","interactive":true,"rows":0,"cols":0}"#,
        )
        .unwrap();
        assert_eq!(w.flow_header_version, moat_flow_header::VERSION_1);
        assert_eq!(w.generation, 0, "a booted machine");
    }

    #[test]
    fn refuses_unknown_fields_long_lines_and_eof() {
        assert!(parse::<VmOutcome>(br#"{"exited":{"code":0,"extra":1}}"#).is_err());
        assert!(
            parse::<VmWorkspace>(
                br#"{"hostname":"w","command":[],"env":[],"ca_pem":"","interactive":true,"rows":0,"cols":0,"root":"/"}"#
            )
            .is_err()
        );
        let long = vec![b'a'; MAX_LINE + 10];
        assert_eq!(
            read_line(&mut io::BufReader::new(&long[..]))
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            read_line(&mut io::BufReader::new(&b""[..]))
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            read_line(&mut io::BufReader::new(&b"{\"exited\""[..]))
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData
        );
    }
}
