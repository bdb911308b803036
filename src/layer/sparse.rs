//! GNU sparse files in layer tars: the four ways GNU tar writes a sparse map (old GNU `S`
//! headers, PAX 0.0, 0.1 and 1.0), parsed into one form, and the check that turns a map into
//! the [`Segment`]s that the index, the merged tree and every reader use.
//! See: <https://www.gnu.org/software/tar/manual/html_node/Sparse-Formats.html>
//!
//! A sparse entry stores only its data segments, back to back; everything else in the file is
//! a hole (zeros). The entry's size field counts the stored bytes (plus, in 1.0, the map at the
//! start of the data); the real size comes from the map's header.

/// Most segments one file's map may have: a map is read into memory, so a hostile one must not
/// be able to ask for more (GNU tar writes one per data run; a million is a badly fragmented
/// disk image, at 24 bytes each in the index).
pub const MAX_SEGMENTS: usize = 1 << 20;

/// Most segments all the sparse files of one layer may have together.
pub const MAX_LAYER_SEGMENTS: usize = 1 << 22;

/// One stored data run of a sparse file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Where the run starts in the file.
    pub logical: u64,
    /// Its length (never 0).
    pub len: u64,
    /// Where its bytes start in the decompressed layer tar (or in export's spooled copy).
    pub tar: u64,
}

/// A sparse entry's map as its headers give it, before it is checked against the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    /// The file's real (logical) size.
    pub real_size: u64,
    /// `(offset, length)` pairs as written, or why they could not be read.
    pub pairs: Result<Vec<(u64, u64)>, String>,
}

/// Checks a map against the entry's `stored` data bytes, which start at `data` in the tar, and
/// places each run: runs in order, not overlapping, inside the real size, and together exactly
/// the stored bytes (as Go's archive/tar insists: more data than the map places is as wrong as
/// less). Empty runs (GNU tar ends every map with one at the real size) are dropped.
pub fn segments(map: &SparseMap, data: u64, stored: u64) -> Result<Box<[Segment]>, String> {
    let pairs = map.pairs.as_ref().map_err(Clone::clone)?;
    let mut out = Vec::with_capacity(pairs.iter().filter(|p| p.1 > 0).count());
    let (mut prev_end, mut placed) = (0u64, 0u64);
    for &(logical, len) in pairs {
        let end = logical
            .checked_add(len)
            .filter(|&end| end <= map.real_size)
            .ok_or_else(|| {
                format!(
                    "sparse segment of {len} bytes at {logical} runs past the real size {}",
                    map.real_size
                )
            })?;
        if logical < prev_end {
            return Err(format!(
                "sparse segment at {logical} overlaps or precedes the one ending at {prev_end}"
            ));
        }
        prev_end = end;
        if len == 0 {
            continue;
        }
        let tar = data
            .checked_add(placed)
            .ok_or_else(|| "sparse map out of range".to_string())?;
        placed = placed
            .checked_add(len)
            .filter(|&p| p <= stored)
            .ok_or_else(|| {
                format!("sparse map places more data than the {stored} bytes the entry holds")
            })?;
        out.push(Segment { logical, len, tar });
    }
    if placed < stored {
        return Err(format!(
            "entry holds {stored} bytes of data but its sparse map places only {placed}"
        ));
    }
    Ok(out.into_boxed_slice())
}

/// A decimal number of a sparse map (PAX 0.x records and the 1.0 map are decimal, whatever
/// older manuals say: that is what GNU tar writes and Go's reader expects).
pub fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `count` as a number of map pairs, if it is one a map may have.
pub fn pair_count(count: u64) -> Result<usize, String> {
    usize::try_from(count)
        .ok()
        .filter(|&n| n <= MAX_SEGMENTS)
        .ok_or_else(|| {
            format!("sparse map of {count} segments exceeds the limit of {MAX_SEGMENTS}")
        })
}

/// The PAX 0.1 map: `offset,length,offset,length…`.
pub fn comma_map(v: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let fields = v.split(|&b| b == b',');
    let numbers = fields
        .map(decimal)
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| "bad number in GNU.sparse.map".to_string())?;
    if numbers.len() % 2 != 0 {
        return Err("GNU.sparse.map has an odd number of fields".into());
    }
    pair_count(numbers.len() as u64 / 2)?;
    Ok(numbers.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

/// Parses the PAX 1.0 map at the start of a sparse entry's data, a 512-byte block at a time:
/// the number of pairs, then each offset and length, each on its own line; the data starts at
/// the next block boundary after the last line.
#[derive(Default)]
pub struct MapText {
    numbers: Vec<u64>,
    token: Vec<u8>,
    wanted: Option<usize>,
}

impl MapText {
    /// Takes one block; `Ok(true)` once the map is complete.
    pub fn feed(&mut self, block: &[u8]) -> Result<bool, String> {
        for &b in block {
            if b == 0 {
                // The padding after the last line: the map stopped short of its count.
                return Err("the sparse map ends early".into());
            }
            if b != b'\n' {
                if self.token.len() > 20 {
                    return Err("bad number in the sparse map".into());
                }
                self.token.push(b);
                continue;
            }
            let n = decimal(&self.token).ok_or("bad number in the sparse map")?;
            self.token.clear();
            match self.wanted {
                None => {
                    let pairs = pair_count(n)?;
                    self.wanted = Some(2 * pairs);
                    self.numbers.reserve(2 * pairs.min(4096));
                }
                Some(_) => self.numbers.push(n),
            }
            if self.wanted == Some(self.numbers.len()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The pairs read.
    pub fn pairs(self) -> Vec<(u64, u64)> {
        self.numbers.chunks_exact(2).map(|p| (p[0], p[1])).collect()
    }
}

/// Reads the 24-byte entries (12-byte offset, 12-byte length) of an old GNU sparse header or
/// continuation block into `out`, stopping at the first empty one as GNU tar does.
pub fn old_gnu_entries(
    region: &[u8],
    out: &mut Vec<(u64, u64)>,
    parse: impl Fn(&[u8]) -> Option<i128>,
) -> Result<(), String> {
    for e in region.chunks_exact(24) {
        if e[0] == 0 {
            break;
        }
        let num = |f: &[u8]| {
            parse(f)
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| "bad number in the GNU sparse header".to_string())
        };
        pair_count(out.len() as u64 + 1)?;
        out.push((num(&e[..12])?, num(&e[12..])?));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(real_size: u64, pairs: &[(u64, u64)]) -> SparseMap {
        SparseMap {
            real_size,
            pairs: Ok(pairs.to_vec()),
        }
    }

    #[test]
    fn segments_are_placed_back_to_back_and_empty_runs_dropped() {
        let m = map(1 << 20, &[(4096, 10), (8192, 0), (9000, 5), (1 << 20, 0)]);
        let s = segments(&m, 1000, 15).unwrap();
        assert_eq!(
            &*s,
            &[
                Segment {
                    logical: 4096,
                    len: 10,
                    tar: 1000
                },
                Segment {
                    logical: 9000,
                    len: 5,
                    tar: 1010
                }
            ]
        );
        // All holes.
        assert!(segments(&map(5, &[(5, 0)]), 0, 0).unwrap().is_empty());
    }

    #[test]
    fn bad_maps_are_refused() {
        for (m, stored, what) in [
            (map(100, &[(0, 10), (5, 10)]), 20, "overlaps"),
            (map(100, &[(50, 10), (0, 10)]), 20, "overlaps"),
            (map(100, &[(95, 10)]), 10, "past the real size"),
            (map(100, &[(u64::MAX, 2)]), 2, "past the real size"),
            (map(100, &[(0, 10)]), 5, "places more data"),
            (map(100, &[(0, 10)]), 15, "places only 10"),
        ] {
            let e = segments(&m, 0, stored).unwrap_err();
            assert!(e.contains(what), "{e} / {what}");
        }
    }

    #[test]
    fn comma_maps() {
        assert_eq!(comma_map(b"1,2,30,4").unwrap(), vec![(1, 2), (30, 4)]);
        assert_eq!(comma_map(b"").unwrap(), vec![]);
        assert!(comma_map(b"1,2,3").is_err());
        assert!(comma_map(b"1,x").is_err());
        assert!(comma_map(b"1,-2").is_err());
        assert!(comma_map(b"1,,2").is_err());
        assert!(comma_map(b"99999999999999999999999,1").is_err());
    }

    #[test]
    fn map_text_across_blocks() {
        let text = b"2\n4096\n10\n9000\n5\n";
        let mut m = MapText::default();
        // Fed in pieces, as if the lines crossed block boundaries.
        assert!(!m.feed(&text[..7]).unwrap());
        assert!(m.feed(&text[7..]).unwrap());
        assert_eq!(m.pairs(), vec![(4096, 10), (9000, 5)]);
        let mut m = MapText::default();
        assert!(m.feed(b"0\n").unwrap());
        assert!(m.pairs().is_empty());
        assert!(MapText::default().feed(b"x\n").is_err());
        assert!(MapText::default().feed(b"1\n-5\n").is_err());
        let e = MapText::default().feed(b"99999999999\n").unwrap_err();
        assert!(e.contains("exceeds the limit"), "{e}");
        assert!(MapText::default().feed(&[b'1'; 30]).is_err());
    }
}
