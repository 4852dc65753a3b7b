//! Accepts HTTP/2 requests whose `:authority` is not a valid authority, as etcd does.
//!
//! etcd's Go client dials a single endpoint through grpc-go's `passthrough:///<endpoint>`
//! target (etcdctl 3.4's `endpoint status`, `endpoint hashkv`, `defrag`, ...), so an endpoint
//! given as `http://127.0.0.1:2379` is sent whole as the request's `:authority`. Go's HTTP/2
//! server ignores it. h2, the HTTP/2 implementation under hyper and tonic, resets such a stream
//! with PROTOCOL_ERROR while decoding its headers, before any service sees the request, and has
//! no setting to accept it.
//!
//! [`Lenient`] wraps a listener so that every accepted connection is read through [`Conn`].
//! On HTTP/2 connections `Conn` follows the client's HPACK state and renames each `:authority`
//! field whose value h2 would refuse to [`RENAMED`], an ordinary header with the same value.
//! The two names have the same length, so the entry the client's encoder adds to its dynamic
//! table has the same size in h2's table, and later indexes stay the same on both sides.
//! Frames are otherwise passed on byte for byte: header blocks that need no rename, every other
//! frame, all of HTTP/1.1, and all writes. Whatever this reader cannot follow (a malformed or
//! oversized header block) ends the rewriting for that connection and is left to h2 to refuse.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The name a rejected `:authority` is given; exactly as long as `:authority`.
pub const RENAMED: &[u8; 10] = b"x-endpoint";
const AUTHORITY: &[u8; 10] = b":authority";

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a peer may send before it learns otherwise (oxcd never raises it).
const MAX_FRAME: usize = 16_384;
/// Header blocks larger than this are left alone (h2 refuses header lists over 16 KiB anyway).
const MAX_BLOCK: usize = 64 * 1024;
/// HPACK's dynamic table size before the encoder announces another.
const DEFAULT_TABLE_SIZE: usize = 4096;

/// A listener whose connections are [`Conn`]s.
pub struct Lenient<L>(pub L);

impl<L: axum::serve::Listener> axum::serve::Listener for Lenient<L> {
    type Io = Conn<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (Conn::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// One accepted connection; see the module docs.
pub struct Conn<T> {
    inner: T,
    mode: Mode,
    /// Bytes read from `inner` and not yet examined.
    raw: Vec<u8>,
    /// Examined bytes not yet handed to the reader: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
}

enum Mode {
    /// Waiting to see whether the connection starts with the HTTP/2 client preface.
    Preface,
    Frames(Box<Frames>),
    /// Everything passes through unexamined.
    Transparent,
}

impl<T> Conn<T> {
    pub fn new(inner: T) -> Self {
        Conn {
            inner,
            mode: Mode::Preface,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Moves every complete unit of `raw` (the preface, a frame header, passed-through payload,
    /// a whole header block) to `out`, rewritten where needed.
    fn examine(&mut self) {
        let mut at = 0;
        loop {
            let input = &self.raw[at..];
            match &mut self.mode {
                Mode::Transparent => {
                    self.out.extend_from_slice(input);
                    at = self.raw.len();
                    break;
                }
                Mode::Preface => {
                    let n = input.len().min(PREFACE.len());
                    if input[..n] != PREFACE[..n] {
                        self.mode = Mode::Transparent;
                    } else if n == PREFACE.len() {
                        self.out.extend_from_slice(PREFACE);
                        at += n;
                        self.mode = Mode::Frames(Box::new(Frames::new()));
                    } else {
                        break;
                    }
                }
                Mode::Frames(frames) => match frames.step(input, &mut self.out) {
                    Step::Consumed(n) => at += n,
                    Step::NeedMore => break,
                    Step::GiveUp => self.mode = Mode::Transparent,
                },
            }
        }
        self.raw.drain(..at);
    }

    /// At end of input: whatever is held back goes on as it was received.
    fn release_all(&mut self) {
        if let Mode::Frames(frames) = &mut self.mode {
            frames.release_pending(&mut self.out);
        }
        self.out.append(&mut self.raw);
        self.mode = Mode::Transparent;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Conn<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.raw.is_empty() {
                // Bytes that need no examining (HTTP/1.1, frame payloads) go straight through.
                let direct = match &this.mode {
                    Mode::Transparent => Some(usize::MAX),
                    Mode::Frames(f) if f.skip > 0 => Some(f.skip),
                    _ => None,
                };
                if let Some(limit) = direct {
                    let n = if limit >= buf.remaining() {
                        let before = buf.filled().len();
                        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                        buf.filled().len() - before
                    } else {
                        let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                        let n = part.filled().len();
                        buf.advance(n);
                        n
                    };
                    if let Mode::Frames(f) = &mut this.mode {
                        f.skip -= n;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            let mut chunk = [0u8; 8192];
            let mut part = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
            if part.filled().is_empty() {
                // End of input; the next round passes it on once `out` is drained.
                this.release_all();
                continue;
            }
            this.raw.extend_from_slice(part.filled());
            this.examine();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

enum Step {
    Consumed(usize),
    NeedMore,
    /// Stop examining; nothing of the current input was consumed.
    GiveUp,
}

/// The client-to-server frame stream after the preface.
struct Frames {
    table: Table,
    /// Payload bytes of the current frame (not a header block) still to pass through.
    skip: usize,
    /// A header block still waiting for CONTINUATION frames.
    pending: Option<Pending>,
    /// A header block could not be followed: the rest is h2's to judge.
    lost: bool,
}

struct Pending {
    stream: u32,
    /// The HEADERS frame's END_STREAM and PRIORITY flags.
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames exactly as received.
    original: Vec<u8>,
}

impl Frames {
    fn new() -> Self {
        Frames {
            table: Table::new(),
            skip: 0,
            pending: None,
            lost: false,
        }
    }

    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        if self.lost {
            self.release_pending(out);
            return Step::GiveUp;
        }
        if self.skip > 0 {
            if input.is_empty() {
                return Step::NeedMore;
            }
            let n = self.skip.min(input.len());
            out.extend_from_slice(&input[..n]);
            self.skip -= n;
            return Step::Consumed(n);
        }
        if input.len() < 9 {
            return Step::NeedMore;
        }
        let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
        let (kind, flags) = (input[3], input[4]);
        let stream = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
        let in_block = kind == HEADERS || kind == CONTINUATION || self.pending.is_some();
        if !in_block {
            out.extend_from_slice(&input[..9]);
            self.skip = len;
            return Step::Consumed(9);
        }
        if len > MAX_FRAME {
            self.lost = true;
            return self.step(input, out);
        }
        if input.len() < 9 + len {
            return Step::NeedMore;
        }
        let frame = &input[..9 + len];
        let payload = &frame[9..];
        let pending = match self.pending.take() {
            None if kind == HEADERS => {
                let Some((priority, fragment)) = headers_fragment(flags, payload) else {
                    self.lost = true;
                    return self.step(input, out);
                };
                Pending {
                    stream,
                    flags: flags & (END_STREAM | PRIORITY),
                    priority,
                    block: fragment.to_vec(),
                    original: frame.to_vec(),
                }
            }
            Some(mut p)
                if kind == CONTINUATION
                    && stream == p.stream
                    && p.block.len() + payload.len() <= MAX_BLOCK =>
            {
                p.block.extend_from_slice(payload);
                p.original.extend_from_slice(frame);
                p
            }
            other => {
                self.pending = other;
                self.lost = true;
                return self.step(input, out);
            }
        };
        if flags & END_HEADERS == 0 {
            self.pending = Some(pending);
        } else {
            match rewrite_block(&mut self.table, &pending.block) {
                Ok(None) => out.extend_from_slice(&pending.original),
                Ok(Some(block)) => {
                    write_block(out, pending.stream, pending.flags, pending.priority, &block)
                }
                Err(Malformed) => {
                    out.extend_from_slice(&pending.original);
                    self.lost = true;
                }
            }
        }
        Step::Consumed(frame.len())
    }

    fn release_pending(&mut self, out: &mut Vec<u8>) {
        if let Some(p) = self.pending.take() {
            out.extend_from_slice(&p.original);
        }
    }
}

/// A HEADERS payload's priority fields and header block fragment (padding removed).
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = body.split_first()?;
        pad = usize::from(n);
        body = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, rest) = body.split_first_chunk::<5>()?;
        priority = Some(*fields);
        body = rest;
    }
    let end = body.len().checked_sub(pad)?;
    Some((priority, &body[..end]))
}

/// A header block as one HEADERS frame plus CONTINUATION frames as needed (without padding).
fn write_block(out: &mut Vec<u8>, stream: u32, flags: u8, priority: Option<[u8; 5]>, block: &[u8]) {
    let mut rest = block;
    let mut first = true;
    loop {
        let prefix: &[u8] = match (first, &priority) {
            (true, Some(p)) => p,
            _ => &[],
        };
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME - prefix.len()));
        let (kind, mut frame_flags) = if first {
            (HEADERS, flags)
        } else {
            (CONTINUATION, 0)
        };
        if after.is_empty() {
            frame_flags |= END_HEADERS;
        }
        let len = (prefix.len() + chunk.len()) as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(frame_flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(prefix);
        out.extend_from_slice(chunk);
        if after.is_empty() {
            return;
        }
        rest = after;
        first = false;
    }
}

#[derive(Debug, PartialEq)]
struct Malformed;

/// Follows one header block through the client's dynamic table; returns the block with every
/// refused `:authority` renamed, or `None` when it has none.
fn rewrite_block(table: &mut Table, block: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut pos = 0;
    while pos < block.len() {
        let start = pos;
        let first = block[pos];
        if first & 0x80 != 0 {
            // Indexed field.
            let (index, next) = integer(block, pos, 7)?;
            table.name(index)?;
            pos = next;
            continue;
        }
        if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            let (max, next) = integer(block, pos, 5)?;
            table.resize(max);
            pos = next;
            continue;
        }
        // Literal field: with incremental indexing (01), never indexed (0001), without
        // indexing (0000). The rename keeps the representation.
        let (indexing, prefix_bits, pattern) = match first {
            b if b & 0xc0 == 0x40 => (true, 6, 0x40),
            b if b & 0xf0 == 0x10 => (false, 4, 0x10),
            _ => (false, 4, 0x00),
        };
        let (index, mut next) = integer(block, pos, prefix_bits)?;
        let (is_authority, name_len) = if index == 0 {
            let (name, after) = string(block, next)?;
            next = after;
            (name == AUTHORITY.as_slice(), name.len())
        } else {
            table.name(index)?
        };
        let value_at = next;
        let (value, after) = string(block, next)?;
        pos = after;
        if indexing {
            table.insert(Entry {
                is_authority,
                name_len,
                size: name_len + value.len() + 32,
            });
        }
        if is_authority && Authority::try_from(value.as_slice()).is_err() {
            let rewritten = out.get_or_insert_with(|| Vec::with_capacity(block.len() + 16));
            rewritten.extend_from_slice(&block[copied..start]);
            rewritten.push(pattern);
            rewritten.push(RENAMED.len() as u8);
            rewritten.extend_from_slice(RENAMED);
            rewritten.extend_from_slice(&block[value_at..pos]);
            copied = pos;
        }
    }
    Ok(out.map(|mut rewritten| {
        rewritten.extend_from_slice(&block[copied..]);
        rewritten
    }))
}

/// An HPACK integer with a `prefix_bits` prefix at `pos`: (value, position after it).
fn integer(buf: &[u8], pos: usize, prefix_bits: u32) -> Result<(usize, usize), Malformed> {
    let mask = (1u8 << prefix_bits) - 1;
    let first = buf.get(pos).ok_or(Malformed)? & mask;
    if first < mask {
        return Ok((usize::from(first), pos + 1));
    }
    let mut value = usize::from(mask);
    let mut shift = 0;
    let mut at = pos + 1;
    loop {
        let b = *buf.get(at).ok_or(Malformed)?;
        at += 1;
        if shift > 28 {
            return Err(Malformed);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, at));
        }
    }
}

/// An HPACK string literal at `pos`, decoded: (octets, position after it).
fn string(buf: &[u8], pos: usize) -> Result<(Vec<u8>, usize), Malformed> {
    let huffman = buf.get(pos).ok_or(Malformed)? & 0x80 != 0;
    let (len, start) = integer(buf, pos, 7)?;
    let end = start.checked_add(len).ok_or(Malformed)?;
    let octets = buf.get(start..end).ok_or(Malformed)?;
    let decoded = if huffman {
        huffman_decode(octets)?
    } else {
        octets.to_vec()
    };
    Ok((decoded, end))
}

/// The client's HPACK dynamic table, as far as renaming needs it: which entries are named
/// `:authority`, and every entry's size (so eviction matches the client's).
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

struct Entry {
    is_authority: bool,
    name_len: usize,
    size: usize,
}

/// Name lengths of HPACK's static table (RFC 7541 appendix A), index 1 first.
#[rustfmt::skip]
const STATIC_NAME_LENS: [usize; 61] = [
    10, 7, 7, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7, 7, // :authority .. :status
    14, 15, 15, 13, 6, 27, 3, 5, 13, 13, 19, 16, 16, 14, 16, 13, // accept-charset .. content-range
    12, 6, 4, 4, 6, 7, 4, 4, 8, 17, 13, 8, 19, 13, 4, 8, // content-type .. location
    12, 18, 19, 5, 7, 7, 11, 6, 10, 25, 17, 10, 4, 3, 16, // max-forwards .. www-authenticate
];

impl Table {
    fn new() -> Self {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max: DEFAULT_TABLE_SIZE,
        }
    }

    /// Whether the name at `index` is `:authority`, and its length.
    fn name(&self, index: usize) -> Result<(bool, usize), Malformed> {
        match index {
            0 => Err(Malformed),
            1..=61 => Ok((index == 1, STATIC_NAME_LENS[index - 1])),
            _ => self
                .entries
                .get(index - 62)
                .map(|e| (e.is_authority, e.name_len))
                .ok_or(Malformed),
        }
    }

    fn insert(&mut self, entry: Entry) {
        self.evict_to(self.max.saturating_sub(entry.size));
        if entry.size <= self.max {
            self.size += entry.size;
            self.entries.push_front(entry);
        }
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }
}

/// HPACK's Huffman code lengths (RFC 7541 appendix B) by symbol; 256 is end-of-string. The
/// code is canonical, so the lengths determine the codes.
#[rustfmt::skip]
const CODE_LENS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];
const EOS: u16 = 256;
const MAX_CODE_LEN: usize = 30;

/// Canonical decoding tables: for each code length, its first code and how many codes have it,
/// and the symbols ordered by (length, symbol).
struct Canonical {
    first: [u32; MAX_CODE_LEN + 1],
    count: [u32; MAX_CODE_LEN + 1],
    offset: [usize; MAX_CODE_LEN + 1],
    symbols: [u16; 257],
}

const CANONICAL: Canonical = {
    let mut c = Canonical {
        first: [0; MAX_CODE_LEN + 1],
        count: [0; MAX_CODE_LEN + 1],
        offset: [0; MAX_CODE_LEN + 1],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        c.count[CODE_LENS[s] as usize] += 1;
        s += 1;
    }
    let mut code = 0u32;
    let mut next = 0usize;
    let mut len = 1;
    while len <= MAX_CODE_LEN {
        code = (code + c.count[len - 1]) << 1;
        c.first[len] = code;
        c.offset[len] = next;
        let mut s = 0;
        while s < 257 {
            if CODE_LENS[s] as usize == len {
                c.symbols[next] = s as u16;
                next += 1;
            }
            s += 1;
        }
        len += 1;
    }
    c
};

fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, Malformed> {
    let c = &CANONICAL;
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            let rank = code.wrapping_sub(c.first[len]);
            if code >= c.first[len] && rank < c.count[len] {
                let symbol = c.symbols[c.offset[len] + rank as usize];
                if symbol == EOS {
                    return Err(Malformed);
                }
                out.push(symbol as u8);
                code = 0;
                len = 0;
            } else if len == MAX_CODE_LEN {
                return Err(Malformed);
            }
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones.
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_string(s: &[u8]) -> Vec<u8> {
        assert!(s.len() < 127);
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_decodes_rfc7541_examples() {
        // RFC 7541 C.4.1 and C.4.2.
        assert_eq!(
            huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")).unwrap(),
            b"www.example.com"
        );
        assert_eq!(huffman_decode(&hex("a8eb 1064 9cbf")).unwrap(), b"no-cache");
        // C.6.1: a value with 8-bit and longer codes.
        assert_eq!(
            huffman_decode(&hex(
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff"
            ))
            .unwrap(),
            b"Mon, 21 Oct 2013 20:13:21 GMT"
        );
        // Padding longer than 7 bits, or not all ones, is an error.
        assert_eq!(
            huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff ff")),
            Err(Malformed)
        );
        assert_eq!(huffman_decode(&hex("00")), Err(Malformed));
        assert_eq!(huffman_decode(&hex("ff")), Err(Malformed));
    }

    #[test]
    fn static_name_lengths_match_the_table() {
        let names = ":authority :method :method :path :path :scheme :scheme :status :status \
            :status :status :status :status :status accept-charset accept-encoding \
            accept-language accept-ranges accept access-control-allow-origin age allow \
            authorization cache-control content-disposition content-encoding content-language \
            content-length content-location content-range content-type cookie date etag expect \
            expires from host if-match if-modified-since if-none-match if-range \
            if-unmodified-since last-modified link location max-forwards proxy-authenticate \
            proxy-authorization range referer refresh retry-after server set-cookie \
            strict-transport-security transfer-encoding user-agent vary via www-authenticate";
        let lens: Vec<usize> = names.split_whitespace().map(str::len).collect();
        assert_eq!(lens, STATIC_NAME_LENS);
    }

    /// A request block as grpc-go encodes it the first time on a connection.
    fn first_request(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        b.push(0x44); // :path, incremental indexing
        b.extend(raw_string(b"/etcdserverpb.Maintenance/Status"));
        b.push(0x41); // :authority, incremental indexing
        b.extend(raw_string(authority));
        b.push(0x5f); // content-type (31), incremental indexing
        b.extend(raw_string(b"application/grpc"));
        b
    }

    #[test]
    fn url_authority_is_renamed_and_indexes_stay_aligned() {
        let mut table = Table::new();
        let block = first_request(b"http://127.0.0.1:2379");
        let out = rewrite_block(&mut table, &block)
            .unwrap()
            .expect("rewritten");
        let mut want = vec![0x83, 0x86, 0x44];
        want.extend(raw_string(b"/etcdserverpb.Maintenance/Status"));
        want.push(0x40);
        want.extend(raw_string(RENAMED));
        want.extend(raw_string(b"http://127.0.0.1:2379"));
        want.push(0x5f);
        want.extend(raw_string(b"application/grpc"));
        assert_eq!(out, want);
        // Same size as the client's entry: both tables hold 3 entries of equal sizes.
        assert_eq!(table.entries.len(), 3);
        assert_eq!(table.entries[1].size, 10 + 21 + 32);
        assert!(table.entries[1].is_authority);
        // The next request refers to the entries by index: nothing to rewrite.
        let again = [0x83, 0x86, 0xc0, 0xbf, 0xbe];
        assert_eq!(rewrite_block(&mut table, &again).unwrap(), None);
        // A literal naming the dynamic `:authority` entry (index 63) with a URL is renamed too.
        let mut by_dynamic_name = vec![0x0f, 0x30]; // without indexing, index 15 + 48 = 63
        by_dynamic_name.extend(raw_string(b"unix:///tmp/sock"));
        let out = rewrite_block(&mut table, &by_dynamic_name)
            .unwrap()
            .unwrap();
        let mut want = vec![0x00];
        want.extend(raw_string(RENAMED));
        want.extend(raw_string(b"unix:///tmp/sock"));
        assert_eq!(out, want);
    }

    #[test]
    fn valid_authority_is_left_alone() {
        let mut table = Table::new();
        let block = first_request(b"127.0.0.1:2379");
        assert_eq!(rewrite_block(&mut table, &block).unwrap(), None);
        // Huffman-coded, as Go sends it when shorter: "www.example.com".
        let mut b = vec![0x41, 0x8c];
        b.extend(hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"));
        assert_eq!(rewrite_block(&mut table, &b).unwrap(), None);
        // A literal with a new name ":authority" holding a URL is found as well.
        let mut b = vec![0x10];
        b.extend(raw_string(AUTHORITY));
        b.extend(raw_string(b"https://h:1"));
        let out = rewrite_block(&mut table, &b).unwrap().unwrap();
        let mut want = vec![0x10];
        want.extend(raw_string(RENAMED));
        want.extend(raw_string(b"https://h:1"));
        assert_eq!(out, want);
    }

    #[test]
    fn eviction_follows_the_client() {
        let mut table = Table::new();
        table.resize(100);
        table.insert(Entry {
            is_authority: true,
            name_len: 10,
            size: 60,
        });
        table.insert(Entry {
            is_authority: false,
            name_len: 5,
            size: 50,
        });
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.name(62).unwrap(), (false, 5));
        assert_eq!(table.name(63), Err(Malformed));
        table.insert(Entry {
            is_authority: false,
            name_len: 5,
            size: 101,
        });
        assert!(table.entries.is_empty());
        assert_eq!(table.size, 0);
    }

    #[test]
    fn split_blocks_are_joined_and_reframed() {
        let mut frames = Frames::new();
        let block = first_request(b"http://127.0.0.1:2379");
        let (a, b) = block.split_at(10);
        let mut input = Vec::new();
        // HEADERS, padded, with priority, no END_HEADERS; then a CONTINUATION.
        let payload_len = 1 + 5 + a.len() + 3;
        input.extend_from_slice(&(payload_len as u32).to_be_bytes()[1..]);
        input.extend_from_slice(&[HEADERS, END_STREAM | PADDED | PRIORITY, 0, 0, 0, 1]);
        input.push(3);
        input.extend_from_slice(&[0, 0, 0, 0, 15]);
        input.extend_from_slice(a);
        input.extend_from_slice(&[0, 0, 0]);
        input.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
        input.extend_from_slice(&[CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        input.extend_from_slice(b);
        // Then a DATA frame passed through untouched.
        input.extend_from_slice(&[0, 0, 2, 0, END_STREAM, 0, 0, 0, 1, 0xaa, 0xbb]);

        let mut out = Vec::new();
        let mut at = 0;
        while at < input.len() {
            match frames.step(&input[at..], &mut out) {
                Step::Consumed(n) => at += n,
                Step::NeedMore | Step::GiveUp => panic!("stuck at {at}"),
            }
        }
        let rewritten = rewrite_block(&mut Table::new(), &block).unwrap().unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&((5 + rewritten.len()) as u32).to_be_bytes()[1..]);
        want.extend_from_slice(&[HEADERS, END_STREAM | PRIORITY | END_HEADERS, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 15]);
        want.extend_from_slice(&rewritten);
        want.extend_from_slice(&[0, 0, 2, 0, END_STREAM, 0, 0, 0, 1, 0xaa, 0xbb]);
        assert_eq!(out, want);
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let block = vec![0x82; MAX_FRAME + 10];
        let mut out = Vec::new();
        write_block(&mut out, 3, END_STREAM, None, &block);
        assert_eq!(&out[..9], &[0, 0x40, 0, HEADERS, END_STREAM, 0, 0, 0, 3]);
        let second = &out[9 + MAX_FRAME..];
        assert_eq!(
            &second[..9],
            &[0, 0, 10, CONTINUATION, END_HEADERS, 0, 0, 0, 3]
        );
        assert_eq!(second.len(), 9 + 10);
    }

    /// An HTTP/2 request with a URL as `:authority`, sent by hand to hyper behind `Lenient`,
    /// gets an answer instead of a reset.
    #[tokio::test]
    async fn hyper_answers_a_url_authority() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/version",
            axum::routing::get(|headers: axum::http::HeaderMap| async move {
                headers
                    .get("x-endpoint")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            }),
        );
        let server = tokio::spawn(async move {
            axum::serve(Lenient(listener), app).await.unwrap();
        });

        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        block.push(0x04); // :path, without indexing
        block.extend(raw_string(b"/version"));
        block.push(0x41);
        block.extend(raw_string(format!("http://{addr}").as_bytes()));
        let mut req = PREFACE.to_vec();
        req.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
        req.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
        req.extend_from_slice(&[HEADERS, END_STREAM | END_HEADERS, 0, 0, 0, 1]);
        req.extend_from_slice(&block);
        conn.write_all(&req).await.unwrap();

        // Read frames until stream 1 ends; fail on RST_STREAM.
        let mut got_status = None;
        let mut body = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut head = [0u8; 9];
            tokio::time::timeout_at(deadline, conn.read_exact(&mut head))
                .await
                .expect("response in time")
                .unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            match head[3] {
                0x3 => panic!("stream reset: {payload:?}"),
                0x7 => panic!("connection closed (GOAWAY): {payload:?}"),
                0x1 if stream == 1 => got_status = Some(payload[0]),
                0x0 if stream == 1 => body.extend_from_slice(&payload),
                _ => {}
            }
            if stream == 1 && head[4] & END_STREAM != 0 {
                break;
            }
        }
        // 0x88: the static table's `:status: 200`, as hyper encodes it.
        assert_eq!(got_status, Some(0x88));
        assert_eq!(body, format!("http://{addr}").as_bytes());
        server.abort();
    }

    #[tokio::test]
    async fn http1_passes_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (client, server) = tokio::io::duplex(64);
        let mut conn = Conn::new(server);
        let mut client = client;
        let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(request).await.unwrap();
        drop(client);
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request);
    }
}
