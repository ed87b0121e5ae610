//! Frames: how messages are cut out of a byte stream.
//!
//! ```text
//! u32 BE  body length N (everything after these 4 bytes), at most the reader's maximum
//! u32 BE  header length H (H <= N - 4)
//! H bytes postcard-encoded RequestHeader or ResponseHeader
//! N-4-H   file data, raw (only Write requests and Read answers carry any)
//! ```
//! The length is checked against the maximum before anything is allocated (tokio-util's
//! `LengthDelimitedCodec` does the cutting). A frame that has not fully arrived is not an error;
//! bytes that can never become a valid frame are, and close that one connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use std::io;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

use crate::{RequestHeader, ResponseHeader};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLong { len: u64, max: u32 },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
}

/// One frame: the encoded header and the data after it, both views of one buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Bytes,
    pub data: Bytes,
}

impl Frame {
    /// Decodes the header as a request.
    ///
    /// # Errors
    /// [`FrameError::Decode`] for bytes that are no request.
    pub fn request(&self) -> Result<RequestHeader, FrameError> {
        decode(&self.header)
    }

    /// Decodes the header as a response.
    ///
    /// # Errors
    /// [`FrameError::Decode`] for bytes that are no response.
    pub fn response(&self) -> Result<ResponseHeader, FrameError> {
        decode(&self.header)
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    // postcard::from_bytes ignores trailing bytes; a header must be exactly its message.
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed("bytes after the header"));
    }
    Ok(value)
}

/// Cuts frames out of a byte stream; use with `tokio_util::codec::FramedRead`.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: u32,
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame_bytes` (body length).
    pub fn new(max_frame_bytes: u32) -> FrameCodec {
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(max_frame_bytes as usize)
            .new_codec();
        FrameCodec { inner, max: max_frame_bytes }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        // Check the announced length ourselves first, for an error that says what it was.
        if src.len() >= 4 {
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
            if len > self.max {
                return Err(FrameError::TooLong { len: len as u64, max: self.max });
            }
        }
        let Some(body) = self.inner.decode(src)? else { return Ok(None) };
        split_body(body.freeze()).map(Some)
    }
}

fn split_body(mut body: Bytes) -> Result<Frame, FrameError> {
    if body.len() < 4 {
        return Err(FrameError::Malformed("frame shorter than its header length"));
    }
    let header_len = body.get_u32() as usize;
    if header_len > body.len() {
        return Err(FrameError::Malformed("header length past the end of the frame"));
    }
    if header_len == 0 {
        return Err(FrameError::Malformed("empty header"));
    }
    let header = body.split_to(header_len);
    Ok(Frame { header, data: body })
}

/// Encodes the part of a frame before its data: the lengths and the header.
///
/// # Errors
/// [`FrameError::TooLong`] when header and data would not fit in `max_frame_bytes`.
pub fn encode_prefix<T: Serialize>(header: &T, data_len: usize, max_frame_bytes: u32) -> Result<BytesMut, FrameError> {
    let encoded = postcard::to_stdvec(header)?;
    let body_len = 4 + encoded.len() as u64 + data_len as u64;
    if body_len > max_frame_bytes as u64 {
        return Err(FrameError::TooLong { len: body_len, max: max_frame_bytes });
    }
    let mut buf = BytesMut::with_capacity(8 + encoded.len());
    buf.put_u32(body_len as u32);
    buf.put_u32(encoded.len() as u32);
    buf.put_slice(&encoded);
    Ok(buf)
}

/// Writes one whole frame. The writer should be buffered (a `BufWriter`): the prefix is small,
/// and large data passes through a `BufWriter` without being copied into its buffer. Does not
/// flush.
///
/// # Errors
/// [`FrameError::TooLong`] before writing anything, or the writer's I/O error.
pub async fn write_frame<W, T>(w: &mut W, header: &T, data: &[u8], max_frame_bytes: u32) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let prefix = encode_prefix(header, data.len(), max_frame_bytes)?;
    w.write_all(&prefix).await?;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, RequestId, WirePath};

    fn encode_frame(h: &RequestHeader, data: &[u8]) -> Vec<u8> {
        let mut v = encode_prefix(h, data.len(), crate::MAX_FRAME_BYTES).unwrap().to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn round_trip_with_data() {
        let h = RequestHeader { id: RequestId(7), request: Request::Write { fh: crate::Fh(3), offset: 9 } };
        let bytes = encode_frame(&h, b"hello");
        let mut codec = FrameCodec::new(crate::MAX_FRAME_BYTES);
        let mut buf = BytesMut::from(&bytes[..]);
        let f = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.request().unwrap(), h);
        assert_eq!(&f.data[..], b"hello");
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let h = RequestHeader { id: RequestId(1), request: Request::Stat { path: WirePath::root() } };
        let bytes = encode_frame(&h, &[]);
        for cut in 0..bytes.len() {
            // The codec keeps what it parsed of a length; a fresh one for each stream.
            let mut codec = FrameCodec::new(crate::MAX_FRAME_BYTES);
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn over_limit_is_refused_before_allocating() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn trailing_header_bytes_are_malformed() {
        let h = RequestHeader { id: RequestId(1), request: Request::Ping };
        let mut enc = postcard::to_stdvec(&h).unwrap();
        enc.push(0);
        assert!(decode::<RequestHeader>(&enc).is_err());
    }
}
