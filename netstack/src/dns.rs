//! The virtual DNS server: answers A queries from the fake-address pool. No query ever leaves
//! the workspace: names are resolved for real only by the host's egress proxy, after policy.
//!
//! AAAA queries get an empty NOERROR answer (the workspace network is IPv4-only), so clients
//! fall back to A at once. Anything that is not a plain hostname gets NXDOMAIN.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use crate::pool::FakePool;

/// TTL of answers: short, so a pool reuse is not cached for long.
const TTL: u32 = 30;

/// Answers one DNS query datagram. `None` when it is not a query worth answering.
pub fn answer(query: &[u8], pool: &mut FakePool) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    if req.message_type() != MessageType::Query {
        return None;
    }
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    if req.op_code() != OpCode::Query || req.queries().len() != 1 {
        resp.set_response_code(ResponseCode::NotImp);
        return resp.to_vec().ok();
    }
    let q = &req.queries()[0];
    resp.add_query(q.clone());
    let ascii = q.name().to_ascii().to_ascii_lowercase();
    let name = ascii.strip_suffix('.').unwrap_or(&ascii);
    if moat_flow_header::Hostname::new(name).is_err() {
        resp.set_response_code(ResponseCode::NXDomain);
        return resp.to_vec().ok();
    }
    if q.query_type() == RecordType::A {
        let addr = pool.assign(name);
        resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(addr))));
    }
    resp.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(42).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_query_gets_a_fake_address_that_maps_back_to_the_name() {
        let mut pool = FakePool::default();
        let resp = Message::from_vec(
            &answer(&query("API.GitHub.com.", RecordType::A), &mut pool).unwrap(),
        )
        .unwrap();
        assert_eq!(resp.id(), 42);
        assert_eq!(resp.response_code(), ResponseCode::NoError);
        let RData::A(A(addr)) = resp.answers()[0].data() else {
            panic!("not an A record")
        };
        assert!(FakePool::contains(*addr));
        assert_eq!(pool.name_of(*addr), Some("api.github.com"));
    }

    #[test]
    fn aaaa_query_gets_an_empty_answer() {
        let mut pool = FakePool::default();
        let resp = Message::from_vec(
            &answer(&query("example.com.", RecordType::AAAA), &mut pool).unwrap(),
        )
        .unwrap();
        assert_eq!(resp.response_code(), ResponseCode::NoError);
        assert!(resp.answers().is_empty());
    }

    #[test]
    fn garbage_is_ignored_and_odd_names_get_nxdomain() {
        let mut pool = FakePool::default();
        assert_eq!(answer(b"\x00\x01garbage", &mut pool), None);
        let resp = Message::from_vec(
            &answer(&query("under_score.example.", RecordType::A), &mut pool).unwrap(),
        )
        .unwrap();
        assert_eq!(resp.response_code(), ResponseCode::NXDomain);
    }
}
