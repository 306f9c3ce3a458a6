"""Pure framing for the flyfs data plane (no sockets, no event loop).

Every message on a data-plane connection is one frame::

    +-------+---------+-------+--------+------------+------------+-------------+
    | magic | version | flags | method | request id | header_len | payload_len |
    |  u32  |   u8    |  u8   |  u16   |    u64     |    u32     |     u64     |
    +-------+---------+-------+--------+------------+------------+-------------+
    then header_len bytes of header (a serialized protobuf message, or the
    error text of an error response), then payload_len bytes of payload.

All integers are little-endian; the fixed part is HEADER_SIZE (28) bytes.
A request has flags 0; its response carries the same request id and method with
FLAG_RESPONSE set, plus FLAG_ERROR when the handler raised. A request with
FLAG_SHM carries a shared-memory reference as its payload (see shm.py); one
with FLAG_SHM_REPLY carries, instead of a payload, a reference to a slice of the
caller's arena the reply payload may be written to: the response then has
FLAG_SHM and an 8-byte payload, the number of bytes written there.

`FrameReader` is the incremental parser behind the asyncio BufferedProtocol of
every transport: it hands out the buffer the next bytes should land in (an
internal buffer while parsing headers, the caller's own buffer while a large
payload streams in) so payload bytes are received in place, never re-joined.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Iterable, NamedTuple, Sequence

__all__ = [
    "MAGIC", "VERSION", "FLAG_RESPONSE", "FLAG_ERROR", "FLAG_SHM", "FLAG_SHM_REPLY", "HEADER", "HEADER_SIZE",
    "MAX_HEADER", "MAX_PAYLOAD", "TransportError", "RequestTimeout", "RequestAborted",
    "ProtocolError", "RemoteError", "FrameHeader", "pack_header",
    "unpack_header", "FrameReader", "Request", "Response", "Reply",
    "writable_views", "payload_views",
]

MAGIC = 0x46594C46          # b"FLYF" read as a little-endian u32
VERSION = 1
FLAG_RESPONSE = 0x01
FLAG_ERROR = 0x02
FLAG_SHM = 0x04             # the payload is a shared-memory reference (flyfs/net/shm.py)
FLAG_SHM_REPLY = 0x08       # request: the payload names a shared-memory slice for the reply
_KNOWN_FLAGS = FLAG_RESPONSE | FLAG_ERROR | FLAG_SHM | FLAG_SHM_REPLY

HEADER = struct.Struct("<IBBHQIQ")
HEADER_SIZE = HEADER.size   # 28

MAX_HEADER = 1 << 20        # default limit on header_len (1 MiB)
MAX_PAYLOAD = 64 << 20      # default limit on payload_len (64 MiB)

# Internal read buffer while parsing frame headers. Large payloads only ever
# have their first READ_BUFFER bytes copied out of it; the rest is received
# straight into the destination.
READ_BUFFER = 64 << 10

_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


class TransportError(Exception):
    """A data-plane call failed in transport: refused, reset, closed, broken."""


class RequestTimeout(TransportError):
    """A request got no reply within its timeout (the request is forgotten)."""


class RequestAborted(TransportError):
    """The caller's `abort` future completed first: the request is forgotten, as a timed-out
    one is (e.g. its target left its chain while it hung: go to the new one)."""


class ProtocolError(TransportError):
    """A peer sent garbage or an oversized frame, or a reply did not fit."""


class RemoteError(TransportError):
    """The remote handler raised; the message is its error text."""


class FrameHeader(NamedTuple):
    flags: int
    method: int
    request_id: int
    header_len: int
    payload_len: int


def pack_header(flags: int, method: int, request_id: int, header_len: int,
                payload_len: int) -> bytes:
    """The fixed HEADER_SIZE-byte frame prefix; ValueError on out-of-range fields."""
    if not 0 <= method <= _U16:
        raise ValueError(f"method {method} out of range 0..{_U16}")
    if flags & ~_KNOWN_FLAGS or flags < 0:
        raise ValueError(f"unknown frame flags {flags:#x}")
    if not 0 <= request_id <= _U64:
        raise ValueError(f"request id {request_id} out of range")
    if not 0 <= header_len <= _U32:
        raise ValueError(f"header length {header_len} out of range")
    if not 0 <= payload_len <= _U64:
        raise ValueError(f"payload length {payload_len} out of range")
    return HEADER.pack(MAGIC, VERSION, flags, method, request_id, header_len, payload_len)


def unpack_header(buf, offset: int = 0, *, max_header: int = MAX_HEADER,
                  max_payload: int = MAX_PAYLOAD) -> FrameHeader:
    """Parse and validate the fixed frame prefix at buf[offset:]; ProtocolError if bad."""
    if len(buf) - offset < HEADER_SIZE:
        raise ProtocolError(f"truncated frame header: {len(buf) - offset} of {HEADER_SIZE} bytes")
    magic, version, flags, method, rid, hlen, plen = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic:#010x} (expected {MAGIC:#010x})")
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version} (expected {VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags {flags:#04x}")
    if hlen > max_header:
        raise ProtocolError(f"frame header of {hlen} bytes exceeds the {max_header}-byte limit")
    if plen > max_payload:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the {max_payload}-byte limit")
    return FrameHeader(flags, method, rid, hlen, plen)


# ---------------------------------------------------------------- messages

_EMPTY = memoryview(b"")


class Request:
    """One request as a server handler sees it."""

    __slots__ = ("method", "header", "payload", "peer", "request_id", "reply_buffer")

    def __init__(self, method: int, header: bytes, payload: memoryview = _EMPTY,
                 peer: str = "", request_id: int = 0, reply_buffer: memoryview | None = None):
        self.method = method
        self.header = header
        self.payload = payload      # writable memoryview over a fresh buffer, or empty
        self.peer = peer
        self.request_id = request_id
        # Where the caller wants the reply payload (shared memory), or None. A handler
        # that builds its reply payload in here (e.g. reads from disk into it) saves a copy.
        self.reply_buffer = reply_buffer

    def __repr__(self):
        return (f"Request(method={self.method}, header={len(self.header)}B, "
                f"payload={len(self.payload)}B, peer={self.peer!r})")


class Response:
    """What a handler returns: header bytes and payload buffers sent without joining.

    The payload buffers must not be modified once returned: they are handed to
    the transport as they are (scatter/gather, no copy).
    """

    __slots__ = ("header", "payload")

    def __init__(self, header: bytes = b"", payload: Sequence[Any] = ()):
        self.header = header
        self.payload = payload

    def __repr__(self):
        return f"Response(header={len(self.header)}B, payload={len(self.payload)} buffers)"


class Reply:
    """A response as the caller of `ConnectionPool.call` sees it.

    payload: a memoryview of the bytes received: the filled part of `into`
    when one buffer was given, a fresh buffer when `into` was None, and for a
    scatter list of buffers a list of memoryviews (the filled part of each, in
    order). payload_len is the total number of payload bytes either way.
    """

    __slots__ = ("header", "payload", "payload_len")

    def __init__(self, header: bytes, payload, payload_len: int):
        self.header = header
        self.payload = payload
        self.payload_len = payload_len

    def __repr__(self):
        return f"Reply(header={len(self.header)}B, payload_len={self.payload_len})"


def _as_byte_view(buf) -> memoryview:
    m = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not m.c_contiguous:
        raise TypeError(f"{type(buf).__name__} buffer is not C-contiguous")
    if m.ndim != 1 or m.format != "B":
        m = m.cast("B")
    return m


def writable_views(into) -> tuple[list[memoryview], int]:
    """Normalise `into` (one writable buffer or a list of them) to non-empty byte views.

    Returns (views, total capacity in bytes); TypeError for a read-only or
    non-contiguous buffer.
    """
    items = into if isinstance(into, (list, tuple)) else (into,)
    views = []
    total = 0
    for item in items:
        m = _as_byte_view(item)
        if m.readonly:
            raise TypeError(f"into buffer {type(item).__name__} is read-only")
        if m.nbytes:
            views.append(m)
            total += m.nbytes
    return views, total


def payload_views(payload) -> tuple[list, int]:
    """Normalise an outgoing payload (one buffer or a sequence) to byte-sized buffers.

    bytes objects are kept as they are (transports write them fastest);
    everything else becomes a byte-format memoryview. Returns (buffers, total).
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = (payload,)
    out = []
    total = 0
    for item in payload:
        if type(item) is bytes:
            n = len(item)
        else:
            item = _as_byte_view(item)
            n = item.nbytes
        if n:
            out.append(item)
            total += n
    return out, total


# ---------------------------------------------------------------- reader

_HEAD, _HBODY, _PAYLOAD = 0, 1, 2


def _trim(views: Iterable[memoryview], n: int) -> list[memoryview]:
    """The prefix of `views` holding exactly n bytes; ProtocolError if they hold fewer."""
    out = []
    need = n
    for v in views:
        lv = len(v)
        if not lv:
            continue
        if lv >= need:
            out.append(v if lv == need else v[:need])
            return out
        out.append(v)
        need -= lv
    raise ProtocolError(f"payload of {n} bytes does not fit the {n - need}-byte destination")


class FrameReader:
    """Incremental frame parser driven by BufferedProtocol get_buffer/buffer_updated.

    on_header(fh, header) is called once a frame's header is complete and
    returns where its payload goes: a list of writable byte memoryviews (filled
    in order; holding fewer than payload_len bytes is a ProtocolError, never an
    overflow) or None to discard the payload. on_frame(fh, header) is called
    when the payload is complete. Both run synchronously inside
    buffer_updated; a ProtocolError raised by validation or by on_header
    propagates out of buffer_updated and leaves the reader unusable (the
    connection must be dropped).
    """

    __slots__ = ("_on_header", "_on_frame", "_max_header", "_max_payload",
                 "_buf", "_mv", "_end", "_mode", "_fh", "_header", "_hbuf", "_hoff",
                 "_views", "_vi", "_voff", "_left")

    def __init__(self, on_header: Callable[[FrameHeader, bytes], list | None],
                 on_frame: Callable[[FrameHeader, bytes], None], *,
                 max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD,
                 bufsize: int = READ_BUFFER):
        if bufsize < 2 * HEADER_SIZE:
            raise ValueError(f"read buffer of {bufsize} bytes is too small")
        self._on_header = on_header
        self._on_frame = on_frame
        self._max_header = max_header
        self._max_payload = max_payload
        self._buf = bytearray(bufsize)
        self._mv = memoryview(self._buf)
        self._end = 0           # bytes held in _buf (only in _HEAD mode)
        self._mode = _HEAD
        self._fh: FrameHeader | None = None
        self._header = b""
        self._hbuf: memoryview | None = None
        self._hoff = 0
        self._views: list[memoryview] | None = None
        self._vi = 0
        self._voff = 0
        self._left = 0

    # -- the two BufferedProtocol entry points

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should be written (never empty)."""
        mode = self._mode
        if mode == _PAYLOAD:
            views = self._views
            if views is None:   # discarding; _buf is empty in this mode, use it as scratch
                left = self._left
                return self._mv if left >= len(self._mv) else self._mv[:left]
            return views[self._vi][self._voff:]
        if mode == _HEAD:
            return self._mv[self._end:]
        return self._hbuf[self._hoff:]

    def buffer_updated(self, nbytes: int) -> None:
        """nbytes were written into the buffer last returned by get_buffer."""
        mode = self._mode
        if mode == _PAYLOAD:
            self._left -= nbytes
            views = self._views
            if views is not None:
                voff = self._voff + nbytes
                if voff == len(views[self._vi]):
                    self._vi += 1
                    voff = 0
                self._voff = voff
            if not self._left:
                self._finish()
            return
        if mode == _HBODY:
            self._hoff += nbytes
            if self._hoff == len(self._hbuf):
                header = self._hbuf.tobytes()
                self._hbuf = None
                self._mode = _HEAD
                self._start_payload(self._fh, header)
                if self._left:
                    self._mode = _PAYLOAD
                else:
                    self._finish()
            return
        self._end += nbytes
        self._parse()

    # -- control

    @property
    def current_request_id(self) -> int | None:
        """Request id of the frame being received, or None between frames."""
        return None if self._mode == _HEAD else self._fh.request_id

    def discard_payload(self, request_id: int) -> bool:
        """Send the rest of this request's in-flight payload to scratch, not its buffer.

        Used when a request times out or is cancelled while its reply payload
        streams in: the caller's buffer must not be written after that.
        Returns True when such a payload was in flight.
        """
        if self._mode == _PAYLOAD and self._fh.request_id == request_id and self._views is not None:
            self._views = None
            return True
        return False

    # -- internals

    def _parse(self) -> None:
        mv = self._mv
        end = self._end
        pos = 0
        while end - pos >= HEADER_SIZE:
            fh = unpack_header(mv, pos, max_header=self._max_header, max_payload=self._max_payload)
            pos += HEADER_SIZE
            hlen = fh.header_len
            if end - pos < hlen:
                # A header longer than what is buffered: receive the rest in place.
                hbuf = memoryview(bytearray(hlen))
                have = end - pos
                hbuf[:have] = mv[pos:end]
                self._fh = fh
                self._hbuf = hbuf
                self._hoff = have
                self._mode = _HBODY
                self._end = 0
                return
            header = mv[pos:pos + hlen].tobytes() if hlen else b""
            pos += hlen
            self._start_payload(fh, header)
            left = self._left
            if left:
                take = end - pos if end - pos < left else left
                if take:
                    self._fill(mv[pos:pos + take])
                    pos += take
                if self._left:
                    self._mode = _PAYLOAD
                    self._end = 0
                    return
            self._finish()
        rest = end - pos
        if rest and pos:
            self._buf[:rest] = mv[pos:end].tobytes()
        self._end = rest

    def _start_payload(self, fh: FrameHeader, header: bytes) -> None:
        self._fh = fh
        self._header = header
        n = fh.payload_len
        views = self._on_header(fh, header)
        self._left = n
        self._vi = 0
        self._voff = 0
        self._views = _trim(views, n) if (views is not None and n) else None

    def _fill(self, src: memoryview) -> None:
        k = len(src)
        self._left -= k
        views = self._views
        if views is None:
            return
        off = 0
        vi = self._vi
        voff = self._voff
        while off < k:
            v = views[vi]
            c = len(v) - voff
            if c > k - off:
                c = k - off
            v[voff:voff + c] = src[off:off + c]
            off += c
            voff += c
            if voff == len(v):
                vi += 1
                voff = 0
        self._vi = vi
        self._voff = voff

    def _finish(self) -> None:
        fh = self._fh
        header = self._header
        self._mode = _HEAD
        self._fh = None
        self._header = b""
        self._views = None
        self._on_frame(fh, header)
