//! The broker's SSH user CA takes a person's public key line (from the network, with a live
//! session) and never panics on it: whatever it certifies is a certificate of an accepted key
//! type for the one principal asked (`<account>@<workspace>`).
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use moat_broker::config::WorkspaceName;
use moat_broker::ssh_ca::{Grant, SshCa};

static CA: LazyLock<SshCa> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("moat-fuzz-ssh-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp directory");
    SshCa::load_or_create(&dir.join("ca")).expect("a CA key")
});

static WORKSPACE: LazyLock<WorkspaceName> =
    LazyLock::new(|| WorkspaceName::try_from("ws1").expect("a valid name"));

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let grant = Grant {
        account: "agent",
        workspace: &WORKSPACE,
        key_id: "moat session fuzz subject fuzz".into(),
        valid_before: SystemTime::now() + Duration::from_secs(300),
    };
    if let Ok(cert) = CA.certify(line, &grant) {
        let parsed = ssh_key::Certificate::from_openssh(cert.trim()).expect("our own certificate");
        assert_eq!(parsed.valid_principals(), ["agent@ws1".to_owned()]);
    }
});
