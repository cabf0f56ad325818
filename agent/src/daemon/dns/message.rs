//! DNS messages for the proxy, with `hickory-proto` (parsing and building only): the question
//! of a query, a REFUSED or SERVFAIL reply to it, and what an upstream answer says: the CNAME
//! chain from the name asked and the addresses at its end, with their TTLs.

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record},
};

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("not a DNS message: {0}")]
    Parse(String),
    #[error("not a query with exactly one question")]
    NotAQuery,
    #[error("encode the reply: {0}")]
    Encode(String),
}

/// The question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: String,
}

/// A recursive query for the A records of `name` (for `explain --connect NAME:PORT`).
pub fn a_query(name: &str, id: u16) -> Result<Vec<u8>, MessageError> {
    use hickory_proto::{
        op::{OpCode, Query},
        rr::{Name, RecordType},
    };
    let n = Name::from_ascii(name).map_err(|e| MessageError::Parse(e.to_string()))?;
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(n, RecordType::A));
    m.to_vec().map_err(|e| MessageError::Encode(e.to_string()))
}

/// The wire name of a response code: `NOERROR`, `NXDOMAIN`, `REFUSED`, ...
pub fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("{other:?}").to_uppercase(),
    }
}

/// Longest CNAME chain followed.
const MAX_CHAIN: usize = 16;

fn name_text(n: &hickory_proto::rr::Name) -> String {
    let s = n.to_lowercase().to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_owned()
}

/// The query in `bytes` and its single question.
pub fn query(bytes: &[u8]) -> Result<(Message, Question), MessageError> {
    let m = Message::from_vec(bytes).map_err(|e| MessageError::Parse(e.to_string()))?;
    if m.message_type() != MessageType::Query || m.queries().len() != 1 {
        return Err(MessageError::NotAQuery);
    }
    let q = &m.queries()[0];
    let question = Question {
        name: name_text(q.name()),
        qtype: q.query_type().to_string(),
    };
    Ok((m, question))
}

/// A reply to `query` with `code` and no records (REFUSED for a name in no zone, SERVFAIL
/// when the upstream resolver failed).
pub fn reply(query: &Message, code: ResponseCode) -> Result<Vec<u8>, MessageError> {
    let mut r = Message::error_msg(query.id(), query.op_code(), code);
    r.set_recursion_desired(query.recursion_desired());
    r.set_recursion_available(true);
    for q in query.queries() {
        r.add_query(q.clone());
    }
    r.to_vec().map_err(|e| MessageError::Encode(e.to_string()))
}

/// What an upstream answer to `asked` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    /// `asked`, then each CNAME target in turn.
    pub chain: Vec<String>,
    /// Addresses of the chain's names, with their TTLs (seconds).
    pub addrs: Vec<(IpAddr, u32)>,
    pub rcode: String,
}

/// Reads the answer in `bytes` to a query for `asked`. Records about names outside the chain
/// are ignored: an answer cannot open an address for a name nobody asked.
pub fn answer(bytes: &[u8], asked: &str) -> Result<Answer, MessageError> {
    let m = Message::from_vec(bytes).map_err(|e| MessageError::Parse(e.to_string()))?;
    let records: &[Record] = m.answers();
    let mut chain = vec![asked.to_owned()];
    while chain.len() < MAX_CHAIN {
        let Some(last) = chain.last() else { break };
        let next = records.iter().find_map(|r| match r.data() {
            RData::CNAME(c) if name_text(r.name()) == *last => Some(name_text(&c.0)),
            _ => None,
        });
        match next {
            Some(n) if !chain.contains(&n) => chain.push(n),
            _ => break,
        }
    }
    let addrs = records
        .iter()
        .filter(|r| chain.contains(&name_text(r.name())))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl())),
            _ => None,
        })
        .collect();
    Ok(Answer {
        chain,
        addrs,
        rcode: rcode_name(m.response_code()),
    })
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType, rdata},
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    #[test]
    fn a_query_is_read_and_refused_with_its_question() -> Result<(), MessageError> {
        let mut q = Message::new();
        q.set_id(77).set_recursion_desired(true);
        q.add_query(Query::query(name("API.Example.COM."), RecordType::A));
        let bytes = q
            .to_vec()
            .map_err(|e| MessageError::Encode(e.to_string()))?;
        let (m, question) = query(&bytes)?;
        assert_eq!(question.name, "api.example.com");
        assert_eq!(question.qtype, "A");
        let r = Message::from_vec(&reply(&m, ResponseCode::Refused)?)
            .map_err(|e| MessageError::Parse(e.to_string()))?;
        assert_eq!((r.id(), r.response_code()), (77, ResponseCode::Refused));
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.queries().len(), 1);
        assert!(query(b"\x00\x01junk").is_err());
        Ok(())
    }

    #[test]
    fn the_cname_chain_is_followed_and_strangers_are_ignored() -> Result<(), MessageError> {
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        let rec = |n: &str, ttl: u32, d: RData| Record::from_rdata(name(n), ttl, d);
        m.add_answer(rec(
            "www.example.com.",
            30,
            RData::CNAME(rdata::CNAME(name("edge.cdn.net."))),
        ));
        m.add_answer(rec(
            "edge.cdn.net.",
            20,
            RData::A(rdata::A("192.0.2.7".parse().expect("ip"))),
        ));
        m.add_answer(rec(
            "stranger.org.",
            20,
            RData::A(rdata::A("198.51.100.1".parse().expect("ip"))),
        ));
        let bytes = m
            .to_vec()
            .map_err(|e| MessageError::Encode(e.to_string()))?;
        let a = answer(&bytes, "www.example.com")?;
        assert_eq!(a.chain, ["www.example.com", "edge.cdn.net"]);
        assert_eq!(a.addrs, [("192.0.2.7".parse().expect("ip"), 20)]);
        assert_eq!(a.rcode, "NOERROR");
        Ok(())
    }
}
