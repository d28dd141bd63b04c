//! Plaintext HTTP/1.x: read a request head (bounded) and learn which host it is for.
//!
//! The Host header must appear exactly once; an absolute-form request target (`http://` or
//! `https://`, in any letter case) must name the same authority. Both are normalised like every
//! other name. Any other request target but origin-form (`/...`) and asterisk-form (`*`) is
//! refused. CONNECT and protocol upgrades (`Upgrade:`, h2c among them) are refused: after
//! either, the bytes that follow are no longer HTTP/1.1 request heads the proxy can check (see
//! `requests.rs`, which runs this on every request head of a plain-HTTP flow).

/// Largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Not an HTTP/1.x request head.
    #[error("request head is malformed")]
    Malformed,
    /// The head is larger than [`MAX_HEAD`].
    #[error("request head is too large")]
    TooLarge,
    /// No Host header.
    #[error("request has no Host header")]
    NoHost,
    /// Several Host headers, or Host disagrees with the absolute-form target.
    #[error("request names its host ambiguously")]
    AmbiguousHost,
    /// CONNECT, or a protocol upgrade: what follows would not be HTTP/1.1 heads.
    #[error("CONNECT and protocol upgrades are not forwarded on plain HTTP")]
    Tunnel,
}

/// What the request head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The normalised host from the Host header (port removed).
    pub host: String,
    /// The port from the Host header, if it had one.
    pub port: Option<u16>,
}

/// Does `buf` start like an HTTP request (a method token then a space)?
pub fn looks_like_http(buf: &[u8]) -> bool {
    let token_end = buf.iter().take(16).position(|&b| b == b' ');
    match token_end {
        Some(n) if n > 0 => buf[..n].iter().all(u8::is_ascii_uppercase),
        Some(_) => false,
        None => buf.len() < 16 && buf.iter().all(u8::is_ascii_uppercase),
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|_| HttpError::Malformed)?;
    if status.is_partial() {
        return if buf.len() >= MAX_HEAD {
            Err(HttpError::TooLarge)
        } else {
            Ok(None)
        };
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = hosts.next().ok_or(HttpError::NoHost)?;
    if hosts.next().is_some() {
        return Err(HttpError::AmbiguousHost);
    }
    let value = std::str::from_utf8(host.value).map_err(|_| HttpError::Malformed)?;
    let (name, port) = split_authority(value.trim()).ok_or(HttpError::Malformed)?;
    // httparse returns a complete head only with a method and a target.
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed);
    };
    // Methods are case-sensitive, but a server that folds case must not see a tunnel either.
    if method.eq_ignore_ascii_case("CONNECT")
        || req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
    {
        return Err(HttpError::Tunnel);
    }
    if let Some(authority) = target_authority(target)?
        && split_authority(authority) != Some((name.clone(), port))
    {
        return Err(HttpError::AmbiguousHost);
    }
    Ok(Some(RequestHead { host: name, port }))
}

/// The authority an absolute-form request target names (`None` for origin-form `/...` and
/// asterisk-form `*`). The scheme is compared in any letter case (RFC 3986 3.1): a server reads
/// `HTTP://other/` as `http://other/`. Any other form (authority-form outside CONNECT, another
/// scheme, a scheme without `//`) is refused rather than guessed at.
fn target_authority(target: &str) -> Result<Option<&str>, HttpError> {
    if target.starts_with('/') || target == "*" {
        return Ok(None);
    }
    let (scheme, rest) = target.split_once("://").ok_or(HttpError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(HttpError::Malformed);
    }
    Ok(Some(rest.split(['/', '?', '#']).next().unwrap_or("")))
}

/// Splits `host[:port]` and normalises the host. Userinfo and bracketed IPv6 are refused:
/// they never name a policy hostname.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.contains('@') || authority.starts_with('[') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok()?)),
        None => (authority, None),
    };
    Some((moat_policy::normalize(host).ok()?, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_is_read_and_normalised() {
        let head = parse(b"GET / HTTP/1.1\r\nHost: Example.COM.:8080\r\n\r\n").unwrap();
        assert_eq!(
            head,
            Some(RequestHead {
                host: "example.com".into(),
                port: Some(8080)
            })
        );
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a.example\r\n"), Ok(None));
    }

    #[test]
    fn missing_and_duplicate_host_are_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(HttpError::NoHost));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n"),
            Err(HttpError::AmbiguousHost)
        );
    }

    #[test]
    fn absolute_target_must_agree_with_host() {
        assert_eq!(
            parse(b"GET http://b.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n"),
            Err(HttpError::AmbiguousHost)
        );
        assert!(parse(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n").is_ok());
    }

    #[test]
    fn absolute_target_scheme_is_compared_in_any_case() {
        for target in [
            "HTTP://b.example/x",
            "Http://b.example/",
            "hTtPs://b.example",
        ] {
            let head = format!("GET {target} HTTP/1.1\r\nHost: a.example\r\n\r\n");
            assert_eq!(
                parse(head.as_bytes()),
                Err(HttpError::AmbiguousHost),
                "{target}"
            );
        }
        assert!(parse(b"GET HTTP://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n").is_ok());
    }

    #[test]
    fn other_target_forms_are_refused() {
        for target in ["b.example:80", "ftp://b.example/", "http:b.example/", "x"] {
            let head = format!("GET {target} HTTP/1.1\r\nHost: a.example\r\n\r\n");
            assert_eq!(
                parse(head.as_bytes()),
                Err(HttpError::Malformed),
                "{target}"
            );
        }
        assert!(parse(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n").is_ok());
    }

    #[test]
    fn connect_and_upgrades_are_refused() {
        for head in [
            &b"CONNECT b.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n"[..],
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example\r\nupgrade: websocket\r\n\r\n",
        ] {
            assert_eq!(parse(head), Err(HttpError::Tunnel));
        }
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse(&head), Err(HttpError::TooLarge));
    }

    #[test]
    fn http_is_told_apart_from_other_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(looks_like_http(b"PO"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH_9.2"));
        assert!(!looks_like_http(&[0x16, 3, 1]));
    }
}
