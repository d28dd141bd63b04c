//! Destination address classification.
//!
//! The egress proxy connects only to addresses that [`classify`] calls [`AddrClass::Public`],
//! unless a rule names the address's range explicitly. Classification first canonicalises
//! (an IPv4-mapped IPv6 address *is* its IPv4 address) and looks through the IPv6 forms that
//! embed an IPv4 address (IPv4-compatible, 6to4, NAT64, Teredo), so a private IPv4 address cannot
//! be smuggled inside an IPv6 one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address a destination is. Everything but `Public` is refused by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    /// Globally routable unicast.
    Public,
    /// "This host" / unspecified (0.0.0.0/8, ::).
    Unspecified,
    /// Loopback (127.0.0.0/8, ::1).
    Loopback,
    /// RFC 1918 private IPv4 or IPv6 unique-local (fc00::/7) and site-local (fec0::/10).
    Private,
    /// Carrier-grade NAT shared space (100.64.0.0/10).
    SharedCgnat,
    /// Link-local (169.254.0.0/16, including the 169.254.169.254 metadata service; fe80::/10).
    LinkLocal,
    /// Multicast (224.0.0.0/4, ff00::/8).
    Multicast,
    /// Limited broadcast (255.255.255.255).
    Broadcast,
    /// Benchmarking (198.18.0.0/15, 2001:2::/48).
    Benchmarking,
    /// Documentation (TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20).
    Documentation,
    /// IETF protocol assignments, reserved and other special-purpose ranges
    /// (192.0.0.0/24, 240.0.0.0/4, 192.88.99.0/24, 100::/64, 2001::/23 non-Teredo, 64:ff9b:1::/48).
    Reserved,
}

impl AddrClass {
    /// Stable lowercase name for audit records and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::SharedCgnat => "shared-cgnat",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Benchmarking => "benchmarking",
            AddrClass::Documentation => "documentation",
            AddrClass::Reserved => "reserved",
        }
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The canonical form of an address: IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4.
/// This is the form that is classified, matched against CIDR rules and connected to.
pub fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// Classifies an address after canonicalisation. An IPv6 address that embeds an IPv4 address
/// takes the embedded address's class when that class is not public.
pub fn classify(addr: IpAddr) -> AddrClass {
    match canonical(addr) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(a: Ipv4Addr) -> AddrClass {
    let o = a.octets();
    match o {
        [0, ..] => AddrClass::Unspecified,
        [10, ..] => AddrClass::Private,
        [100, b, ..] if (64..128).contains(&b) => AddrClass::SharedCgnat,
        [127, ..] => AddrClass::Loopback,
        [169, 254, ..] => AddrClass::LinkLocal,
        [172, b, ..] if (16..32).contains(&b) => AddrClass::Private,
        [192, 0, 0, _] => AddrClass::Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => AddrClass::Documentation,
        [192, 88, 99, _] => AddrClass::Reserved,
        [192, 168, ..] => AddrClass::Private,
        [198, b, ..] if b == 18 || b == 19 => AddrClass::Benchmarking,
        [255, 255, 255, 255] => AddrClass::Broadcast,
        [a0, ..] if (224..240).contains(&a0) => AddrClass::Multicast,
        [a0, ..] if a0 >= 240 => AddrClass::Reserved,
        _ => AddrClass::Public,
    }
}

/// The IPv4 address embedded in an IPv6 address by a transition mechanism, if any.
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let o = a.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // IPv4-compatible (deprecated): ::a.b.c.d (but not :: and ::1 themselves).
        [0, 0, 0, 0, 0, 0, _, _] => Some(tail),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        // 6to4: 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD.
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        // Teredo 2001:0::/32: the client's address is the last 32 bits, inverted.
        [0x2001, 0, ..] => Some(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15])),
        _ => None,
    }
}

fn classify_v6(a: Ipv6Addr) -> AddrClass {
    if a.is_unspecified() {
        return AddrClass::Unspecified;
    }
    if a.is_loopback() {
        return AddrClass::Loopback;
    }
    if let Some(v4) = embedded_v4(a) {
        let inner = classify_v4(v4);
        if inner != AddrClass::Public {
            return inner;
        }
        // IPv4-compatible addresses are deprecated (RFC 4291) and never legitimately public.
        if a.segments()[..6] == [0; 6] {
            return AddrClass::Reserved;
        }
    }
    let s = a.segments();
    match s[0] {
        0xff00..=0xffff => AddrClass::Multicast,
        0xfe80..=0xfebf => AddrClass::LinkLocal,
        0xfec0..=0xfeff | 0xfc00..=0xfdff => AddrClass::Private,
        0x0100 if s[1..4] == [0, 0, 0] => AddrClass::Reserved,
        0x2001 if s[1] == 0x0db8 => AddrClass::Documentation,
        0x2001 if s[1] == 0x0002 && s[2] == 0 => AddrClass::Benchmarking,
        // 2001::/23 is IETF protocol assignments (Teredo at 2001::/32 handled above by its
        // embedded address; the rest of the block is not general-purpose unicast).
        0x2001 if s[1] < 0x0200 && s[1] != 0 => AddrClass::Reserved,
        0x3fff if s[1] < 0x1000 => AddrClass::Documentation,
        0x0064 if s[1] == 0xff9b && s[2] == 1 => AddrClass::Reserved,
        // NAT64 of a public IPv4 address (non-public embeddings were refused above).
        0x0064 if s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => AddrClass::Public,
        // Only 2000::/3 is allocated global unicast.
        0x2000..=0x3fff => AddrClass::Public,
        _ => AddrClass::Reserved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases in the spirit of Stripe smokescreen's classification table, and more.
    const CASES: &[(&str, AddrClass)] = &[
        // Public unicast.
        ("8.8.8.8", AddrClass::Public),
        ("1.1.1.1", AddrClass::Public),
        ("140.82.112.3", AddrClass::Public),
        ("100.63.255.255", AddrClass::Public),
        ("100.128.0.0", AddrClass::Public),
        ("172.15.255.255", AddrClass::Public),
        ("172.32.0.0", AddrClass::Public),
        ("192.169.0.1", AddrClass::Public),
        ("198.17.255.255", AddrClass::Public),
        ("198.20.0.0", AddrClass::Public),
        ("223.255.255.255", AddrClass::Public),
        ("2606:4700:4700::1111", AddrClass::Public),
        ("2a00:1450:4001:80b::200e", AddrClass::Public),
        ("::ffff:8.8.8.8", AddrClass::Public),
        ("64:ff9b::808:808", AddrClass::Public),
        ("2002:808:808::1", AddrClass::Public),
        // Unspecified and loopback.
        ("0.0.0.0", AddrClass::Unspecified),
        ("0.1.2.3", AddrClass::Unspecified),
        ("::", AddrClass::Unspecified),
        ("127.0.0.1", AddrClass::Loopback),
        ("127.255.255.254", AddrClass::Loopback),
        ("::1", AddrClass::Loopback),
        // Private.
        ("10.0.0.1", AddrClass::Private),
        ("10.255.255.255", AddrClass::Private),
        ("172.16.0.1", AddrClass::Private),
        ("172.31.255.255", AddrClass::Private),
        ("192.168.1.1", AddrClass::Private),
        ("fc00::1", AddrClass::Private),
        ("fd12:3456:789a::1", AddrClass::Private),
        ("fec0::1", AddrClass::Private),
        // CGNAT.
        ("100.64.0.1", AddrClass::SharedCgnat),
        ("100.127.255.255", AddrClass::SharedCgnat),
        // Link-local and the metadata service.
        ("169.254.169.254", AddrClass::LinkLocal),
        ("169.254.0.1", AddrClass::LinkLocal),
        ("fe80::1", AddrClass::LinkLocal),
        ("fd00:ec2::254", AddrClass::Private),
        // Multicast and broadcast.
        ("224.0.0.1", AddrClass::Multicast),
        ("239.255.255.250", AddrClass::Multicast),
        ("ff02::1", AddrClass::Multicast),
        ("255.255.255.255", AddrClass::Broadcast),
        // Benchmarking, documentation, reserved.
        ("198.18.0.1", AddrClass::Benchmarking),
        ("198.19.255.255", AddrClass::Benchmarking),
        ("2001:2::1", AddrClass::Benchmarking),
        ("192.0.2.1", AddrClass::Documentation),
        ("198.51.100.1", AddrClass::Documentation),
        ("203.0.113.1", AddrClass::Documentation),
        ("2001:db8::1", AddrClass::Documentation),
        ("3fff::1", AddrClass::Documentation),
        ("192.0.0.8", AddrClass::Reserved),
        ("192.88.99.1", AddrClass::Reserved),
        ("240.0.0.1", AddrClass::Reserved),
        ("100::1", AddrClass::Reserved),
        ("2001:10::1", AddrClass::Reserved),
        ("64:ff9b:1::1", AddrClass::Reserved),
        ("4000::1", AddrClass::Reserved),
        // IPv4-mapped and IPv4-compatible embeddings.
        ("::ffff:127.0.0.1", AddrClass::Loopback),
        ("::ffff:10.0.0.1", AddrClass::Private),
        ("::ffff:169.254.169.254", AddrClass::LinkLocal),
        ("::127.0.0.1", AddrClass::Loopback),
        ("::10.1.2.3", AddrClass::Private),
        ("::8.8.8.8", AddrClass::Reserved),
        // NAT64 embeddings.
        ("64:ff9b::7f00:1", AddrClass::Loopback),
        ("64:ff9b::a9fe:a9fe", AddrClass::LinkLocal),
        ("64:ff9b::c0a8:101", AddrClass::Private),
        // 6to4 embeddings.
        ("2002:7f00:1::1", AddrClass::Loopback),
        ("2002:a00:1::", AddrClass::Private),
        ("2002:a9fe:a9fe::1", AddrClass::LinkLocal),
        // Teredo embeddings (client address inverted in the last 32 bits).
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", AddrClass::Loopback),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", AddrClass::Private),
        ("2001:0:4136:e378:8000:63bf:5601:5601", AddrClass::LinkLocal),
    ];

    #[test]
    fn classification_table_holds() {
        assert!(CASES.len() >= 42, "keep at least smokescreen's 42 cases");
        for (text, want) in CASES {
            let addr: IpAddr = text.parse().unwrap();
            assert_eq!(classify(addr), *want, "{text}");
        }
    }

    #[test]
    fn mapped_addresses_canonicalise_to_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
