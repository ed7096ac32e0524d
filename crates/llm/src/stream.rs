//! Turning a sequence's token pieces into the text a client receives: bytes held until they form whole UTF-8
//! characters, and text held while it could still be the start of a stop string.

/// One sequence's text so far.
#[derive(Debug, Default)]
pub(crate) struct TextStream {
    /// Bytes of an unfinished UTF-8 character.
    bytes: Vec<u8>,
    /// Text not yet released because it ends with the start of a stop string.
    held: String,
    stops: Vec<String>,
}

/// What a new piece released.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// More text (possibly empty).
    Text(String),
    /// A stop string appeared: the text before it; the sequence ends.
    Stopped(String),
}

impl TextStream {
    pub(crate) fn new(stops: Vec<String>) -> TextStream {
        TextStream {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..TextStream::default()
        }
    }

    /// Adds a token's bytes.
    pub(crate) fn push(&mut self, piece: &[u8]) -> Released {
        self.bytes.extend_from_slice(piece);
        let valid = match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.len(),
            // An invalid sequence (not just an unfinished one) is released as U+FFFD, as Python's decoders do.
            Err(e) if e.error_len().is_some() => {
                let text = String::from_utf8_lossy(&self.bytes).into_owned();
                self.bytes.clear();
                return self.release(text);
            }
            Err(e) => e.valid_up_to(),
        };
        let rest = self.bytes.split_off(valid);
        let text = String::from_utf8(std::mem::replace(&mut self.bytes, rest)).unwrap_or_default();
        self.release(text)
    }

    fn release(&mut self, text: String) -> Released {
        self.held.push_str(&text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let mut out = std::mem::take(&mut self.held);
            out.truncate(at);
            return Released::Stopped(out);
        }
        // Keep the longest suffix that begins some stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| {
                (1..stop.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| stop.is_char_boundary(n) && self.held.ends_with(&stop[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let rest = self.held.split_off(cut);
        Released::Text(std::mem::replace(&mut self.held, rest))
    }

    /// What remains when the sequence ends for another reason (held text, and unfinished bytes as U+FFFD).
    pub(crate) fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.held);
        if !self.bytes.is_empty() {
            out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.bytes)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: Released) -> String {
        match r {
            Released::Text(t) => t,
            Released::Stopped(t) => panic!("stopped with {t:?}"),
        }
    }

    #[test]
    fn split_characters_wait_for_their_last_byte() {
        let mut s = TextStream::new(vec![]);
        let e = "é".as_bytes();
        assert_eq!(text(s.push(b"caf")), "caf");
        assert_eq!(text(s.push(&e[..1])), "");
        assert_eq!(text(s.push(&e[1..])), "é");
        assert_eq!(text(s.push(&[0xff, b'x'])), "\u{fffd}x");
        assert_eq!(text(s.push(&"€".as_bytes()[..2])), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_strings_are_cut_even_across_pieces_and_never_leak() {
        let mut s = TextStream::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(text(s.push(b"one\n")), "one");
        assert_eq!(text(s.push(b"two")), "\ntwo");
        assert_eq!(text(s.push(b" E")), " ");
        assert_eq!(text(s.push(b"N")), "");
        assert_eq!(s.push(b"D more"), Released::Stopped("".into()));
        let mut s = TextStream::new(vec!["\n\n".into()]);
        assert_eq!(s.push(b"a\n\nb"), Released::Stopped("a".into()));
    }

    #[test]
    fn held_text_comes_out_at_the_end() {
        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(text(s.push(b"x ST")), "x ");
        assert_eq!(s.finish(), "ST");
    }
}
