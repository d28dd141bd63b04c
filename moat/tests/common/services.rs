//! Workspace services in both backends: a model server beside the agent (the stand-in of
//! moat/tests/inference/), reached by the agent only through its port, and out of the agent's
//! reach otherwise.

use std::path::{Path, PathBuf};

use super::Workspace;

/// The loopback port the test's model server listens on inside the workspace.
pub const PORT: u16 = 8000;
/// A marker in the service's models directory, which the agent must never read.
pub const WEIGHTS: &str = "MODEL-WEIGHTS-MARKER-5b1c";

/// moat/tests/inference/.
pub fn inference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inference")
}

/// A models directory under `ws`'s directory: the stand-in server, its model, and weights
/// holding [`WEIGHTS`]; readable by any uid (the service's is not the test's), its parent not.
pub fn models_dir(ws: &Workspace) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = ws.dir.path().join("models");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["server.py", "model.json"] {
        std::fs::copy(inference_dir().join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("weights.bin"), WEIGHTS).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The `--services` file of one service, `llm`: the stand-in server on [`PORT`] with its
/// models, and `devices`.
pub fn services_file(ws: &Workspace, devices: &[PathBuf]) -> PathBuf {
    let models = models_dir(ws);
    let devices: Vec<String> = devices
        .iter()
        .map(|d| format!("{:?}", d.display().to_string()))
        .collect();
    let text = format!(
        "[[service]]\nname = \"llm\"\ncommand = [\"python3\", \"/run/moat-services/llm/models/server.py\"]\n\
         port = {PORT}\nmodels = {models:?}\ndevices = [{}]\n",
        devices.join(", ")
    );
    let path = ws.dir.path().join("services.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The openai client's python (`cargo xtask test` installs it into .venv-openai, from
/// moat/tests/inference/requirements.txt, and sets MOAT_OPENAI_PYTHON).
pub fn openai_python() -> PathBuf {
    let python = std::env::var_os("MOAT_OPENAI_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-openai/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "the openai client is not installed: run `cargo xtask test` (it installs it into \
         .venv-openai)"
    );
    python
}

/// The policy's local route: `inference.local` (port 80) to the service `llm`.
pub const LOCAL_ROUTE: &str = "[[local_routes]]\nhost = \"inference.local\"\nservice = \"llm\"\n";

/// A Python script for the agent: the real OpenAI client asks `base_url` for a chat
/// completion and prints its text.
pub fn openai_chat(python: &Path, base_url: &str) -> String {
    format!(
        "{} -c \"import openai; c = openai.OpenAI(base_url='{base_url}', api_key='unused', \
         max_retries=0); r = c.chat.completions.create(model='moat-standin-bigram', \
         messages=[{{'role': 'user', 'content': 'hello'}}]); print(r.choices[0].message.content)\"",
        python.display()
    )
}

/// What the stand-in model answers to "hello".
pub const HELLO_ANSWER: &str = "from the model beside your agent";
