//! Property tests of the wire codec: every message round-trips, a stream cut anywhere decodes the
//! same, and no input makes the decoder panic or allocate past the frame limit.
//!
//! A failing case is saved to `shared/proptest-regressions/codec.txt` (and replayed first on every
//! later run): commit that file with the fix. That is proptest's default place for a crate's
//! regressions; it is named explicitly because the default lookup (a `lib.rs` beside the test file
//! or above it) does not find `src/lib.rs` from `tests/`, and would fall back to a file inside
//! `tests/` with a warning on every run.

use bytes::{BufMut, BytesMut};
use homefs_shared::frame::{encode_prefix, FrameCodec};
use homefs_shared::{
    Attr, DirEntry, ErrorCode, Fh, FileItem, FileKind, Frame, FrameError, LockKind, LockSpec, OpenFlags, PutItem,
    RenameFlags, Request, RequestHeader, RequestId, Response, ResponseHeader, SetAttr, SetTime, StatFs, StoredItem,
    Timestamp, Token, WireError, WirePath, MAX_DATA_BYTES, MAX_FRAME_BYTES, NOTICE_ID,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tokio_util::codec::Decoder;

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

/// Any wire path, also ones a server must refuse (NUL, empty, `..`): the codec carries what a
/// peer sends unchecked, so it has to round-trip those too. Built through serde because the wire
/// form is the only unchecked way to make one.
fn wire_path() -> impl Strategy<Value = WirePath> {
    let checked = "[a-z0-9._/ -]{1,40}".prop_filter_map("not a valid path", |s| WirePath::new(s).ok());
    let raw = bytes(64).prop_map(|b| {
        let encoded = postcard::to_stdvec(&b).expect("a Vec<u8> always encodes");
        postcard::from_bytes::<WirePath>(&encoded).expect("WirePath is transparent over Vec<u8>")
    });
    prop_oneof![3 => checked, 1 => raw]
}

fn request_id() -> impl Strategy<Value = RequestId> {
    any::<u64>().prop_map(RequestId)
}

fn fh() -> impl Strategy<Value = Fh> {
    any::<u64>().prop_map(Fh)
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(secs, nanos)| Timestamp { secs, nanos })
}

fn file_kind() -> impl Strategy<Value = FileKind> {
    prop_oneof![
        Just(FileKind::File),
        Just(FileKind::Dir),
        Just(FileKind::Symlink),
        Just(FileKind::Fifo),
        Just(FileKind::Socket),
        Just(FileKind::CharDevice),
        Just(FileKind::BlockDevice),
    ]
}

fn attr() -> impl Strategy<Value = Attr> {
    (
        any::<u64>(),
        file_kind(),
        0u32..0o10000,
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        timestamp(),
        timestamp(),
        timestamp(),
    )
        .prop_map(|(ino, kind, perm, nlink, size, blocks, atime, mtime, ctime)| Attr {
            ino,
            kind,
            perm,
            nlink,
            size,
            blocks,
            atime,
            mtime,
            ctime,
        })
}

fn open_flags() -> impl Strategy<Value = OpenFlags> {
    any::<[bool; 6]>().prop_map(|[read, write, append, create, exclusive, truncate]| OpenFlags {
        read,
        write,
        append,
        create,
        exclusive,
        truncate,
    })
}

fn set_time() -> impl Strategy<Value = SetTime> {
    prop_oneof![Just(SetTime::Now), timestamp().prop_map(SetTime::At)]
}

fn set_attr() -> impl Strategy<Value = SetAttr> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(set_time()),
        proptest::option::of(set_time()),
    )
        .prop_map(|(mode, size, atime, mtime)| SetAttr { mode, size, atime, mtime })
}

fn lock_spec() -> impl Strategy<Value = LockSpec> {
    let kind = prop_oneof![Just(LockKind::Read), Just(LockKind::Write), Just(LockKind::Unlock)];
    (kind, any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>())
        .prop_map(|(kind, start, end, owner, pid, flock)| LockSpec { kind, start, end, owner, pid, flock })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u32>(), ".{0,20}").prop_map(|(version, client)| Request::Hello { version, client }),
        (".{0,20}", ".{0,40}").prop_map(|(user, password)| Request::Login { user, password }),
        ".{0,60}".prop_map(|t| Request::Resume { token: Token(t) }),
        wire_path().prop_map(|path| Request::Stat { path }),
        (wire_path(), proptest::option::of(bytes(40)), any::<u32>())
            .prop_map(|(path, after, max_entries)| Request::ReadDir { path, after, max_entries }),
        (wire_path(), any::<u32>()).prop_map(|(path, mode)| Request::Mkdir { path, mode }),
        wire_path().prop_map(|path| Request::Rmdir { path }),
        wire_path().prop_map(|path| Request::Unlink { path }),
        (wire_path(), wire_path(), any::<(bool, bool)>()).prop_map(|(from, to, (noreplace, exchange))| {
            Request::Rename { from, to, flags: RenameFlags { noreplace, exchange } }
        }),
        (wire_path(), open_flags(), any::<u32>()).prop_map(|(path, flags, mode)| Request::Open { path, flags, mode }),
        (fh(), any::<u64>(), any::<u32>()).prop_map(|(fh, offset, len)| Request::Read { fh, offset, len }),
        (fh(), any::<u64>()).prop_map(|(fh, offset)| Request::Write { fh, offset }),
        fh().prop_map(|fh| Request::Close { fh }),
        (wire_path(), proptest::option::of(fh()), set_attr()).prop_map(|(path, fh, set)| Request::SetAttr {
            path,
            fh,
            set
        }),
        (bytes(80), wire_path()).prop_map(|(target, path)| Request::Symlink { target, path }),
        wire_path().prop_map(|path| Request::ReadLink { path }),
        (wire_path(), wire_path()).prop_map(|(from, to)| Request::Link { from, to }),
        (fh(), any::<bool>()).prop_map(|(fh, datasync)| Request::Fsync { fh, datasync }),
        Just(Request::StatFs),
        (fh(), any::<u64>(), fh(), any::<u64>(), any::<u64>()).prop_map(|(src, src_offset, dst, dst_offset, len)| {
            Request::CopyRange { src, src_offset, dst, dst_offset, len }
        }),
        (wire_path(), any::<u64>(), any::<u64>()).prop_map(|(path, start, end)| Request::Checksum { path, start, end }),
        (fh(), lock_spec(), any::<bool>()).prop_map(|(fh, lock, wait)| Request::Lock { fh, lock, wait }),
        (fh(), lock_spec()).prop_map(|(fh, lock)| Request::TestLock { fh, lock }),
        Just(Request::Ping),
        (fh(), any::<u64>()).prop_map(|(fh, offset)| Request::WriteAttr { fh, offset }),
        Just(Request::Subscribe),
        (wire_path(), any::<u32>(), proptest::option::of(timestamp()), any::<bool>())
            .prop_map(|(path, mode, mtime, exclusive)| Request::PutFile { path, mode, mtime, exclusive }),
        (wire_path(), any::<u32>()).prop_map(|(path, max_len)| Request::GetFile { path, max_len }),
        Just(Request::SyncFs),
        vec(put_item(), 0..6).prop_map(|files| Request::PutFiles { files }),
        (vec(wire_path(), 0..6), any::<u32>()).prop_map(|(paths, max_bytes)| Request::GetFiles { paths, max_bytes }),
        vec(wire_path(), 0..6).prop_map(|paths| Request::Sync { paths }),
    ]
}

fn put_item() -> impl Strategy<Value = PutItem> {
    (wire_path(), any::<u32>(), proptest::option::of(timestamp()), any::<u32>())
        .prop_map(|(path, mode, mtime, len)| PutItem { path, mode, mtime, len })
}

fn wire_error() -> impl Strategy<Value = WireError> {
    (error_code(), ".{0,30}").prop_map(|(code, message)| WireError::new(code, message))
}

fn response() -> impl Strategy<Value = Response> {
    let stat_fs = (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
        |(total_bytes, used_bytes, free_bytes, block_size, max_name)| StatFs {
            total_bytes,
            used_bytes,
            free_bytes,
            block_size,
            max_name,
        },
    );
    prop_oneof![
        (any::<u32>(), ".{0,20}").prop_map(|(version, server)| Response::Hello { version, server }),
        (any::<u16>(), proptest::option::of(".{0,60}"), ".{0,30}")
            .prop_map(|(code, token, message)| { Response::Login { code, token: token.map(Token), message } }),
        attr().prop_map(Response::Attr),
        (vec((bytes(40), attr()).prop_map(|(name, attr)| DirEntry { name, attr }), 0..8), any::<bool>())
            .prop_map(|(entries, more)| Response::Entries { entries, more }),
        (fh(), attr()).prop_map(|(fh, attr)| Response::Opened { fh, attr }),
        any::<u64>().prop_map(|size| Response::Data { size }),
        (any::<u32>(), any::<u64>()).prop_map(|(len, size)| Response::Written { len, size }),
        Just(Response::Done),
        bytes(80).prop_map(Response::Target),
        stat_fs.prop_map(Response::StatFs),
        any::<u64>().prop_map(|len| Response::Copied { len }),
        (any::<[u8; 32]>(), any::<u64>(), any::<u64>(), timestamp())
            .prop_map(|(hash, len, size, mtime)| Response::Checksum { hash, len, size, mtime }),
        proptest::option::of(lock_spec()).prop_map(Response::LockTest),
        (any::<u32>(), attr()).prop_map(|(len, attr)| Response::WrittenAttr { len, attr }),
        (vec(wire_path(), 0..8), any::<bool>()).prop_map(|(paths, all)| Response::Changed { paths, all }),
        (any::<[u8; 32]>(), attr()).prop_map(|(hash, attr)| Response::Stored { hash, attr }),
        (attr(), any::<[u8; 32]>()).prop_map(|(attr, hash)| Response::FileData { attr, hash }),
        vec(
            prop_oneof![
                (any::<[u8; 32]>(), attr()).prop_map(|(hash, attr)| Ok(StoredItem { hash, attr })),
                wire_error().prop_map(Err)
            ],
            0..6
        )
        .prop_map(|results| Response::StoredFiles { results }),
        vec(
            prop_oneof![
                (attr(), any::<[u8; 32]>(), any::<u32>()).prop_map(|(attr, hash, len)| Ok(FileItem {
                    attr,
                    hash,
                    len
                })),
                wire_error().prop_map(Err)
            ],
            0..6
        )
        .prop_map(|results| Response::FilesData { results }),
    ]
}

fn request_header() -> impl Strategy<Value = RequestHeader> {
    (request_id(), request()).prop_map(|(id, request)| RequestHeader { id, request })
}

fn response_header() -> impl Strategy<Value = ResponseHeader> {
    let error = (error_code(), ".{0,30}").prop_map(|(code, message)| WireError { code, message });
    let result = prop_oneof![3 => response().prop_map(Ok), 1 => error.prop_map(Err)];
    (request_id(), result).prop_map(|(id, result)| ResponseHeader { id, result })
}

/// Data as it travels after a header: mostly small, sometimes empty, now and then a large block.
fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => bytes(64),
        1 => Just(Vec::new()),
        1 => (1usize..=256 << 10).prop_map(|n| (0..n).map(|i| (i % 251) as u8).collect()),
    ]
}

/// One message of either direction, with its data.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    Request(RequestHeader, Vec<u8>),
    Response(ResponseHeader, Vec<u8>),
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (request_header(), data()).prop_map(|(h, d)| Message::Request(h, d)),
        (response_header(), data()).prop_map(|(h, d)| Message::Response(h, d)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The bytes `write_frame` puts on the wire for a message.
fn encode(m: &Message) -> Vec<u8> {
    let (mut out, data) = match m {
        Message::Request(h, d) => (encode_prefix(h, d.len(), MAX_FRAME_BYTES), d),
        Message::Response(h, d) => (encode_prefix(h, d.len(), MAX_FRAME_BYTES), d),
    };
    let out = out.as_mut().expect("generated messages fit in a frame");
    out.put_slice(data);
    out.to_vec()
}

/// Decodes a frame back into the kind of message it was made from.
fn decode_as(like: &Message, frame: &Frame) -> Message {
    match like {
        Message::Request(..) => Message::Request(frame.request().expect("a request decodes"), frame.data.to_vec()),
        Message::Response(..) => Message::Response(frame.response().expect("a response decodes"), frame.data.to_vec()),
    }
}

/// Feeds `stream` to one codec in pieces cut at `cuts` (sorted, deduplicated positions), as a
/// socket would deliver it, and collects every frame, or the first error.
fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, FrameError> {
    let mut codec = FrameCodec::new(MAX_FRAME_BYTES);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        while let Some(frame) = codec.decode(&mut buf)? {
            frames.push(frame);
        }
    }
    // What is left is an incomplete frame: `decode_eof` says so, as a closed socket would.
    if let Some(frame) = codec.decode_eof(&mut buf)? {
        frames.push(frame);
    }
    Ok(frames)
}

/// Runs the decoder over arbitrary bytes until it wants more or refuses; every frame it cuts out
/// is also decoded as a request and as a response. Only the absence of panics is checked here.
fn chew(input: &[u8], max: u32) {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::from(input);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        assert!(frame.header.len() + frame.data.len() + 4 <= max as usize, "frame past the limit");
        let _ = frame.request();
        let _ = frame.response();
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// The default configuration, with the regressions file named as the module doc says.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/codec.txt"
        )))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// (1) decode(encode(m)) == m, for headers alone and for whole frames with their data.
    #[test]
    fn every_message_round_trips(m in message()) {
        match &m {
            Message::Request(h, _) => {
                let enc = postcard::to_stdvec(h).expect("encodes");
                prop_assert_eq!(&postcard::from_bytes::<RequestHeader>(&enc).expect("decodes"), h);
            }
            Message::Response(h, _) => {
                let enc = postcard::to_stdvec(h).expect("encodes");
                prop_assert_eq!(&postcard::from_bytes::<ResponseHeader>(&enc).expect("decodes"), h);
            }
        }
        let wire = encode(&m);
        let frames = decode_in_pieces(&wire, &[]).expect("a whole frame decodes");
        prop_assert_eq!(frames.len(), 1);
        prop_assert_eq!(decode_as(&m, &frames[0]), m);
    }

    /// (2) Several frames in one stream, cut into random pieces, decode to the same messages as
    /// the stream delivered at once, in order, with nothing left over.
    #[test]
    fn any_split_decodes_the_same(
        messages in vec(message(), 1..6),
        cut_fractions in vec(0.0f64..1.0, 0..24),
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(encode).collect();
        let mut cuts: Vec<usize> = cut_fractions.iter().map(|f| (f * stream.len() as f64) as usize).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let whole = decode_in_pieces(&stream, &[]).expect("the stream decodes");
        let pieces = decode_in_pieces(&stream, &cuts).expect("the stream decodes in pieces");
        prop_assert_eq!(&pieces, &whole);
        prop_assert_eq!(pieces.len(), messages.len());
        for (m, f) in messages.iter().zip(&pieces) {
            prop_assert_eq!(&decode_as(m, f), m);
        }
    }

    /// (2b) One byte at a time is the harshest split: still the same frame.
    #[test]
    fn byte_by_byte_decodes_the_same(m in message()) {
        let wire = encode(&m);
        if wire.len() <= 4096 {
            let cuts: Vec<usize> = (1..wire.len()).collect();
            let frames = decode_in_pieces(&wire, &cuts).expect("decodes byte by byte");
            prop_assert_eq!(frames.len(), 1);
            prop_assert_eq!(decode_as(&m, &frames[0]), m);
        }
    }

    /// (2c) Incomplete is not malformed: any strict prefix of a valid frame decodes to "need more
    /// bytes", never to an error.
    #[test]
    fn a_prefix_is_incomplete_not_malformed(m in message(), at in any::<prop::sample::Index>()) {
        let wire = encode(&m);
        let cut = at.index(wire.len());
        let mut codec = FrameCodec::new(MAX_FRAME_BYTES);
        let mut buf = BytesMut::from(&wire[..cut]);
        let got = codec.decode(&mut buf);
        prop_assert!(matches!(got, Ok(None)), "a prefix of {} bytes gave {:?}", cut, got);
    }

    /// (3) Random bytes never panic the frame decoder or the header decoders.
    #[test]
    fn random_bytes_never_panic(input in bytes(512), max in prop_oneof![Just(MAX_FRAME_BYTES), 0u32..600]) {
        chew(&input, max);
    }

    /// (3) Random bytes behind a plausible frame prefix reach the header decoders (a random
    /// prefix would almost always announce a length over the limit).
    #[test]
    fn random_headers_never_panic(header in bytes(300), data in bytes(32)) {
        let mut wire = BytesMut::new();
        wire.put_u32((4 + header.len() + data.len()) as u32);
        wire.put_u32(header.len() as u32);
        wire.put_slice(&header);
        wire.put_slice(&data);
        chew(&wire, MAX_FRAME_BYTES);
        let frame = Frame { header: header.into(), data: data.into() };
        let _ = frame.request();
        let _ = frame.response();
    }

    /// (3) A valid frame with bytes flipped or cut off never panics either.
    #[test]
    fn damaged_frames_never_panic(m in message(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut wire = encode(&m);
        for (at, byte) in flips {
            let i = at.index(wire.len());
            wire[i] ^= byte;
        }
        chew(&wire, MAX_FRAME_BYTES);
    }

    /// (3) A length over the limit is refused as soon as its 4 bytes are in, before the decoder
    /// reserves room for it, whatever follows.
    #[test]
    fn over_limit_is_refused_before_allocating(
        max in prop_oneof![Just(MAX_FRAME_BYTES), 0u32..(1 << 20)],
        excess in 1u64..=u32::MAX as u64,
        rest in bytes(16),
    ) {
        let len = (max as u64 + excess).min(u32::MAX as u64) as u32;
        prop_assume!(len > max);
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u32(len);
        buf.put_slice(&rest);
        let mut codec = FrameCodec::new(max);
        match codec.decode(&mut buf) {
            Err(FrameError::TooLong { len: got, max: limit }) => {
                prop_assert_eq!(got, len as u64);
                prop_assert_eq!(limit, max);
            }
            other => prop_assert!(false, "expected TooLong, got {:?}", other),
        }
        prop_assert!(buf.capacity() < 4096, "the decoder reserved {} bytes for a refused frame", buf.capacity());
    }

    /// The sender refuses too: a header plus data past the limit is never put on the wire.
    #[test]
    fn encoder_refuses_over_limit(h in request_header(), extra in 0usize..1024) {
        let header_len = postcard::to_stdvec(&h).expect("encodes").len();
        let data_len = MAX_FRAME_BYTES as usize - 4 - header_len + 1 + extra;
        let refused = matches!(encode_prefix(&h, data_len, MAX_FRAME_BYTES), Err(FrameError::TooLong { .. }));
        prop_assert!(refused);
        let fits = encode_prefix(&h, data_len - 1 - extra, MAX_FRAME_BYTES).is_ok();
        prop_assert!(fits);
    }
}

/// Malformed is not incomplete: a complete frame whose lengths cannot be right is an error.
#[test]
fn impossible_lengths_are_malformed() {
    let cases: [(&str, Vec<u8>); 3] = [
        ("body shorter than the header length field", vec![0, 0, 0, 2, 0, 0]),
        ("empty header", vec![0, 0, 0, 4, 0, 0, 0, 0]),
        ("header length past the end of the frame", vec![0, 0, 0, 5, 0, 0, 0, 2, 0x17]),
    ];
    for (what, wire) in cases {
        let mut codec = FrameCodec::new(MAX_FRAME_BYTES);
        let got = codec.decode(&mut BytesMut::from(&wire[..]));
        assert!(matches!(got, Err(FrameError::Malformed(_))), "{what}: {got:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed examples: the bytes PROTOCOL.md shows, so the document cannot drift from the code.
// ---------------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn request_frame(h: &RequestHeader, data: &[u8]) -> Vec<u8> {
    encode(&Message::Request(h.clone(), data.to_vec()))
}

fn response_frame(h: &ResponseHeader, data: &[u8]) -> Vec<u8> {
    encode(&Message::Response(h.clone(), data.to_vec()))
}

#[test]
fn protocol_md_hello_example() {
    let h = RequestHeader { id: RequestId(1), request: Request::Hello { version: 1, client: "rs".into() } };
    assert_eq!(hex(&request_frame(&h, &[])), "00 00 00 0a 00 00 00 06 01 00 01 02 72 73");
}

#[test]
fn protocol_md_write_example() {
    let h = RequestHeader { id: RequestId(300), request: Request::Write { fh: Fh(7), offset: 1_000_000 } };
    assert_eq!(hex(&request_frame(&h, b"hi\n")), "00 00 00 0e 00 00 00 07 ac 02 0b 07 c0 84 3d 68 69 0a");
}

#[test]
fn protocol_md_response_examples() {
    let ok = ResponseHeader { id: RequestId(300), result: Ok(Response::Written { len: 3, size: 1_000_003 }) };
    assert_eq!(hex(&response_frame(&ok, &[])), "00 00 00 0c 00 00 00 08 ac 02 00 06 03 c3 84 3d");
    let err = ResponseHeader { id: RequestId(2), result: Err(WireError::new(ErrorCode::QuotaExceeded, "needs 2 B")) };
    assert_eq!(hex(&response_frame(&err, &[])), "00 00 00 11 00 00 00 0d 02 01 07 09 6e 65 65 64 73 20 32 20 42");
}

/// A change notice travels with the reserved id 0, which no request uses (clients count from 1).
#[test]
fn a_notice_has_the_reserved_id_and_round_trips() {
    assert_eq!(NOTICE_ID, RequestId(0));
    let notice = ResponseHeader {
        id: NOTICE_ID,
        result: Ok(Response::Changed { paths: vec![WirePath::new("a/b").expect("valid")], all: false }),
    };
    let frame = response_frame(&notice, &[]);
    let mut codec = FrameCodec::new(MAX_FRAME_BYTES);
    let mut buf = BytesMut::from(&frame[..]);
    let decoded = codec.decode(&mut buf).expect("valid").expect("whole");
    assert_eq!(decoded.response().expect("a response"), notice);
}

#[test]
fn protocol_md_stat_example() {
    let h = RequestHeader { id: RequestId(2), request: Request::Stat { path: WirePath::new("a/b").expect("valid") } };
    assert_eq!(hex(&request_frame(&h, &[])), "00 00 00 0a 00 00 00 06 02 03 03 61 2f 62");
}

/// The largest data a Read or Write may carry fits in a frame with any header a peer sends.
#[test]
fn largest_data_fits_a_frame() {
    let h = RequestHeader { id: RequestId(u64::MAX), request: Request::Write { fh: Fh(u64::MAX), offset: u64::MAX } };
    assert!(encode_prefix(&h, MAX_DATA_BYTES as usize, MAX_FRAME_BYTES).is_ok());
}

/// PROTOCOL.md's error table lists every code with its wire number and errno name.
#[test]
fn protocol_md_lists_every_error_code() {
    let doc = include_str!("../PROTOCOL.md");
    for &code in ErrorCode::ALL {
        let row = format!("| {} | `{:?}` |", code.wire(), code);
        assert!(doc.contains(&row), "PROTOCOL.md has no error table row starting {row:?}");
    }
}

/// PROTOCOL.md's tables give each request and response its variant index: check a sample of
/// each against what postcard really writes (the byte after a one-byte id).
#[test]
fn protocol_md_variant_indices() {
    let doc = include_str!("../PROTOCOL.md");
    let p = || WirePath::new("x").expect("valid");
    let t = Timestamp::default();
    let some_attr =
        || Attr { ino: 1, kind: FileKind::File, perm: 0, nlink: 1, size: 0, blocks: 0, atime: t, mtime: t, ctime: t };
    let requests = [
        (0, "Hello", Request::Hello { version: 1, client: String::new() }),
        (3, "Stat", Request::Stat { path: p() }),
        (4, "ReadDir", Request::ReadDir { path: p(), after: None, max_entries: 1 }),
        (9, "Open", Request::Open { path: p(), flags: OpenFlags::default(), mode: 0 }),
        (11, "Write", Request::Write { fh: Fh(0), offset: 0 }),
        (18, "StatFs", Request::StatFs),
        (20, "Checksum", Request::Checksum { path: p(), start: 0, end: 0 }),
        (23, "Ping", Request::Ping),
        (24, "WriteAttr", Request::WriteAttr { fh: Fh(0), offset: 0 }),
        (25, "Subscribe", Request::Subscribe),
        (26, "PutFile", Request::PutFile { path: p(), mode: 0, mtime: None, exclusive: false }),
        (27, "GetFile", Request::GetFile { path: p(), max_len: 0 }),
        (28, "SyncFs", Request::SyncFs),
        (29, "PutFiles", Request::PutFiles { files: vec![] }),
        (30, "GetFiles", Request::GetFiles { paths: vec![p()], max_bytes: 0 }),
        (31, "Sync", Request::Sync { paths: vec![p()] }),
    ];
    for (index, name, request) in requests {
        let enc = postcard::to_stdvec(&RequestHeader { id: RequestId(0), request }).expect("encodes");
        assert_eq!(enc[1], index, "{name}");
        let row = format!("| {index} | `{name}` |");
        assert!(doc.contains(&row), "PROTOCOL.md has no request row {row:?}");
    }
    let responses = [
        (0, "Hello", Response::Hello { version: 1, server: String::new() }),
        (5, "Data", Response::Data { size: 0 }),
        (7, "Done", Response::Done),
        (12, "LockTest", Response::LockTest(None)),
        (13, "WrittenAttr", Response::WrittenAttr { len: 0, attr: some_attr() }),
        (14, "Changed", Response::Changed { paths: vec![p()], all: false }),
        (15, "Stored", Response::Stored { hash: [0; 32], attr: some_attr() }),
        (16, "FileData", Response::FileData { attr: some_attr(), hash: [0; 32] }),
        (17, "StoredFiles", Response::StoredFiles { results: vec![] }),
        (18, "FilesData", Response::FilesData { results: vec![] }),
    ];
    for (index, name, response) in responses {
        let enc = postcard::to_stdvec(&ResponseHeader { id: RequestId(0), result: Ok(response) }).expect("encodes");
        assert_eq!(enc[2], index, "{name}");
        let row = format!("| {index} | `{name}` |");
        assert!(doc.contains(&row), "PROTOCOL.md has no response row {row:?}");
    }
}
