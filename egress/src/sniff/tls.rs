//! A strict, bounded TLS ClientHello reader: just enough to learn the SNI server name, with
//! every way of hiding or doubling it refused. Pure, no I/O, fuzzed (`fuzz/fuzz_targets/sni.rs`).
//!
//! It reassembles the handshake message across TLS records (a ClientHello may be split), bounds
//! it at [`MAX_CLIENT_HELLO`], and refuses: a non-handshake first record, a handshake that is not
//! a ClientHello, truncated vectors, trailing bytes, duplicated extensions, a server_name
//! extension with more than one host name, an empty or non-DNS host name. It reports an
//! Encrypted ClientHello (or its draft predecessor, ESNI): the name such a hello really asks
//! for is encrypted, so the SNI it shows proves nothing (the flow decides what to do).

/// Largest ClientHello accepted (post-quantum key shares make them ~2 KiB; 16 KiB is generous).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// `encrypted_client_hello` (RFC 9849, draft-ietf-tls-esni-13 onwards): the real ClientHello,
/// server name included, encrypted to the server; the visible SNI is a public front name.
pub const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
/// `encrypted_server_name`, the draft ESNI extension ECH replaced (still sent by old clients).
pub const EXT_ENCRYPTED_SERVER_NAME: u16 = 0xffce;

/// Why a ClientHello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The first record is not a TLS handshake record.
    #[error("not a TLS handshake")]
    NotHandshake,
    /// The handshake message is not a ClientHello.
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO`].
    #[error("ClientHello is too large")]
    TooLarge,
    /// A length field disagrees with the bytes present.
    #[error("ClientHello is malformed")]
    Malformed,
    /// The same extension appears twice.
    #[error("ClientHello repeats extension {0}")]
    DuplicateExtension(u16),
    /// The server_name extension names more than one host.
    #[error("ClientHello names more than one server")]
    MultipleServerNames,
    /// The server name is empty or not a valid DNS name.
    #[error("ClientHello server name is not a valid hostname")]
    BadServerName,
}

/// What the ClientHello says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI host name, normalised, if the extension is present.
    pub server_name: Option<String>,
    /// The extension that hides the name the client really asks for
    /// ([`EXT_ENCRYPTED_CLIENT_HELLO`] or [`EXT_ENCRYPTED_SERVER_NAME`]), if there is one. Its
    /// content is opaque (GREASE looks the same as a real one), so only its presence counts.
    pub hidden_name: Option<u16>,
}

/// Reads a ClientHello from the start of `buf`. `Ok(None)`: a valid prefix, read more.
pub fn parse(buf: &[u8]) -> Result<Option<ClientHello>, TlsError> {
    let mut msg = Vec::new();
    let mut rest = buf;
    // Reassemble handshake bytes from consecutive handshake records until the message is whole.
    loop {
        let Some(header) = rest.get(..5) else {
            if rest.first().is_some_and(|&t| t != RECORD_HANDSHAKE) {
                return Err(TlsError::NotHandshake);
            }
            return Ok(None);
        };
        if header[0] != RECORD_HANDSHAKE {
            return Err(TlsError::NotHandshake);
        }
        // Record-layer version: 0x0300..=0x0304 in the wild (0x0301 for ClientHello).
        if header[1] != 3 || header[2] > 4 {
            return Err(TlsError::Malformed);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Err(TlsError::Malformed);
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            return Ok(None);
        };
        msg.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        if msg.len() >= 4 {
            if msg[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(TlsError::NotClientHello);
            }
            let body_len =
                usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
            if body_len > MAX_CLIENT_HELLO {
                return Err(TlsError::TooLarge);
            }
            if msg.len() >= 4 + body_len {
                // Bytes after the ClientHello in the same record would be a second handshake
                // message before the server spoke: not something a real client sends.
                if msg.len() != 4 + body_len {
                    return Err(TlsError::Malformed);
                }
                return parse_body(&msg[4..]).map(Some);
            }
        }
        if msg.len() > MAX_CLIENT_HELLO + 4 {
            return Err(TlsError::TooLarge);
        }
    }
}

/// A cursor over a byte slice whose every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TlsError> {
        if n > self.0.len() {
            return Err(TlsError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TlsError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TlsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], TlsError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], TlsError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, TlsError> {
    let mut r = Reader(body);
    let _legacy_version = r.u16()?;
    let _random = r.take(32)?;
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return Err(TlsError::Malformed);
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(TlsError::Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(TlsError::Malformed);
    }
    if r.is_empty() {
        // No extensions at all (TLS 1.0-era clients): no SNI.
        return Ok(ClientHello {
            server_name: None,
            hidden_name: None,
        });
    }
    let mut exts = Reader(r.vec16()?);
    if !r.is_empty() {
        return Err(TlsError::Malformed);
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut server_name = None;
    let mut hidden_name = None;
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if seen.contains(&kind) {
            return Err(TlsError::DuplicateExtension(kind));
        }
        seen.push(kind);
        if kind == EXT_SERVER_NAME {
            server_name = Some(parse_server_name(data)?);
        }
        if kind == EXT_ENCRYPTED_CLIENT_HELLO || kind == EXT_ENCRYPTED_SERVER_NAME {
            // The first one found; a second of the same kind was refused above.
            hidden_name.get_or_insert(kind);
        }
    }
    Ok(ClientHello {
        server_name,
        hidden_name,
    })
}

fn parse_server_name(data: &[u8]) -> Result<String, TlsError> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec16()?);
    if !outer.is_empty() {
        return Err(TlsError::Malformed);
    }
    let mut found = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let name = list.vec16()?;
        if name_type != NAME_TYPE_HOST {
            // RFC 6066 defines only host_name; anything else is refused rather than skipped.
            return Err(TlsError::Malformed);
        }
        if found.is_some() {
            return Err(TlsError::MultipleServerNames);
        }
        found = Some(name);
    }
    let name = found.ok_or(TlsError::BadServerName)?;
    let text = std::str::from_utf8(name).map_err(|_| TlsError::BadServerName)?;
    // RFC 6066: no trailing dot in SNI; an IP literal is not a valid SNI either.
    if text.ends_with('.') || text.parse::<std::net::IpAddr>().is_ok() {
        return Err(TlsError::BadServerName);
    }
    moat_policy::normalize(text).map_err(|_| TlsError::BadServerName)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a ClientHello with the given extensions, split into records of `record_size`.
    pub(crate) fn client_hello(exts: &[(u16, Vec<u8>)], record_size: usize) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut ext_bytes = Vec::new();
        for (kind, data) in exts {
            ext_bytes.extend_from_slice(&kind.to_be_bytes());
            ext_bytes.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(ext_bytes.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        msg.extend_from_slice(&len[1..]);
        msg.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in msg.chunks(record_size) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    pub(crate) fn sni(names: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(NAME_TYPE_HOST);
            list.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
            list.extend_from_slice(n.as_bytes());
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (EXT_SERVER_NAME, data)
    }

    #[test]
    fn server_name_is_read_and_normalised() {
        let hello = client_hello(&[sni(&["API.Example.com"])], 4096);
        assert_eq!(
            parse(&hello).unwrap().unwrap().server_name.as_deref(),
            Some("api.example.com")
        );
    }

    #[test]
    fn hello_split_across_records_is_reassembled() {
        let hello = client_hello(&[(10, vec![0, 2, 0, 29]), sni(&["example.com"])], 7);
        assert_eq!(
            parse(&hello).unwrap().unwrap().server_name.as_deref(),
            Some("example.com")
        );
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let hello = client_hello(&[sni(&["example.com"])], 20);
        for cut in 0..hello.len() {
            assert_eq!(parse(&hello[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn missing_sni_is_reported_as_none() {
        let hello = client_hello(&[(10, vec![0, 2, 0, 29])], 4096);
        assert_eq!(parse(&hello).unwrap().unwrap().server_name, None);
    }

    #[test]
    fn encrypted_client_hello_and_esni_are_reported() {
        for kind in [EXT_ENCRYPTED_CLIENT_HELLO, EXT_ENCRYPTED_SERVER_NAME] {
            // A public front name in the clear; the opaque payload would name anything.
            let hello = client_hello(&[sni(&["front.example"]), (kind, vec![0, 1, 2, 3])], 4096);
            let got = parse(&hello).unwrap().unwrap();
            assert_eq!(got.hidden_name, Some(kind), "{kind:#x}");
            assert_eq!(got.server_name.as_deref(), Some("front.example"));
        }
        let plain = client_hello(&[sni(&["front.example"])], 4096);
        assert_eq!(parse(&plain).unwrap().unwrap().hidden_name, None);
    }

    #[test]
    fn duplicated_sni_extension_is_refused() {
        let hello = client_hello(&[sni(&["a.example"]), sni(&["b.example"])], 4096);
        assert_eq!(parse(&hello), Err(TlsError::DuplicateExtension(0)));
    }

    #[test]
    fn two_names_in_one_sni_extension_are_refused() {
        let hello = client_hello(&[sni(&["a.example", "b.example"])], 4096);
        assert_eq!(parse(&hello), Err(TlsError::MultipleServerNames));
    }

    #[test]
    fn bad_server_names_are_refused() {
        for bad in ["", "a..b", "example.com.", "127.0.0.1", "bad name"] {
            let hello = client_hello(&[sni(&[bad])], 4096);
            assert_eq!(parse(&hello), Err(TlsError::BadServerName), "{bad:?}");
        }
    }

    #[test]
    fn lying_lengths_are_refused() {
        let mut hello = client_hello(&[sni(&["example.com"])], 4096);
        // Inflate the extensions block length by one: the vectors no longer add up.
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        hello[ext_len_at + 1] = hello[ext_len_at + 1].wrapping_add(1);
        assert_eq!(parse(&hello), Err(TlsError::Malformed));
    }

    #[test]
    fn non_tls_bytes_are_refused_at_once() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(TlsError::NotHandshake));
        assert_eq!(parse(b"S"), Err(TlsError::NotHandshake));
    }

    #[test]
    fn oversized_hello_is_refused_before_it_arrives() {
        let mut rec = vec![RECORD_HANDSHAKE, 3, 1, 0x40, 0];
        rec.extend_from_slice(&[HANDSHAKE_CLIENT_HELLO, 0x01, 0, 0]);
        rec.resize(5 + 0x4000, 0);
        assert_eq!(parse(&rec), Err(TlsError::TooLarge));
    }
}
