//! A streaming tar header reader for layer indexing: ustar, GNU and PAX, with PAX records parsed
//! by their length prefix so that binary values (a `security.capability` xattr holding `\n`)
//! survive. The `tar` crate splits PAX records at newlines and drops `size`/`uid`/`gid` after
//! such a value, so the indexer reads headers itself.
//! See: <https://pubs.opengroup.org/onlinepubs/9799919799/utilities/pax.html#tag_20_94_13_03>

use std::io::{self, BufRead, Write};

const BLOCK: u64 = 512;
/// Largest PAX or GNU long-name header read into memory; larger ones are refused.
pub const MAX_EXTENSION: u64 = 16 * 1024 * 1024;

/// One entry's header after GNU long names and PAX records are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    /// Path as written (not normalised).
    pub path: Vec<u8>,
    /// Link target (symlinks and hardlinks).
    pub link: Vec<u8>,
    /// Typeflag byte.
    pub typeflag: u8,
    /// Mode field, all bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds (PAX only).
    pub mtime_nsec: u32,
    /// Data length.
    pub size: u64,
    /// Device major.
    pub devmajor: u32,
    /// Device minor.
    pub devminor: u32,
    /// `SCHILY.xattr.*` records in order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the data in the stream.
    pub offset: u64,
    /// True for GNU sparse entries or PAX `GNU.sparse.*` records.
    pub sparse: bool,
}

/// Reads tar headers from a stream, skipping file data.
pub struct TarReader<R> {
    inner: R,
    pos: u64,
    next: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: BufRead> TarReader<R> {
    /// Starts at the beginning of a tar stream.
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            pos: 0,
            next: 0,
        }
    }

    /// The underlying stream, positioned just after the last header read.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Moves past the data up to `target` straight out of the reader's buffer: most of a layer
    /// is file data, and copying it out just to drop it was a pass over the whole tar.
    fn skip_to(&mut self, target: u64) -> io::Result<()> {
        self.pass(target.saturating_sub(self.pos), |_| Ok(()))
    }

    /// Copies the data of the entry just returned by [`TarReader::next_entry`] to `w` (at most
    /// `len` bytes, and never past the entry); the next call then skips only what is left.
    pub fn copy_data(&mut self, len: u64, w: &mut impl Write) -> io::Result<()> {
        self.pass(len.min(self.next.saturating_sub(self.pos)), |b| {
            w.write_all(b)
        })
    }

    /// Consumes `len` bytes, showing each piece to `f`.
    fn pass(&mut self, len: u64, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let buf = match self.inner.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends inside an entry's data",
                ));
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            f(&buf[..n])?;
            self.inner.consume(n);
            self.pos += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// Reads one 512-byte block; `Ok(false)` on a clean end of stream before it.
    fn read_block(&mut self, block: &mut [u8; 512]) -> io::Result<bool> {
        let mut filled = 0;
        while filled < block.len() {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.pos += filled as u64;
        match filled {
            0 => Ok(false),
            512 => Ok(true),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar stream ends inside a header",
            )),
        }
    }

    /// Reads an extension header's data (bounded), and moves past its padding.
    fn read_extension(&mut self, size: u64, what: &str) -> io::Result<Vec<u8>> {
        if size > MAX_EXTENSION {
            return Err(invalid(format!(
                "{what} header of {size} bytes exceeds the {MAX_EXTENSION}-byte limit"
            )));
        }
        let mut data = vec![0; size as usize];
        self.inner.read_exact(&mut data).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("tar stream ends inside a {what} header"),
                )
            } else {
                e
            }
        })?;
        self.pos += size;
        self.next = self.pos.next_multiple_of(BLOCK);
        Ok(data)
    }

    /// The next entry, or `None` at the end-of-archive marker or a clean end of stream.
    pub fn next_entry(&mut self) -> io::Result<Option<RawEntry>> {
        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut block = [0u8; 512];
        loop {
            self.skip_to(self.next)?;
            if !self.read_block(&mut block)? {
                return if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar stream ends after an extension header",
                    ))
                } else {
                    Ok(None)
                };
            }
            if block.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            check_checksum(&block)?;
            let size = parse_number(&block[124..136]).ok_or_else(|| invalid("bad size field"))?;
            let size = u64::try_from(size).map_err(|_| invalid("negative size field"))?;
            self.next = self.pos;
            match block[156] {
                b'x' => {
                    pax = Some(self.read_extension(size, "PAX")?);
                    continue;
                }
                b'g' => {
                    // Global PAX headers set defaults nobody in the container world relies on.
                    self.next = end_of_data(self.pos, size)?;
                    continue;
                }
                b'L' => {
                    long_name = Some(trim_nul(self.read_extension(size, "GNU long name")?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_extension(size, "GNU long link")?));
                    continue;
                }
                _ => {}
            }
            let mut e = RawEntry {
                typeflag: block[156],
                mode: parse_number(&block[100..108])
                    .and_then(|m| u32::try_from(m).ok())
                    .ok_or_else(|| invalid("bad mode field"))?,
                uid: parse_number(&block[108..116])
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| invalid("bad uid field"))?,
                gid: parse_number(&block[116..124])
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| invalid("bad gid field"))?,
                mtime: parse_number(&block[136..148])
                    .and_then(|v| i64::try_from(v).ok())
                    .ok_or_else(|| invalid("bad mtime field"))?,
                size,
                offset: self.pos,
                ..RawEntry::default()
            };
            let ustar = &block[257..263] == b"ustar\0";
            let gnu = &block[257..265] == b"ustar  \0";
            if ustar || gnu {
                e.devmajor = parse_number(&block[329..337])
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0);
                e.devminor = parse_number(&block[337..345])
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0);
            }
            e.path = field(&block[0..100]).to_vec();
            if ustar {
                let prefix = field(&block[345..500]);
                if !prefix.is_empty() {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(&e.path);
                    e.path = p;
                }
            }
            e.link = field(&block[157..257]).to_vec();
            if let Some(n) = long_name.take() {
                e.path = n;
            }
            if let Some(l) = long_link.take() {
                e.link = l;
            }
            if e.typeflag == b'S' {
                e.sparse = true;
            }
            if let Some(records) = pax.take() {
                apply_pax(&mut e, &records)?;
            }
            // Like Go's archive/tar (which writes most layers): these types carry no data,
            // whatever their size field says.
            let data = if matches!(e.typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
                0
            } else {
                e.size
            };
            self.next = end_of_data(self.pos, data)?;
            return Ok(Some(e));
        }
    }
}

/// Where the next header starts after `size` bytes of data at `pos`. Rounding a size near
/// 2^64 up to a whole block must fail, not wrap to 0 (which would read file data as headers)
/// or panic.
fn end_of_data(pos: u64, size: u64) -> io::Result<u64> {
    size.checked_next_multiple_of(BLOCK)
        .and_then(|padded| pos.checked_add(padded))
        .ok_or_else(|| invalid(format!("entry size {size} is too large")))
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// A NUL-terminated (or full-width) header field.
fn field(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn check_checksum(block: &[u8; 512]) -> io::Result<()> {
    let stored =
        parse_number(&block[148..156]).ok_or_else(|| invalid("bad header checksum field"))?;
    // The checksum field counts as eight spaces. Whole-block sums minus the field's own bytes,
    // rather than a test per byte, let the compiler vectorise this: it runs once per entry.
    let field = &block[148..156];
    let spaces = 8 * i64::from(b' ');
    let unsigned = |b: &[u8]| i64::from(b.iter().map(|&c| u32::from(c)).sum::<u32>());
    if stored == i128::from(unsigned(block) - unsigned(field) + spaces) {
        return Ok(());
    }
    // Some old writers summed signed chars; accept either, as GNU tar does.
    let signed = |b: &[u8]| b.iter().map(|&c| i64::from(c as i8)).sum::<i64>();
    if stored == i128::from(signed(block) - signed(field) + spaces) {
        Ok(())
    } else {
        Err(invalid(
            "tar header checksum mismatch (corrupt or not a tar)",
        ))
    }
}

/// Parses an octal field, or a GNU base-256 one (high bit set; two's complement).
fn parse_number(b: &[u8]) -> Option<i128> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        if b.len() > 12 {
            return None;
        }
        let negative = b[0] & 0x40 != 0;
        let mut v: i128 = i128::from(b[0] & 0x7f);
        if negative {
            v -= 0x80;
        }
        for &c in &b[1..] {
            v = (v << 8) | i128::from(c);
        }
        return Some(v);
    }
    let s: &[u8] = {
        let start = b
            .iter()
            .position(|&c| c != b' ' && c != 0)
            .unwrap_or(b.len());
        let rest = &b[start..];
        let end = rest
            .iter()
            .position(|&c| c == b' ' || c == 0)
            .unwrap_or(rest.len());
        &rest[..end]
    };
    if s.is_empty() {
        return Some(0);
    }
    let mut v: i128 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(i128::from(c - b'0'))?;
    }
    Some(v)
}

/// Splits PAX records (`"%d %s=%s\n"`) by their length prefix.
pub fn pax_records(mut data: &[u8]) -> io::Result<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        // Some writers pad the record block with NULs.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| invalid("malformed PAX record"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("malformed PAX record length"))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(invalid("malformed PAX record"));
        }
        let record = &data[sp + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| invalid("PAX record without '='"))?;
        out.push((&record[..eq], &record[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

fn apply_pax(e: &mut RawEntry, data: &[u8]) -> io::Result<()> {
    for (key, value) in pax_records(data)? {
        let num = || -> io::Result<u64> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| invalid(format!("bad PAX {} value", String::from_utf8_lossy(key))))
        };
        match key {
            b"path" => e.path = value.to_vec(),
            b"linkpath" => e.link = value.to_vec(),
            b"size" => e.size = num()?,
            b"uid" => e.uid = num()?,
            b"gid" => e.gid = num()?,
            b"mtime" => {
                (e.mtime, e.mtime_nsec) =
                    parse_pax_time(value).ok_or_else(|| invalid("bad PAX mtime value"))?
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    e.xattrs.push((name.to_vec(), value.to_vec()));
                } else if key.starts_with(b"GNU.sparse.") {
                    e.sparse = true;
                }
            }
        }
    }
    Ok(())
}

/// Parses a PAX time, `[-]SECONDS[.FRACTION]`, keeping nanoseconds.
pub fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    // -1.25 means 1.25 s before the epoch: -2 s + 0.75 s.
    if nsec == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_split_by_length_not_newline() {
        let value = b"\x01\x00\x00\x02\n\x00";
        let mut rec = Vec::new();
        let body = [
            b" SCHILY.xattr.security.capability=".as_slice(),
            value,
            b"\n",
        ]
        .concat();
        let len = body.len() + 2;
        rec.extend_from_slice(len.to_string().as_bytes());
        rec.extend_from_slice(&body);
        rec.extend_from_slice(b"9 size=5\n");
        let r = pax_records(&rec).expect("parses");
        assert_eq!(
            r,
            vec![
                (
                    b"SCHILY.xattr.security.capability".as_slice(),
                    value.as_slice()
                ),
                (b"size".as_slice(), b"5".as_slice())
            ]
        );
        assert!(pax_records(b"99 path=a\n").is_err());
        assert!(pax_records(b"x path=a\n").is_err());
    }

    /// A header block for `name` with `size` in base-256, and a valid checksum.
    fn header_with_size(name: &[u8], size: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    #[test]
    fn checksums_summed_as_unsigned_or_signed_bytes_are_both_accepted() {
        let mut h = header_with_size("caf\u{e9}".as_bytes(), 1);
        assert!(check_checksum(&h).is_ok());
        h[148..156].fill(b' ');
        let signed: i64 = h.iter().map(|&b| i64::from(b as i8)).sum();
        h[148..156].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
        assert!(check_checksum(&h).is_ok());
        h[0] ^= 1;
        assert!(check_checksum(&h).is_err());
    }

    #[test]
    fn size_that_overflows_when_rounded_to_a_block_is_an_error() {
        for size in [u64::MAX, u64::MAX - 510] {
            let mut tar = header_with_size(b"huge", size).to_vec();
            tar.extend_from_slice(&header_with_size(b"after", 0));
            let mut r = TarReader::new(&tar[..]);
            let err = r.next_entry().expect_err("size overflows");
            assert!(err.to_string().contains("too large"), "{err}");
        }
        // The largest size that fits after one header is read; the stream then ends inside it.
        let size = u64::MAX - 1023;
        let tar = header_with_size(b"big", size);
        let mut r = TarReader::new(&tar[..]);
        assert_eq!(r.next_entry().expect("header").expect("entry").size, size);
        assert!(r.next_entry().is_err());
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"  644 \0"), Some(0o644));
        assert_eq!(parse_number(b"\0\0\0\0"), Some(0));
        assert_eq!(
            parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 0x2d, 0xc6, 0xc0]),
            Some(3_000_000)
        );
        assert_eq!(parse_number(&[0xff; 8]), Some(-1));
        assert_eq!(parse_number(b"0009"), None);
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1700000000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1700000000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }
}
