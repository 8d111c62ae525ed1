//! Request-body framing: Content-Length counting and an incremental chunked decoder.

use std::ops::Range;

use super::error::HttpError;

/// Longest chunk-size line we skip through (size, extensions); extensions are ignored, so
/// anything longer only costs time.
const MAX_CHUNK_LINE: usize = 4096;

/// The outcome of one [`BodyDecoder::decode`] call on the unconsumed input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// Input bytes used up (framing and data alike); the caller drops them from its buffer.
    pub consumed: usize,
    pub progress: Progress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Body bytes at this range of the input given to `decode`.
    Data(Range<usize>),
    /// All input was consumed without reaching data or the end.
    NeedData,
    /// The body (and trailer section, if chunked) is over.
    End,
}

/// Turns wire bytes of one request body into body bytes, from any split of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodyDecoder {
    Length { remaining: u64 },
    Chunked(ChunkedDecoder),
}

impl BodyDecoder {
    pub(crate) fn length(n: u64) -> Self {
        BodyDecoder::Length { remaining: n }
    }

    pub(crate) fn chunked(max_body: u64, max_trailer: usize) -> Self {
        BodyDecoder::Chunked(ChunkedDecoder {
            state: Chunk::Size {
                value: 0,
                digits: 0,
            },
            line: 0,
            announced: 0,
            trailer: 0,
            max_body,
            max_trailer,
        })
    }

    /// True once nothing more is expected from the wire.
    pub(crate) fn is_finished(&self) -> bool {
        match self {
            BodyDecoder::Length { remaining } => *remaining == 0,
            BodyDecoder::Chunked(c) => c.state == Chunk::Done,
        }
    }

    /// Body bytes still owed, when the framing says so upfront.
    pub(crate) fn known_remaining(&self) -> Option<u64> {
        match self {
            BodyDecoder::Length { remaining } => Some(*remaining),
            BodyDecoder::Chunked(_) => None,
        }
    }

    /// Advances over `input`, stopping at the first body bytes so they can be handed out
    /// without copying.
    pub(crate) fn decode(&mut self, input: &[u8]) -> Result<Step, HttpError> {
        match self {
            BodyDecoder::Length { remaining } => Ok(if *remaining == 0 {
                Step {
                    consumed: 0,
                    progress: Progress::End,
                }
            } else if input.is_empty() {
                Step {
                    consumed: 0,
                    progress: Progress::NeedData,
                }
            } else {
                let n = clamp(*remaining, input.len());
                *remaining -= n as u64;
                Step {
                    consumed: n,
                    progress: Progress::Data(0..n),
                }
            }),
            BodyDecoder::Chunked(c) => c.decode(input),
        }
    }
}

fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a chunk size.
    Size {
        value: u64,
        digits: usize,
    },
    /// After the size, in whitespace before `;` or CR.
    SizeSpace {
        value: u64,
    },
    /// Inside chunk extensions, which carry nothing we use.
    Extension {
        value: u64,
    },
    /// Saw the CR ending a size line.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line or of the blank line that ends the message.
    TrailerStart,
    TrailerLine,
    TrailerLf {
        last: bool,
    },
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkedDecoder {
    state: Chunk,
    /// Bytes of the current size line, bounded by `MAX_CHUNK_LINE`.
    line: usize,
    /// Body bytes announced by chunk sizes so far: checked against `max_body` before they
    /// arrive, so an oversized chunk is refused without reading it.
    announced: u64,
    trailer: usize,
    max_body: u64,
    max_trailer: usize,
}

impl ChunkedDecoder {
    /// Framing is consumed a byte at a time (it is tiny), so every split point of the input
    /// is just another place to stop and resume.
    fn decode(&mut self, input: &[u8]) -> Result<Step, HttpError> {
        let mut i = 0;
        loop {
            if let Chunk::Data { remaining } = &mut self.state {
                if i == input.len() {
                    return Ok(Step {
                        consumed: i,
                        progress: Progress::NeedData,
                    });
                }
                let n = clamp(*remaining, input.len() - i);
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.state = Chunk::DataCr;
                }
                return Ok(Step {
                    consumed: i + n,
                    progress: Progress::Data(i..i + n),
                });
            }
            if self.state == Chunk::Done {
                return Ok(Step {
                    consumed: i,
                    progress: Progress::End,
                });
            }
            let Some(&b) = input.get(i) else {
                return Ok(Step {
                    consumed: i,
                    progress: Progress::NeedData,
                });
            };
            i += 1;
            self.count()?;
            self.state = self.next_state(b)?;
        }
    }

    fn count(&mut self) -> Result<(), HttpError> {
        match self.state {
            Chunk::Size { .. } | Chunk::SizeSpace { .. } | Chunk::Extension { .. } => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(HttpError::bad_request("chunk size line too long"));
                }
            }
            Chunk::TrailerStart | Chunk::TrailerLine | Chunk::TrailerLf { .. } => {
                self.trailer += 1;
                if self.trailer > self.max_trailer {
                    return Err(HttpError::header_too_large(
                        "chunked trailer section too large",
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn next_state(&mut self, b: u8) -> Result<Chunk, HttpError> {
        let bad = |reason| Err(HttpError::bad_request(reason));
        Ok(match (self.state, b) {
            (Chunk::Size { value, digits }, _) if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                match value.checked_mul(16).and_then(|v| v.checked_add(digit)) {
                    Some(value) => Chunk::Size {
                        value,
                        digits: digits + 1,
                    },
                    None => return bad("chunk size overflows"),
                }
            }
            (Chunk::Size { digits: 0, .. }, _) => return bad("invalid chunk size"),
            (Chunk::Size { value, .. } | Chunk::SizeSpace { value }, b' ' | b'\t') => {
                Chunk::SizeSpace { value }
            }
            (
                Chunk::Size { value, .. } | Chunk::SizeSpace { value } | Chunk::Extension { value },
                b';',
            ) => Chunk::Extension { value },
            (
                Chunk::Size { value, .. } | Chunk::SizeSpace { value } | Chunk::Extension { value },
                b'\r',
            ) => Chunk::SizeLf { value },
            (Chunk::Size { .. } | Chunk::SizeSpace { .. }, _) => return bad("invalid chunk size"),
            (Chunk::Extension { value }, _) if b == b'\t' || (b >= 0x20 && b != 0x7f) => {
                Chunk::Extension { value }
            }
            (Chunk::Extension { .. }, _) => return bad("invalid byte in chunk extension"),
            (Chunk::SizeLf { value: 0 }, b'\n') => Chunk::TrailerStart,
            (Chunk::SizeLf { value }, b'\n') => {
                self.line = 0;
                self.announced = self.announced.saturating_add(value);
                if self.announced > self.max_body {
                    return Err(HttpError::too_large("chunked body exceeds the body limit"));
                }
                Chunk::Data { remaining: value }
            }
            (Chunk::SizeLf { .. }, _) => return bad("chunk size line not ended by CRLF"),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size {
                value: 0,
                digits: 0,
            },
            (Chunk::DataCr | Chunk::DataLf, _) => return bad("chunk data not followed by CRLF"),
            (Chunk::TrailerStart, b'\r') => Chunk::TrailerLf { last: true },
            (Chunk::TrailerStart, b' ' | b'\t') => return bad("obsolete line folding in trailer"),
            (Chunk::TrailerLine, b'\r') => Chunk::TrailerLf { last: false },
            (Chunk::TrailerStart | Chunk::TrailerLine, b'\n') => return bad("bare LF in trailer"),
            (Chunk::TrailerStart | Chunk::TrailerLine, _) => Chunk::TrailerLine,
            (Chunk::TrailerLf { last: true }, b'\n') => Chunk::Done,
            (Chunk::TrailerLf { last: false }, b'\n') => Chunk::TrailerStart,
            (Chunk::TrailerLf { .. }, _) => return bad("trailer line not ended by CRLF"),
            // `decode` hands out data and stops at Done before reading another byte.
            (Chunk::Data { .. } | Chunk::Done, _) => return bad("chunked decoder misuse"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(consumed: usize, progress: Progress) -> Result<Step, HttpError> {
        Ok(Step { consumed, progress })
    }

    #[test]
    fn steps_stop_at_data_and_at_the_end() {
        let mut d = BodyDecoder::chunked(u64::MAX, 1024);
        let input = b"3;x\r\nabc\r\n2\r\nde\r\n0\r\n\r\nNEXT";
        assert_eq!(d.decode(input), step(8, Progress::Data(5..8)));
        assert_eq!(d.decode(&input[8..]), step(7, Progress::Data(5..7)));
        assert!(!d.is_finished());
        assert_eq!(d.decode(&input[15..]), step(7, Progress::End));
        assert!(d.is_finished());
        assert_eq!(&input[22..], b"NEXT");
        assert_eq!(d.decode(b"NEXT"), step(0, Progress::End));
    }

    #[test]
    fn partial_chunks_hand_out_what_is_there() {
        let mut d = BodyDecoder::chunked(u64::MAX, 1024);
        assert_eq!(d.decode(b"a\r"), step(2, Progress::NeedData));
        assert_eq!(d.decode(b"\n0123"), step(5, Progress::Data(1..5)));
        assert_eq!(d.decode(b""), step(0, Progress::NeedData));
        assert_eq!(d.decode(b"456789\r"), step(6, Progress::Data(0..6)));
        assert_eq!(d.decode(b"\r"), step(1, Progress::NeedData));
    }

    #[test]
    fn length_framing() {
        let mut d = BodyDecoder::length(5);
        assert_eq!(d.known_remaining(), Some(5));
        assert_eq!(d.decode(b""), step(0, Progress::NeedData));
        assert_eq!(d.decode(b"abc"), step(3, Progress::Data(0..3)));
        assert_eq!(d.decode(b"defgh"), step(2, Progress::Data(0..2)));
        assert!(d.is_finished());
        assert_eq!(d.decode(b"gh"), step(0, Progress::End));
        assert!(BodyDecoder::length(0).is_finished());
    }
}
