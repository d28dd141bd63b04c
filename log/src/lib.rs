//! How moat's programs report, in one place: an error with its causes as one line
//! ([`error_chain`]), and the one tracing subscriber the binaries install ([`init`], with the
//! `subscriber` feature). One format everywhere, so that logs from the broker, the egress
//! proxy, `moat` and moat-vmm read alike and tests can match them.

#![forbid(unsafe_code)]

/// `outer: cause: root cause`, the one way errors are printed.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Installs the tracing subscriber: formatted events on stderr, filtered by the environment
/// variable `env` (`EnvFilter` syntax) or else by `default`. Call once, first thing in `main`.
#[cfg(feature = "subscriber")]
pub fn init(env: &str, default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn causes_follow_on_one_line() {
        let e = Layer(
            "outer",
            Some(Box::new(Layer(
                "cause",
                Some(Box::new(Layer("root", None))),
            ))),
        );
        assert_eq!(error_chain(&e), "outer: cause: root");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
