//! PostgreSQL protocol framing (version 3.0): the few messages the front
//! door reads or writes itself. Everything else is forwarded as whole frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Request codes of the untyped first packet.
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL's own limit for a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// One typed message: its tag and the whole frame (tag, length, body), so
/// it can be forwarded without copying.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub frame: Bytes,
}

impl Msg {
    pub fn body(&self) -> &[u8] {
        &self.frame[5..]
    }
}

/// The tag of a later part of a message passed on in parts (no message of
/// the protocol has it): see [`Codec::server`].
pub const PART: u8 = 0;

/// Splits a byte stream into typed messages, refusing any longer than `max`
/// (except, from a server, rows and `COPY` data: see [`Codec::server`]).
#[derive(Debug, Clone)]
pub struct Codec {
    max: usize,
    /// Whether rows, `COPY` data, errors and notices longer than `max` are
    /// passed on in parts.
    stream_large: bool,
    /// Bytes still to come of the message being passed on in parts.
    rest: usize,
}

impl Codec {
    /// A client's messages: any longer than `max` is refused.
    pub fn client(max: usize) -> Self {
        Self {
            max,
            stream_large: false,
            rest: 0,
        }
    }

    /// A server's messages: a row (`DataRow`), `COPY` data, an error or a
    /// notice longer than `max` is not held whole but given in parts as
    /// they arrive, the first with the message's tag and header, the
    /// others tagged [`PART`], to be relayed as they are (PostgreSQL
    /// bounds them at 1 GiB; an error's severity and code come first, so
    /// its first part has them); any other message longer than `max` is
    /// refused.
    pub fn server(max: usize) -> Self {
        Self {
            stream_large: true,
            ..Self::client(max)
        }
    }

    /// Whether a message passed on in parts has more to come.
    pub fn mid_message(&self) -> bool {
        self.rest > 0
    }

    /// Whether a message (or a part of one) is already here to decode.
    pub fn has_message(&self, buf: &[u8]) -> bool {
        if self.rest > 0 {
            return !buf.is_empty();
        }
        has_whole_message(buf) || (buf.len() >= 5 && self.streamed(buf))
    }

    /// Whether the message at the front of `buf` (its header read) is
    /// passed on in parts.
    fn streamed(&self, buf: &[u8]) -> bool {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        self.stream_large
            && matches!(buf[0], b'D' | b'd' | b'E' | b'N')
            && len >= 4
            && len as usize + 1 > self.max
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("malformed message length")]
    Malformed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Decoder for Codec {
    type Item = Msg;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Msg>, FrameError> {
        if self.rest > 0 {
            if src.is_empty() {
                return Ok(None);
            }
            let n = src.len().min(self.rest);
            self.rest -= n;
            return Ok(Some(Msg {
                tag: PART,
                frame: src.split_to(n).freeze(),
            }));
        }
        if src.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len < 4 {
            return Err(FrameError::Malformed);
        }
        let total = len as usize + 1;
        if total > self.max {
            if !self.streamed(src) {
                return Err(FrameError::TooLarge(total));
            }
            // The header and what is here of the body; the rest in parts.
            let n = src.len().min(total);
            self.rest = total - n;
            let frame = src.split_to(n).freeze();
            return Ok(Some(Msg {
                tag: frame[0],
                frame,
            }));
        }
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let frame = src.split_to(total).freeze();
        Ok(Some(Msg {
            tag: frame[0],
            frame,
        }))
    }
}

/// Whether `buf` holds at least one whole message (so more input is
/// already here and an output flush can wait).
pub fn has_whole_message(buf: &[u8]) -> bool {
    buf.len() >= 5
        && (i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]).max(4) as usize) < buf.len()
}

/// Start a message `tag` in `out`; returns where its length goes.
fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    at
}

fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// `ErrorResponse` (or `NoticeResponse` with tag `N`).
pub fn error(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let at = begin(out, b'E');
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        out.put_u8(field);
        cstr(out, value);
    }
    out.put_u8(0);
    finish(out, at);
}

/// A whole `ErrorResponse` frame.
pub fn error_frame(severity: &str, code: &str, message: &str) -> Bytes {
    let mut out = BytesMut::new();
    error(&mut out, severity, code, message);
    out.freeze()
}

/// `Authentication*` with its code and data.
pub fn auth(out: &mut BytesMut, code: i32, data: &[u8]) {
    let at = begin(out, b'R');
    out.put_i32(code);
    out.put_slice(data);
    finish(out, at);
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let at = begin(out, b'S');
    cstr(out, name);
    cstr(out, value);
    finish(out, at);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    let at = begin(out, b'K');
    out.put_i32(pid);
    out.put_i32(secret);
    finish(out, at);
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let at = begin(out, b'Z');
    out.put_u8(status);
    finish(out, at);
}

/// `CommandComplete` with its tag.
pub fn command_complete(out: &mut BytesMut, tag: &str) {
    let at = begin(out, b'C');
    cstr(out, tag);
    finish(out, at);
}

/// A simple `Query`.
pub fn query(out: &mut BytesMut, sql: &str) {
    let at = begin(out, b'Q');
    cstr(out, sql);
    finish(out, at);
}

/// `Parse` of `name` with the body of another Parse (its query and
/// parameter types) after the name.
pub fn parse_renamed(out: &mut BytesMut, name: &str, rest: &[u8]) {
    let at = begin(out, b'P');
    cstr(out, name);
    out.put_slice(rest);
    finish(out, at);
}

/// `Bind` or `Describe`/`Close` re-written: `head` before the statement
/// name, the new name, then `rest` after the old name.
pub fn renamed(out: &mut BytesMut, tag: u8, head: &[u8], name: &str, rest: &[u8]) {
    let at = begin(out, tag);
    out.put_slice(head);
    cstr(out, name);
    out.put_slice(rest);
    finish(out, at);
}

/// `Close` of a prepared statement.
pub fn close_statement(out: &mut BytesMut, name: &str) {
    let at = begin(out, b'C');
    out.put_u8(b'S');
    cstr(out, name);
    finish(out, at);
}

/// The NUL-terminated string at the start of `b`, and what follows it.
pub fn split_cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = std::str::from_utf8(&b[..end]).ok()?;
    Some((s, &b[end + 1..]))
}

/// The startup packet's parameters (after the protocol version).
pub fn startup_params(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    loop {
        let (k, rest) = split_cstr(b)?;
        if k.is_empty() {
            return Some(out);
        }
        let (v, rest) = split_cstr(rest)?;
        out.push((k.to_owned(), v.to_owned()));
        b = rest;
    }
}

/// The fields of an `ErrorResponse`/`NoticeResponse` body: (code, message).
pub fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut b = body;
    while let Some((&field, rest)) = b.split_first() {
        if field == 0 {
            break;
        }
        let Some((v, rest)) = split_cstr(rest) else {
            break;
        };
        match field {
            b'V' => severity = v.to_owned(),
            b'S' if severity.is_empty() => severity = v.to_owned(),
            b'C' => code = v.to_owned(),
            b'M' => message = v.to_owned(),
            _ => {}
        }
        b = rest;
    }
    (severity, code, message)
}

/// Read a big-endian i32 from the front of `b`.
pub fn get_i32(b: &mut &[u8]) -> Option<i32> {
    (b.len() >= 4).then(|| b.get_i32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_and_refuse_oversize_or_malformed() {
        let mut c = Codec::client(64);
        let mut buf = BytesMut::new();
        query(&mut buf, "SELECT 1");
        ready_for_query(&mut buf, b'I');
        assert!(has_whole_message(&buf));
        let m = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!((m.tag, m.body()), (b'Q', &b"SELECT 1\0"[..]));
        let m = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!((m.tag, m.body()), (b'Z', &b"I"[..]));
        assert!(c.decode(&mut buf).unwrap().is_none());
        let mut big = BytesMut::new();
        query(&mut big, &"x".repeat(100));
        assert!(matches!(c.decode(&mut big), Err(FrameError::TooLarge(_))));
        let mut bad = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert!(matches!(c.decode(&mut bad), Err(FrameError::Malformed)));
    }

    #[test]
    fn a_server_s_large_rows_and_errors_come_in_parts_and_other_large_messages_are_refused() {
        let mut c = Codec::server(64);
        let row = |n: usize| {
            let mut b = BytesMut::new();
            let at = begin(&mut b, b'D');
            b.put_i16(1);
            b.put_i32(n as i32);
            b.put_slice(&vec![b'x'; n]);
            finish(&mut b, at);
            b
        };
        let (small, large) = (row(10), row(200));
        let mut stream = BytesMut::new();
        stream.extend_from_slice(&small);
        stream.extend_from_slice(&large);
        ready_for_query(&mut stream, b'I');
        // Arriving 37 bytes at a time, as a socket may give them.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(37) {
            buf.extend_from_slice(chunk);
            while c.has_message(&buf) {
                got.push(c.decode(&mut buf).unwrap().expect("has_message said so"));
            }
            assert!(c.decode(&mut buf).unwrap().is_none());
        }
        assert_eq!(got[0].frame, small, "a small row whole");
        let parts: Vec<&Msg> = got[1..got.len() - 1].iter().collect();
        assert!(parts.len() > 1, "the large row in parts");
        assert_eq!(parts[0].tag, b'D');
        assert!(parts[1..].iter().all(|m| m.tag == PART));
        let joined: Vec<u8> = parts.iter().flat_map(|m| m.frame.to_vec()).collect();
        assert_eq!(joined, large, "the parts are the row, byte for byte");
        assert_eq!(got.last().unwrap().tag, b'Z', "then the next message whole");
        assert!(!c.mid_message());
        let mut first = BytesMut::from(&large[..100]);
        assert_eq!(c.decode(&mut first).unwrap().unwrap().tag, b'D');
        assert!(c.mid_message(), "the rest of the row is still to come");

        // A server's large error: in parts too, its severity and code in
        // the first.
        let mut c = Codec::server(64);
        let mut failed = BytesMut::new();
        error(&mut failed, "ERROR", "P0001", &"e".repeat(100));
        let whole = failed.clone().freeze();
        let first = c.decode(&mut failed.split_to(40)).unwrap().unwrap();
        assert_eq!(first.tag, b'E');
        let (severity, code, _) = error_fields(first.body());
        assert_eq!((severity.as_str(), code.as_str()), ("ERROR", "P0001"));
        assert!(c.mid_message());
        let rest = c.decode(&mut failed).unwrap().unwrap();
        assert_eq!(rest.tag, PART);
        assert_eq!([&first.frame[..], &rest.frame[..]].concat(), whole);
        assert!(!c.mid_message());

        // A client's large row, or a server's large other message: refused.
        assert!(matches!(
            Codec::client(64).decode(&mut row(200)),
            Err(FrameError::TooLarge(_))
        ));
        let mut status = BytesMut::new();
        let at = begin(&mut status, b'S');
        cstr(&mut status, "application_name");
        cstr(&mut status, &"x".repeat(100));
        finish(&mut status, at);
        assert!(matches!(
            Codec::server(64).decode(&mut status),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn startup_parameters_and_error_fields_parse() {
        let p = startup_params(b"user\0app\0database\0acme\0\0").unwrap();
        assert_eq!(
            p,
            vec![
                ("user".into(), "app".into()),
                ("database".into(), "acme".into())
            ]
        );
        assert!(startup_params(b"user\0app").is_none());
        let e = error_frame("FATAL", "28P01", "no");
        assert_eq!(
            error_fields(&e[5..]),
            ("FATAL".into(), "28P01".into(), "no".into())
        );
    }
}
