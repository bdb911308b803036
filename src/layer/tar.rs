//! A streaming tar header reader for layer indexing: ustar, GNU and PAX, with PAX records parsed
//! by their length prefix so that binary values (a `security.capability` xattr holding `\n`)
//! survive. The `tar` crate splits PAX records at newlines and drops `size`/`uid`/`gid` after
//! such a value, so the indexer reads headers itself. GNU sparse maps are read here too, in
//! their four encodings (`sparse.rs` checks them).
//! See: <https://pubs.opengroup.org/onlinepubs/9799919799/utilities/pax.html#tag_20_94_13_03>

use std::io::{self, BufRead, Write};

use super::sparse::{self, MapText, SparseMap};

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
    /// Offset of the data in the stream (for a sparse file, of its first stored segment).
    pub offset: u64,
    /// A GNU sparse file's map (`size` is then the stored bytes, after a 1.0 map).
    pub sparse: Option<SparseMap>,
}

/// Reads tar headers from a stream, skipping file data.
pub struct TarReader<R> {
    inner: R,
    pos: u64,
    /// Where the next header starts: the end of the current entry's data, padded.
    next: u64,
    /// Where the current entry's data ends, unpadded: a stream may end anywhere from here to
    /// `next` and still be a whole layer.
    data_end: u64,
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
            data_end: 0,
        }
    }

    /// The underlying stream, positioned just after the last header read.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Moves past the data up to `target` straight out of the reader's buffer: most of a layer
    /// is file data, and copying it out just to drop it was a pass over the whole tar.
    /// `Ok(false)` when the stream ends after the entry's last data byte but before `target`:
    /// some writers (`umoci insert` 0.4) stop there, without padding or end-of-archive blocks,
    /// and Go's archive/tar, which most runtimes use, reads such a layer whole.
    fn skip_to(&mut self, target: u64) -> io::Result<bool> {
        match self.pass(target.saturating_sub(self.pos), |_| Ok(())) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && self.pos >= self.data_end => {
                Ok(false)
            }
            other => other.map(|()| true),
        }
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
        // Its padding must be there: an entry header follows.
        self.data_end = self.next;
        Ok(data)
    }

    /// The sparse map of an old GNU `S` header: four pairs in the header, then as many
    /// continuation blocks of 21 as the header's "extended" flags say, read from the stream.
    fn old_gnu_map(&mut self, header: &[u8; 512], gnu: bool) -> io::Result<SparseMap> {
        // star's `S` entries share the typeflag but not the layout: only GNU's is read.
        if !gnu {
            return Ok(SparseMap {
                real_size: 0,
                pairs: Err("sparse entry without GNU magic".into()),
            });
        }
        let real_size = parse_number(&header[483..495]).and_then(|v| u64::try_from(v).ok());
        let mut pairs = Vec::new();
        let mut result = sparse::old_gnu_entries(&header[386..482], &mut pairs, parse_number);
        let mut extended = header[482] != 0;
        let mut block = [0u8; 512];
        while extended {
            if !self.read_block(&mut block)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends inside a GNU sparse header",
                ));
            }
            // After a bad entry the blocks are still read, so the data is found where it is.
            if result.is_ok() {
                result = sparse::old_gnu_entries(&block[..504], &mut pairs, parse_number);
            }
            extended = block[504] != 0;
        }
        let pairs = result.and_then(|()| {
            real_size
                .map(|_| pairs)
                .ok_or_else(|| "bad real size in the GNU sparse header".to_string())
        });
        Ok(SparseMap {
            real_size: real_size.unwrap_or(0),
            pairs,
        })
    }

    /// Reads a PAX 1.0 sparse map from the start of an entry's `data` bytes: whole blocks,
    /// never past the data, up to the end of the block holding the map's last line.
    fn map_in_data(&mut self, data: u64) -> io::Result<Result<Vec<(u64, u64)>, String>> {
        let end = self.pos + data;
        let mut text = MapText::default();
        let mut block = [0u8; 512];
        loop {
            if self.pos + BLOCK > end {
                return Ok(Err("the sparse map runs past the entry's data".into()));
            }
            let whole = match self.read_block(&mut block) {
                Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => return Err(e),
                read => read.unwrap_or(false),
            };
            if !whole {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends inside an entry's data",
                ));
            }
            match text.feed(&block) {
                Ok(true) => return Ok(Ok(text.pairs())),
                Ok(false) => {}
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// The next entry, or `None` at the end-of-archive marker or a clean end of stream.
    pub fn next_entry(&mut self) -> io::Result<Option<RawEntry>> {
        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut block = [0u8; 512];
        loop {
            let more = self.skip_to(self.next)?;
            if !more || !self.read_block(&mut block)? {
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
                    // Like any extension header, one must be followed by an entry.
                    self.data_end = self.next;
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
                e.sparse = Some(self.old_gnu_map(&block, gnu)?);
                e.typeflag = b'0';
                e.offset = self.pos;
            }
            let mut map_in_data = false;
            if let Some(records) = pax.take()
                && let Some((map, in_data)) = apply_pax(&mut e, &records)?.resolve(&mut e)
            {
                e.sparse = Some(map);
                map_in_data = in_data;
            }
            // Like Go's archive/tar (which writes most layers): these types carry no data,
            // whatever their size field says.
            let data = if matches!(e.typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
                0
            } else {
                e.size
            };
            self.next = end_of_data(self.pos, data)?;
            self.data_end = self.pos + data;
            // A map whose records are already wrong is not read: the entry is refused anyway.
            if map_in_data
                && let Some(map) = &mut e.sparse
                && map.pairs.is_ok()
            {
                map.pairs = self.map_in_data(data)?;
                e.offset = self.pos;
                e.size = self.data_end.saturating_sub(self.pos);
            }
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

/// A PAX header's `GNU.sparse.*` records, gathered while the records are applied.
#[derive(Default)]
struct PaxSparse {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    real_size: Option<Vec<u8>>,
    numblocks: Option<Vec<u8>>,
    map: Option<Vec<u8>>,
    /// Version 0.0: `offset` and `numbytes` records, alternating.
    pairs: Vec<(u64, u64)>,
    offset: Option<u64>,
    error: Option<String>,
}

impl PaxSparse {
    fn record(&mut self, key: &[u8], value: &[u8]) {
        let v = Some(value.to_vec());
        match key {
            b"major" => self.major = v,
            b"minor" => self.minor = v,
            b"name" => self.name = v,
            b"size" | b"realsize" => self.real_size = v,
            b"numblocks" => self.numblocks = v,
            b"map" => self.map = v,
            b"offset" | b"numbytes" => {
                let n = sparse::decimal(value);
                match (key, self.offset.take(), n) {
                    (b"offset", None, Some(n)) => self.offset = Some(n),
                    (b"numbytes", Some(o), Some(n)) if self.pairs.len() < sparse::MAX_SEGMENTS => {
                        self.pairs.push((o, n))
                    }
                    (_, _, Some(_)) if self.pairs.len() >= sparse::MAX_SEGMENTS => {
                        self.error = sparse::pair_count(self.pairs.len() as u64 + 1).err()
                    }
                    (_, _, Some(_)) => {
                        self.error = Some("GNU.sparse.offset and numbytes out of turn".into())
                    }
                    (_, _, None) => self.error = Some("bad number in the sparse map".into()),
                }
            }
            _ => {}
        }
    }

    /// The entry's map, and whether it is at the start of the data (1.0) rather than in the
    /// records (0.0, 0.1); `None` if the records do not make the entry sparse. Applies the
    /// real name and size; the size field stays the stored bytes.
    fn resolve(self, e: &mut RawEntry) -> Option<(SparseMap, bool)> {
        let version = (self.major.as_deref(), self.minor.as_deref());
        let in_data = match version {
            (Some(b"1"), Some(b"0")) => true,
            (Some(b"0"), Some(b"0" | b"1")) => false,
            (None, None)
                if self.map.is_some()
                    || !self.pairs.is_empty()
                    || self.offset.is_some()
                    || self.error.is_some() =>
            {
                false
            }
            (None, None) => return None,
            (major, minor) => {
                let shown =
                    |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or(b"?")).into_owned();
                return Some((
                    SparseMap {
                        real_size: 0,
                        pairs: Err(format!(
                            "unknown GNU sparse format version {}.{}",
                            shown(major),
                            shown(minor)
                        )),
                    },
                    false,
                ));
            }
        };
        if let Some(name) = self.name {
            e.path = name;
        }
        let real_size = match &self.real_size {
            Some(v) => sparse::decimal(v),
            None => Some(e.size),
        };
        let pairs = (|| {
            if let Some(msg) = self.error {
                return Err(msg);
            }
            if self.offset.is_some() {
                return Err("GNU.sparse.offset without numbytes".into());
            }
            real_size.ok_or("bad GNU sparse real size")?;
            if in_data {
                return Ok(Vec::new());
            }
            let pairs = match &self.map {
                _ if !self.pairs.is_empty() => self.pairs,
                Some(map) => sparse::comma_map(map)?,
                None => Vec::new(),
            };
            if let Some(n) = &self.numblocks
                && sparse::decimal(n) != Some(pairs.len() as u64)
            {
                return Err("GNU.sparse.numblocks does not match the sparse map".into());
            }
            Ok(pairs)
        })();
        Some((
            SparseMap {
                real_size: real_size.unwrap_or(0),
                pairs,
            },
            in_data,
        ))
    }
}

fn apply_pax(e: &mut RawEntry, data: &[u8]) -> io::Result<PaxSparse> {
    let mut gnu_sparse = PaxSparse::default();
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
                } else if let Some(name) = key.strip_prefix(b"GNU.sparse.") {
                    gnu_sparse.record(name, value);
                }
            }
        }
    }
    Ok(gnu_sparse)
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

    /// A header block: `name`, typeflag, octal `size`, GNU or ustar magic, valid checksum.
    fn header(name: &[u8], typeflag: u8, size: u64, gnu: bool) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = typeflag;
        if gnu {
            h[257..265].copy_from_slice(b"ustar  \0");
        } else {
            h[257..265].copy_from_slice(b"ustar\x0000");
        }
        seal(&mut h);
        h
    }

    fn seal(h: &mut [u8; 512]) {
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().next_multiple_of(512), 0);
    }

    fn pax(records: &[(&str, &str)]) -> Vec<u8> {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = format!(" {k}={v}\n");
            let mut len = body.len() + 1;
            while len != body.len() + len.to_string().len() {
                len = body.len() + len.to_string().len();
            }
            data.extend_from_slice(format!("{len}{body}").as_bytes());
        }
        let mut out = header(b"PaxHeaders/x", b'x', data.len() as u64, false).to_vec();
        out.extend_from_slice(&data);
        pad(&mut out);
        out
    }

    fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = header(name, b'0', data.len() as u64, false).to_vec();
        out.extend_from_slice(data);
        pad(&mut out);
        out
    }

    fn entries(tar: &[u8]) -> io::Result<Vec<RawEntry>> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn a_stream_may_end_after_the_last_data_byte_or_its_padding_or_one_end_block() {
        let mut tar = file(b"a", b"hello");
        let b_at = tar.len();
        tar.extend(file(b"b", &[7; 700]));
        let b_data = b_at + 512;
        tar.extend([0; 1024]);
        for (cut, entries_read) in [
            (b_data + 700, 2),
            (b_data + 1024, 2),
            (b_data + 1024 + 512, 2),
            (tar.len(), 2),
            (b_at, 1),
            (512 + 5, 1),
            (0, 0),
        ] {
            let got = entries(&tar[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(got.len(), entries_read, "cut at {cut}");
        }
        for (cut, msg) in [
            (b_data + 699, "inside an entry's data"),
            (b_data + 1, "inside an entry's data"),
            (512 + 4, "inside an entry's data"),
            (b_at + 100, "inside a header"),
            (b_data + 1024 + 10, "inside a header"),
        ] {
            let e = entries(&tar[..cut]).expect_err(&format!("cut at {cut}"));
            assert!(e.to_string().contains(msg), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn a_stream_ending_after_an_extension_header_is_an_error() {
        let mut tar = file(b"a", b"x");
        let ext = tar.len();
        tar.extend(pax(&[("path", "long")]));
        let e = entries(&tar).expect_err("ends after the PAX header");
        assert!(e.to_string().contains("after an extension header"), "{e}");
        for cut in [ext + 512 + 13, ext + 512 + 14, ext + 512 + 5] {
            assert!(entries(&tar[..cut]).is_err(), "cut at {cut}");
        }
        let mut tar = file(b"a", b"x");
        tar.extend(header(b"././@LongLink", b'L', 3, true));
        tar.extend(b"abc");
        for cut in [tar.len(), tar.len().next_multiple_of(512)] {
            let mut t = tar.clone();
            t.resize(cut, 0);
            assert!(entries(&t).is_err(), "cut at {cut}");
        }
    }

    /// An old GNU sparse header for `name` of `real` bytes: the first four pairs in the header,
    /// the rest in continuation blocks of 21, then the stored data.
    fn old_gnu(name: &[u8], real: u64, pairs: &[(u64, u64)]) -> Vec<u8> {
        let stored: u64 = pairs.iter().map(|p| p.1).sum();
        let mut h = header(name, b'S', stored, true);
        let put = |region: &mut [u8], i: usize, (o, l): (u64, u64)| {
            // Twelve digits, no NUL: as GNU tar writes numbers that need all of the field.
            region[i * 24..i * 24 + 12].copy_from_slice(format!("{o:012o}").as_bytes());
            region[i * 24 + 12..i * 24 + 24].copy_from_slice(format!("{l:011o}\0").as_bytes());
        };
        for (i, &p) in pairs.iter().take(4).enumerate() {
            put(&mut h[386..482], i, p);
        }
        h[482] = u8::from(pairs.len() > 4);
        h[483..495].copy_from_slice(format!("{real:012o}").as_bytes());
        seal(&mut h);
        let mut out = h.to_vec();
        let rest: Vec<_> = pairs.iter().skip(4).copied().collect();
        let chunks: Vec<_> = rest.chunks(21).collect();
        for (n, chunk) in chunks.iter().enumerate() {
            let mut b = [0u8; 512];
            for (i, &p) in chunk.iter().enumerate() {
                put(&mut b[..504], i, p);
            }
            b[504] = u8::from(n + 1 < chunks.len());
            out.extend_from_slice(&b);
        }
        for &(o, l) in pairs {
            out.extend((0..l).map(|k| (o + k) as u8));
        }
        pad(&mut out);
        out
    }

    /// What the map's runs hold in the helpers above: byte `k` of the file is `k as u8`.
    fn check(e: &RawEntry, name: &[u8], real: u64, pairs: &[(u64, u64)]) {
        assert_eq!(e.path, name);
        assert_eq!(e.typeflag, b'0');
        let map = e.sparse.as_ref().expect("sparse");
        assert_eq!(map.real_size, real);
        assert_eq!(map.pairs.as_deref(), Ok(pairs));
        assert_eq!(e.size, pairs.iter().map(|p| p.1).sum::<u64>());
    }

    #[test]
    fn old_gnu_sparse_headers_with_continuation_blocks() {
        let pairs: Vec<(u64, u64)> = (0..30).map(|i| (i * 10_000, 3 + i % 5)).collect();
        for n in [0, 1, 4, 5, 25, 26, 30] {
            let mut tar = old_gnu(b"disk.img", 1 << 33, &pairs[..n]);
            tar.extend(file(b"after", b"z"));
            let mut r = TarReader::new(&tar[..]);
            let e = r.next_entry().unwrap().unwrap();
            check(&e, b"disk.img", 1 << 33, &pairs[..n]);
            // The data starts after the continuation blocks.
            let blocks = if n > 4 { (n - 4).div_ceil(21) } else { 0 };
            assert_eq!(e.offset, 512 * (1 + blocks as u64), "{n} pairs");
            let mut data = Vec::new();
            r.copy_data(e.size, &mut data).unwrap();
            let want: Vec<u8> = pairs[..n]
                .iter()
                .flat_map(|&(o, l)| (0..l).map(move |k| (o + k) as u8))
                .collect();
            assert_eq!(data, want);
            assert_eq!(r.next_entry().unwrap().unwrap().path, b"after");
        }
        // star's `S` entries have another layout: refused, not misread.
        let mut tar = old_gnu(b"s", 100, &[(0, 1)]);
        tar[257..265].copy_from_slice(b"ustar\x0000");
        let mut h: [u8; 512] = tar[..512].try_into().unwrap();
        seal(&mut h);
        tar[..512].copy_from_slice(&h);
        let e = entries(&tar).unwrap().remove(0);
        assert!(e.sparse.unwrap().pairs.is_err());
        // A header promising a continuation block the stream does not have.
        let tar = old_gnu(b"s", 1 << 20, &pairs[..10]);
        assert!(entries(&tar[..512]).is_err());
    }

    #[test]
    fn pax_0_0_sparse_records() {
        let mut tar = pax(&[
            ("GNU.sparse.size", "100000"),
            ("GNU.sparse.numblocks", "3"),
            ("GNU.sparse.offset", "10"),
            ("GNU.sparse.numbytes", "5"),
            ("GNU.sparse.offset", "5000"),
            ("GNU.sparse.numbytes", "7"),
            ("GNU.sparse.offset", "100000"),
            ("GNU.sparse.numbytes", "0"),
        ]);
        tar.extend(file(b"real", &[1; 12]));
        let e = entries(&tar).unwrap().remove(0);
        check(&e, b"real", 100_000, &[(10, 5), (5000, 7), (100_000, 0)]);
        assert_eq!(e.offset, 1024 + 512);
        // Out of turn, or a bad number: the entry is refused, the stream still read.
        for records in [
            [("GNU.sparse.numbytes", "5"), ("GNU.sparse.offset", "10")],
            [("GNU.sparse.offset", "10"), ("GNU.sparse.numbytes", "x")],
            [("GNU.sparse.offset", "10"), ("GNU.sparse.offset", "11")],
        ] {
            let mut tar = pax(&records);
            tar.extend(file(b"real", &[1; 5]));
            tar.extend(file(b"next", b""));
            let got = entries(&tar).unwrap();
            assert!(
                got[0].sparse.as_ref().unwrap().pairs.is_err(),
                "{records:?}"
            );
            assert_eq!(got[1].path, b"next");
        }
    }

    #[test]
    fn pax_0_1_sparse_map_and_name() {
        let mut tar = pax(&[
            ("GNU.sparse.size", "1048576"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.name", "dir/real name"),
            ("GNU.sparse.map", "4096,3,1048576,0"),
        ]);
        tar.extend(file(b"./GNUSparseFile.123/real name", b"abc"));
        let e = entries(&tar).unwrap().remove(0);
        check(&e, b"dir/real name", 1 << 20, &[(4096, 3), (1 << 20, 0)]);
        for (records, what) in [
            (
                vec![("GNU.sparse.numblocks", "3"), ("GNU.sparse.map", "1,2")],
                "numblocks",
            ),
            (vec![("GNU.sparse.map", "1,2,3")], "odd"),
            (
                vec![("GNU.sparse.map", "1,2"), ("GNU.sparse.size", "x")],
                "real size",
            ),
            (
                vec![
                    ("GNU.sparse.major", "2"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.map", "1,2"),
                ],
                "version 2.0",
            ),
        ] {
            let mut tar = pax(&records);
            tar.extend(file(b"f", b"ab"));
            let e = entries(&tar).unwrap().remove(0);
            let err = e.sparse.unwrap().pairs.unwrap_err();
            assert!(err.contains(what), "{err} / {what}");
        }
        // GNU.sparse.* records that make no map leave the entry as it is.
        let mut tar = pax(&[("GNU.sparse.name", "other")]);
        tar.extend(file(b"f", b"ab"));
        let e = entries(&tar).unwrap().remove(0);
        assert_eq!((e.path.as_slice(), e.sparse), (&b"f"[..], None));
    }

    /// A PAX 1.0 sparse entry: records, then the map text padded to a block, then the runs.
    fn pax_1_0(name: &str, real: u64, map_text: &str, stored: &[u8]) -> Vec<u8> {
        let mut data = map_text.as_bytes().to_vec();
        pad(&mut data);
        data.extend_from_slice(stored);
        let real = real.to_string();
        let mut tar = pax(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", name),
            ("GNU.sparse.realsize", &real),
        ]);
        tar.extend(file(b"./GNUSparseFile.7/x", &data));
        tar
    }

    #[test]
    fn pax_1_0_map_at_the_start_of_the_data() {
        let mut tar = pax_1_0("big", 1 << 36, "2\n0\n3\n68719476730\n6\n", b"abcdefghi");
        tar.extend(file(b"next", b"n"));
        let mut r = TarReader::new(&tar[..]);
        let e = r.next_entry().unwrap().unwrap();
        check(&e, b"big", 1 << 36, &[(0, 3), ((1 << 36) - 6, 6)]);
        assert_eq!(e.offset, 1024 + 512 + 512, "after the map's block");
        let mut data = Vec::new();
        r.copy_data(e.size, &mut data).unwrap();
        assert_eq!(data, b"abcdefghi");
        assert_eq!(r.next_entry().unwrap().unwrap().path, b"next");

        // A map of more than one block.
        let pairs: Vec<(u64, u64)> = (0..100).map(|i| (i * 1_000_000_000, 1)).collect();
        let mut text = format!("{}\n", pairs.len());
        for (o, l) in &pairs {
            text += &format!("{o}\n{l}\n");
        }
        assert!(text.len() > 1024);
        let tar = pax_1_0("many", 1 << 40, &text, &[1; 100]);
        let e = entries(&tar).unwrap().remove(0);
        check(&e, b"many", 1 << 40, &pairs);
        assert_eq!(e.offset, 1536 + text.len().next_multiple_of(512) as u64);

        // A map that does not end inside the data, a bad number, an absurd count.
        for (text, stored, what) in [
            ("2\n0\n3\n", &b""[..], "ends early"),
            ("1\n0\nx\n", &b"abc"[..], "bad number"),
            ("99999999999\n", &b""[..], "exceeds the limit"),
        ] {
            let mut tar = pax_1_0("f", 100, text, stored);
            tar.extend(file(b"next", b"n"));
            let got = entries(&tar).unwrap();
            let err = got[0].sparse.as_ref().unwrap().pairs.clone().unwrap_err();
            assert!(err.contains(what), "{err} / {what}");
            assert_eq!(got[1].path, b"next");
        }
        // A bad real size is not made good by the map that follows.
        let mut tar = pax(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.realsize", "-1"),
        ]);
        let mut data = b"0\n".to_vec();
        pad(&mut data);
        tar.extend(file(b"f", &data));
        let e = entries(&tar).unwrap().remove(0);
        let err = e.sparse.unwrap().pairs.unwrap_err();
        assert!(err.contains("real size"), "{err}");
        // Cut inside the map: the stream is short, not the map.
        let tar = pax_1_0("f", 100, "1\n0\n3\n", b"abc");
        let e = entries(&tar[..1536 + 100]).unwrap_err();
        assert!(e.to_string().contains("inside an entry's data"), "{e}");
    }
}
