//! [`Framing`]: how hyper puts a response's body on the wire. What the head says is read
//! when the response leaves the service ([`Plan`]); what the body says of itself is read
//! from the answers the body wrapper gave hyper, when hyper asked ([`Plan::framing`]): a
//! body may answer `is_end_stream()` and `size_hint()` differently each time it is asked,
//! and only the answers hyper got decide how it framed the body.
//!
//! The rules transcribe hyper 1.x's own (`proto/h1/role.rs`, the HTTP/1 encoder;
//! `proto/h2/server.rs`) and what hyper's and h2's clients accept on the receiving side
//! (RFC 9113 §8.1.1 for HTTP/2). They are ours, and so may be wrong: `tests/contract/hyper_oracle.rs`
//! checks them against a real hyper server and client, over both protocols.

use http::header::CONNECTION;
use http::header::GetAll;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, StatusCode, Version};

/// What the request and the response's head tell about how hyper will send the body.
pub(crate) struct ResponseShape<'a> {
    pub(crate) request: RequestKind,
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    /// The response's own version (a handler may set HTTP/1.0, as a proxy passing an
    /// upstream response through does).
    pub(crate) version: Version,
}

/// What the body told hyper of itself when hyper wrote the head: `is_end_stream()`, then,
/// if that was `false`, its exact size hint if it had one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// At its end already: nothing to send.
    AtEnd,
    /// An exact size hint (its value is given to [`Plan::framing`]).
    Known,
    /// No exact size hint.
    Unknown,
}

/// The framing for each answer the body may give, worked out from the head alone, once,
/// as the response leaves the service (the head is hyper's afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    at_end: Framing,
    unknown: Framing,
    known: Known,
}

/// The framing of a body with an exact size hint, which depends on the hint's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// This framing, whatever the hint says.
    Is(Framing),
    /// Exactly as many bytes as the hint says.
    Hint,
    /// As many bytes as the hint says, if they are this many (a `Content-Length` hyper
    /// copies as it is); else refused.
    HintIf(u64),
}

impl Plan {
    pub(crate) fn of(shape: &ResponseShape<'_>) -> Self {
        // The headers are looked up once, for the three answers.
        let head = Lengths::of(shape);
        let decide = |answer| {
            if shape.request.http2 {
                Framing::http2(shape, &head, answer)
            } else {
                Framing::http1(shape, &head, answer)
            }
        };
        let fixed = |known| match known {
            Known::Is(framing) => framing,
            // Only a body with an exact size hint depends on its value.
            Known::Hint | Known::HintIf(_) => unreachable!("no size hint to depend on"),
        };
        Plan {
            at_end: fixed(decide(Answer::AtEnd)),
            unknown: fixed(decide(Answer::Unknown)),
            known: decide(Answer::Known),
        }
    }

    /// How hyper frames the body, given what the body told it: whether it was at its end,
    /// and its exact size hint.
    pub(crate) fn framing(&self, at_end: bool, exact: Option<u64>) -> Framing {
        match (at_end, exact) {
            (true, _) => self.at_end,
            (false, None) => self.unknown,
            (false, Some(len)) => match self.known {
                Known::Is(framing) => framing,
                Known::Hint => Framing::Length(len),
                Known::HintIf(declared) if declared == len => Framing::Length(len),
                Known::HintIf(_) => Framing::Refused,
            },
        }
    }
}

/// What the layer keeps of a request: four flags, nothing allocated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestKind {
    pub(crate) is_head: bool,
    pub(crate) is_connect: bool,
    /// Served over HTTP/2 (else HTTP/1.x).
    pub(crate) http2: bool,
    /// Served over HTTP/1.0: no chunked encoding.
    pub(crate) http10: bool,
}

/// How hyper will put the body on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body goes on the wire, or none the client reads: hyper writes the head and drops
    /// the body without polling it (HTTP/1: HEAD, 204, 304, 2xx to CONNECT, a body already
    /// at its end; HTTP/2: 2xx to CONNECT, a body already at its end), or the head is all
    /// the response is (HEAD over HTTP/2). Any drop counts as complete.
    Bodiless,
    /// Exactly this many bytes. HTTP/1: hyper stops polling once they are written (and
    /// cuts what goes past them; with 0, it never polls the body); HTTP/2: the stream must
    /// end after exactly them, or the client resets it.
    Length(u64),
    /// Up to the end of the stream (HTTP/1 chunked or close-delimited, HTTP/2 without a
    /// length the client checks).
    Stream,
    /// hyper, or its client, refuses this response: a malformed, conflicting or forbidden
    /// `Content-Length`, or one that contradicts the body's exact size hint. It never counts
    /// as complete.
    Refused,
}

impl Framing {
    /// hyper's HTTP/1 encoder (`Server::encode_headers`), then what hyper's client reads.
    fn http1(shape: &ResponseShape<'_>, head: &Lengths<'_>, answer: Answer) -> Known {
        let RequestKind {
            is_head,
            is_connect,
            http10,
            ..
        } = shape.request;
        // hyper answers an HTTP/1.0 request in HTTP/1.0, and keeps a version the handler set;
        // it sends HTTP/2 as HTTP/1.1, and panics on any other.
        // (Over an HTTP/1.0 connection it writes HTTP/1.0 whatever the handler set.)
        let known = [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2];
        if !http10 && !known.contains(&shape.version) {
            return Known::Is(Framing::Refused);
        }
        let http10 = http10 || shape.version == Version::HTTP_10;
        let status = shape.status;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // hyper cannot send 1xx as a final response: it answers 500 instead.
            return Known::Is(Framing::Refused);
        }
        let connect_2xx = is_connect && status.is_success();
        let bodiless = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || connect_2xx;
        let body = answer;
        // The encoder walks the headers in order; a length or an encoding already written
        // (always, for a 2xx answer to CONNECT) makes another one cancel the response.
        let mut wrote_len = connect_2xx;
        let mut written = None; // the `Content-Length` copied as it is (exact size hint)
        let mut framed = None; // the `Content-Length` parsed (no size hint)
        let mut chunked = false;
        // In the order they come in the head.
        let order = match head.encoding_first {
            true => [false, true],
            false => [true, false],
        };
        // Neither header (the common case): nothing to walk.
        let walk = if head.none { &[][..] } else { &order[..] };
        for &length in walk {
            let mut name_written = false;
            let values = if length {
                &head.lengths
            } else {
                &head.encodings
            };
            for value in values.iter().flat_map(GetAll::iter) {
                if wrote_len && !name_written {
                    return Known::Is(Framing::Refused);
                }
                if !length {
                    if http10 || bodiless {
                        break; // skipped: no chunked encoding here
                    }
                    (wrote_len, name_written, chunked) = (true, true, true);
                    continue;
                }
                match body {
                    Answer::Known => {
                        if !name_written {
                            written = Some(value);
                            (wrote_len, name_written) = (true, true);
                        }
                    }
                    Answer::Unknown => match (strict(value), framed) {
                        (None, _) => return Known::Is(Framing::Refused),
                        (Some(len), Some(previous)) if len != previous => {
                            return Known::Is(Framing::Refused);
                        }
                        (Some(len), _) => {
                            framed = Some(len);
                            (wrote_len, name_written) = (true, true);
                        }
                    },
                    // Written as an ordinary header after HEAD, skipped otherwise.
                    Answer::AtEnd if is_head => wrote_len = true,
                    Answer::AtEnd => break,
                }
            }
        }
        if bodiless || body == Answer::AtEnd {
            // The client reads no body, whatever a length says.
            return Known::Is(Framing::Bodiless);
        }
        if chunked {
            return Known::Is(Framing::Stream);
        }
        match (body, written) {
            // hyper trusts the hint; the client reads the header hyper copied.
            (Answer::Known, Some(written)) => match lenient(written) {
                Some(len) => Known::HintIf(len),
                None => Known::Is(Framing::Refused),
            },
            (Answer::Known, None) => Known::Hint,
            _ => Known::Is(framed.map_or(Framing::Stream, Framing::Length)),
        }
    }

    /// hyper's HTTP/2 server (`H2Stream::poll2`), then what h2's client accepts.
    fn http2(shape: &ResponseShape<'_>, head: &Lengths<'_>, answer: Answer) -> Known {
        let RequestKind {
            is_head,
            is_connect,
            ..
        } = shape.request;
        let status = shape.status;
        if status.is_informational() {
            // Not a final status: the client fails the connection.
            return Known::Is(Framing::Refused);
        }
        let values = || head.lengths.iter().flat_map(GetAll::iter);
        if is_connect && status.is_success() {
            // hyper resets the stream if the length reads as a number other than 0, and
            // otherwise strips it and makes the stream a tunnel, dropping the body unpolled.
            let mut lens = values().map(lenient);
            let declared = match lens.next() {
                Some(Some(len)) if lens.all(|other| other == Some(len)) => Some(len),
                _ => None,
            };
            return Known::Is(match declared {
                Some(len) if len != 0 => Framing::Refused,
                _ => Framing::Bodiless,
            });
        }
        // h2's client parses every value strictly and refuses values that differ.
        let mut declared = None;
        for value in values() {
            match (h2_strict(value), declared) {
                (None, _) => return Known::Is(Framing::Refused),
                (Some(len), Some(previous)) if len != previous => {
                    return Known::Is(Framing::Refused);
                }
                (len, _) => declared = len,
            }
        }
        if answer == Answer::AtEnd {
            // Sent as a HEADERS frame that ends the stream: malformed if it declares a
            // length other than 0 (but for HEAD, 204 and 304).
            let excused =
                is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
            return Known::Is(match declared {
                Some(len) if len > 0 && !excused => Framing::Refused,
                _ => Framing::Bodiless,
            });
        }
        if is_head {
            // hyper sends the head, then whatever the body holds, which the client
            // refuses; a HEAD response is complete once its head is out, and it is out
            // before the body is polled or dropped.
            return Known::Is(Framing::Bodiless);
        }
        if is_connect {
            // hyper's client does not hold a non-2xx answer to CONNECT to its length.
            return Known::Is(Framing::Stream);
        }
        // hyper fills a missing `Content-Length` from the exact size hint.
        match (declared, answer) {
            (Some(len), _) => Known::Is(Framing::Length(len)),
            (None, Answer::Known) => Known::Hint,
            (None, _) => Known::Is(Framing::Stream),
        }
    }
}

/// The head's `Content-Length` and `Transfer-Encoding` lines, looked up once.
struct Lengths<'a> {
    /// The `Content-Length` lines, as hyper reads them: over HTTP/2, none if the
    /// `Connection` header names `Content-Length` (hyper removes what it names).
    lengths: Option<GetAll<'a, HeaderValue>>,
    encodings: Option<GetAll<'a, HeaderValue>>,
    /// The `Transfer-Encoding` comes before the `Content-Length` in the head.
    encoding_first: bool,
    /// Neither header is there.
    none: bool,
}

impl<'a> Lengths<'a> {
    fn of(shape: &ResponseShape<'a>) -> Self {
        let headers = shape.headers;
        let lengths = headers.get_all(CONTENT_LENGTH);
        if shape.request.http2 {
            // hyper removes the headers that the (first) `Connection` header names, then
            // the `Connection` header itself, before it reads the length.
            let stripped = headers
                .get(CONNECTION)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|names| {
                    names
                        .split(',')
                        .any(|name| name.trim().eq_ignore_ascii_case(CONTENT_LENGTH.as_str()))
                });
            return Lengths {
                lengths: (!stripped).then_some(lengths),
                encodings: None,
                encoding_first: false,
                none: false,
            };
        }
        let encodings = headers.get_all(TRANSFER_ENCODING);
        // Only when both are there does the order matter (and is worth a walk over the
        // header names).
        let (any_length, any_encoding) = (
            lengths.iter().next().is_some(),
            encodings.iter().next().is_some(),
        );
        let both = any_length && any_encoding;
        let encoding_first = both
            && headers
                .keys()
                .find(|name| **name == CONTENT_LENGTH || **name == TRANSFER_ENCODING)
                .is_some_and(|name| *name == TRANSFER_ENCODING);
        Lengths {
            lengths: Some(lengths),
            encodings: Some(encodings),
            encoding_first,
            none: !any_length && !any_encoding,
        }
    }
}

/// A `Content-Length` value as hyper's HTTP/1 encoder reads it: a plain decimal number (no
/// sign, no list, no spaces) that fits in a `u64`.
fn strict(value: &HeaderValue) -> Option<u64> {
    digits(value.as_bytes())
}

/// A `Content-Length` value as h2's client reads it: as [`strict`], in 19 bytes at most
/// (leading zeros count).
fn h2_strict(value: &HeaderValue) -> Option<u64> {
    (value.len() <= 19).then(|| strict(value)).flatten()
}

/// A `Content-Length` value as hyper's HTTP/1 client (and its HTTP/2 server, for CONNECT)
/// reads it: a comma-separated list of plain numbers, all equal.
fn lenient(value: &HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?;
    let mut lens = text.split(',').map(|part| digits(part.trim().as_bytes()));
    let first = lens.next()??;
    lens.all(|len| len == Some(first)).then_some(first)
}

fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |len, &byte| {
        let digit = byte.checked_sub(b'0').filter(|digit| *digit <= 9)?;
        len.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    //! The framing decisions, one row per rule, each written from hyper 1.x's source (the
    //! HTTP/1 encoder `proto/h1/role.rs`, the HTTP/1 dispatcher `proto/h1/dispatch.rs`, the
    //! HTTP/2 server `proto/h2/server.rs`) or from what h2's client refuses (RFC 9113
    //! §8.1.1). `tests/contract/hyper_oracle.rs` checks the same rules against a real hyper server
    //! and client; these rows say which rule is which, and fail on the line that changed.

    use super::*;
    use http::Method;

    /// What the body tells hyper when it writes the head.
    #[derive(Clone, Copy)]
    enum Body {
        AtEnd,
        Exact(u64),
        Unknown,
    }

    /// One row: the request, the response's head and body, and the framing it gets.
    struct Row {
        why: &'static str,
        http2: bool,
        method: Method,
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: Body,
        framing: Framing,
    }

    fn decide(row: &Row) -> Framing {
        let mut headers = HeaderMap::new();
        for (name, value) in row.headers {
            headers.append(*name, HeaderValue::from_static(value));
        }
        let shape = ResponseShape {
            request: RequestKind {
                is_head: row.method == Method::HEAD,
                is_connect: row.method == Method::CONNECT,
                http2: row.http2,
                http10: false,
            },
            status: StatusCode::from_u16(row.status).unwrap(),
            headers: &headers,
            version: if row.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
        };
        let plan = Plan::of(&shape);
        match row.body {
            Body::AtEnd => plan.framing(true, None),
            Body::Exact(len) => plan.framing(false, Some(len)),
            Body::Unknown => plan.framing(false, None),
        }
    }

    const CL: &str = "content-length";
    const TE: &str = "transfer-encoding";

    fn h1(
        why: &'static str,
        method: Method,
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: Body,
        framing: Framing,
    ) -> Row {
        Row {
            why,
            http2: false,
            method,
            status,
            headers,
            body,
            framing,
        }
    }

    fn h2(
        why: &'static str,
        method: Method,
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: Body,
        framing: Framing,
    ) -> Row {
        Row {
            http2: true,
            ..h1(why, method, status, headers, body, framing)
        }
    }

    #[test]
    fn framing_follows_hypers_rules() {
        use Framing::{Bodiless, Length, Refused, Stream};
        use Method as M;
        let rows = [
            // HTTP/1.1: dispatch.rs writes the head with no body when `is_end_stream()`.
            h1(
                "h1 body at its end",
                M::GET,
                200,
                &[],
                Body::AtEnd,
                Bodiless,
            ),
            h1(
                "h1 at end, length ignored",
                M::GET,
                200,
                &[(CL, "5")],
                Body::AtEnd,
                Bodiless,
            ),
            // role.rs: HEAD, 1xx, 204, 304 and a 2xx answer to CONNECT carry no body.
            h1(
                "h1 HEAD",
                M::HEAD,
                200,
                &[(CL, "5")],
                Body::Unknown,
                Bodiless,
            ),
            h1("h1 204", M::GET, 204, &[], Body::Exact(3), Bodiless),
            h1("h1 304", M::GET, 304, &[(CL, "9")], Body::Unknown, Bodiless),
            h1(
                "h1 2xx to CONNECT",
                M::CONNECT,
                200,
                &[],
                Body::Unknown,
                Bodiless,
            ),
            // role.rs: an exact size hint frames the body, and a header is copied as it is.
            h1("h1 exact hint", M::GET, 200, &[], Body::Exact(7), Length(7)),
            h1(
                "h1 hint and equal header",
                M::GET,
                200,
                &[(CL, "7")],
                Body::Exact(7),
                Length(7),
            ),
            h1(
                "h1 hint contradicted",
                M::GET,
                200,
                &[(CL, "8")],
                Body::Exact(7),
                Refused,
            ),
            // role.rs: without a hint, a valid `Content-Length` frames it; else chunked.
            h1(
                "h1 header length",
                M::GET,
                200,
                &[(CL, "12")],
                Body::Unknown,
                Length(12),
            ),
            h1(
                "h1 no length: chunked",
                M::GET,
                200,
                &[],
                Body::Unknown,
                Stream,
            ),
            h1(
                "h1 malformed length",
                M::GET,
                200,
                &[(CL, "+10")],
                Body::Unknown,
                Refused,
            ),
            h1(
                "h1 list as length",
                M::GET,
                200,
                &[(CL, "10, 10")],
                Body::Unknown,
                Refused,
            ),
            h1(
                "h1 two differing lengths",
                M::GET,
                200,
                &[(CL, "3"), (CL, "4")],
                Body::Unknown,
                Refused,
            ),
            h1(
                "h1 two equal lengths",
                M::GET,
                200,
                &[(CL, "3"), (CL, "3")],
                Body::Unknown,
                Length(3),
            ),
            // role.rs: `Transfer-Encoding` set by the handler makes it chunked; after a
            // length already written it cancels the response.
            h1(
                "h1 chunked header",
                M::GET,
                200,
                &[(TE, "chunked")],
                Body::Unknown,
                Stream,
            ),
            h1(
                "h1 length, then encoding",
                M::GET,
                200,
                &[(CL, "3"), (TE, "chunked")],
                Body::Unknown,
                Refused,
            ),
            // role.rs: a 1xx other than 101 cannot be a final response (hyper answers 500).
            h1("h1 1xx as final", M::GET, 103, &[], Body::Unknown, Refused),
            // HTTP/2, server.rs: a body at its end goes out as a HEADERS frame ending the
            // stream; a length other than 0 there is malformed (but for HEAD, 204, 304).
            h2("h2 at end", M::GET, 200, &[], Body::AtEnd, Bodiless),
            h2(
                "h2 at end, length 5",
                M::GET,
                200,
                &[(CL, "5")],
                Body::AtEnd,
                Refused,
            ),
            h2(
                "h2 204 at end, length 5",
                M::GET,
                204,
                &[(CL, "5")],
                Body::AtEnd,
                Bodiless,
            ),
            // server.rs: HEAD's head is the whole response the client reads.
            h2("h2 HEAD", M::HEAD, 200, &[], Body::Unknown, Bodiless),
            // server.rs: a 2xx answer to CONNECT is a tunnel; a length other than 0 resets it.
            h2(
                "h2 CONNECT, length 0",
                M::CONNECT,
                200,
                &[(CL, "0")],
                Body::Unknown,
                Bodiless,
            ),
            h2(
                "h2 CONNECT, length 5",
                M::CONNECT,
                200,
                &[(CL, "5")],
                Body::Unknown,
                Refused,
            ),
            // server.rs: a missing `Content-Length` is filled from the exact size hint.
            h2("h2 exact hint", M::GET, 200, &[], Body::Exact(4), Length(4)),
            h2(
                "h2 header wins",
                M::GET,
                200,
                &[(CL, "6")],
                Body::Exact(4),
                Length(6),
            ),
            h2("h2 no length", M::GET, 200, &[], Body::Unknown, Stream),
            // server.rs strips what `Connection` names before it reads the length.
            h2(
                "h2 length named by Connection",
                M::GET,
                200,
                &[("connection", "content-length"), (CL, "6")],
                Body::Unknown,
                Stream,
            ),
            // h2's client: strict digits, at most 19 of them, all values equal.
            h2(
                "h2 malformed",
                M::GET,
                200,
                &[(CL, "6 ")],
                Body::Unknown,
                Refused,
            ),
            h2(
                "h2 twenty digits",
                M::GET,
                200,
                &[(CL, "00000000000000000006")],
                Body::Unknown,
                Refused,
            ),
            h2("h2 1xx as final", M::GET, 100, &[], Body::Unknown, Refused),
        ];
        let wrong: Vec<String> = rows
            .iter()
            .filter_map(|row| {
                let got = decide(row);
                (got != row.framing)
                    .then(|| format!("{}: {:?}, expected {:?}", row.why, got, row.framing))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
