//! Hand-written `WatchEventsResponse` (mapped with `extern_path`): the same wire format as the
//! generated message, plus an optional pre-encoded `Event`. A server that fans one event out to
//! many subscribers encodes it once and shares the bytes (`Bytes` clones are reference counts),
//! instead of deep-copying and re-encoding the `Event` per subscriber. Clients decode it like the
//! generated type: `event` is filled, `encoded_event` stays `None`.

use prost::{
    DecodeError, Message,
    bytes::{Buf, BufMut, Bytes},
    encoding::{self, DecodeContext, WireType},
};

use crate::v1::Event;

/// `corral.v1.WatchEventsResponse`.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct WatchEventsResponse {
    /// Field 1.
    pub event: Option<Event>,
    /// Field 2: events this subscriber lost because it read too slowly (cumulative).
    pub subscriber_dropped: u64,
    /// Protobuf bytes of an `Event`, sent as field 1 in place of `event` when set. Never set by
    /// decoding.
    pub encoded_event: Option<Bytes>,
}

impl WatchEventsResponse {
    /// A response carrying an already encoded `Event`.
    pub fn shared(encoded_event: Bytes, subscriber_dropped: u64) -> Self {
        Self {
            event: None,
            subscriber_dropped,
            encoded_event: Some(encoded_event),
        }
    }
}

impl Message for WatchEventsResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(b) = &self.encoded_event {
            encoding::encode_key(1, WireType::LengthDelimited, buf);
            encoding::encode_varint(b.len() as u64, buf);
            buf.put_slice(b);
        } else if let Some(e) = &self.event {
            encoding::message::encode(1, e, buf);
        }
        if self.subscriber_dropped != 0 {
            encoding::uint64::encode(2, &self.subscriber_dropped, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::message::merge(
                wire_type,
                self.event.get_or_insert_with(Event::default),
                buf,
                ctx,
            ),
            2 => encoding::uint64::merge(wire_type, &mut self.subscriber_dropped, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let event = match (&self.encoded_event, &self.event) {
            (Some(b), _) => {
                encoding::key_len(1) + encoding::encoded_len_varint(b.len() as u64) + b.len()
            }
            (None, Some(e)) => encoding::message::encoded_len(1, e),
            (None, None) => 0,
        };
        let dropped = if self.subscriber_dropped != 0 {
            encoding::uint64::encoded_len(2, &self.subscriber_dropped)
        } else {
            0
        };
        event + dropped
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    fn event() -> Event {
        Event {
            seq: 42,
            node: "n1".into(),
            principal: Some(pb::Principal {
                identity: "spiffe://t/a".into(),
                session: "s".into(),
                cgroup_id: 7,
                opt_outs: Vec::new(),
            }),
            suppressed: 3,
            ..Default::default()
        }
    }

    #[test]
    fn shared_bytes_encode_exactly_like_the_event() -> Result<(), DecodeError> {
        let e = event();
        let plain = WatchEventsResponse {
            event: Some(e.clone()),
            subscriber_dropped: 5,
            encoded_event: None,
        };
        let shared = WatchEventsResponse::shared(Bytes::from(e.encode_to_vec()), 5);
        assert_eq!(plain.encode_to_vec(), shared.encode_to_vec());
        assert_eq!(shared.encoded_len(), shared.encode_to_vec().len());
        let back = WatchEventsResponse::decode(shared.encode_to_vec().as_slice())?;
        assert_eq!(back.event, Some(e));
        assert_eq!(back.subscriber_dropped, 5);
        assert!(back.encoded_event.is_none());
        Ok(())
    }

    #[test]
    fn decodes_what_a_generated_message_would_write() -> Result<(), DecodeError> {
        // Field 1 (Event), field 2 (varint), and an unknown field 9 that must be skipped.
        let mut buf = Vec::new();
        encoding::message::encode(1, &event(), &mut buf);
        encoding::uint64::encode(2, &0, &mut buf);
        encoding::string::encode(9, &"x".to_owned(), &mut buf);
        let r = WatchEventsResponse::decode(buf.as_slice())?;
        assert_eq!(r.event, Some(event()));
        assert_eq!(r.subscriber_dropped, 0);
        Ok(())
    }
}
