//! Path normalisation and whiteout classification of layer entries, on raw bytes.
//! See: <https://github.com/opencontainers/image-spec/blob/main/layer.md#whiteouts>

/// Prefix of a whiteout file name.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the opaque-directory marker.
pub const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of AUFS metadata names (`.wh..wh.plnk`, `.wh..wh.aufs`), which carry no file.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// What a layer entry means for the merge, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// An ordinary entry at this normalised path (`""` is the root).
    Entry(Vec<u8>),
    /// `.wh.NAME`: hide this path (and below) in lower layers.
    Whiteout(Vec<u8>),
    /// `DIR/.wh..wh..opq`: hide all lower-layer children of this directory.
    Opaque(Vec<u8>),
    /// AUFS bookkeeping: ignore.
    Skip,
}

/// Longest normalised path accepted: Linux's PATH_MAX, so no runtime could extract a longer one.
/// Every missing parent of an entry becomes a directory that export writes with its full path,
/// so without a bound one 64 KiB name (32,768 levels) would export as a 1 GiB tar.
pub const MAX_PATH: usize = 4096;

/// Normalises a tar path: `./a`, `a/`, `/a` and `a//b/.` all name one path; `..` is refused
/// because no entry may leave the root, NUL cannot be in a name, and paths over [`MAX_PATH`]
/// are refused.
pub fn normalise(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err("path contains '..' and would leave the image root"),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(comp);
            }
        }
    }
    if out.len() > MAX_PATH {
        return Err("path is longer than 4096 bytes (PATH_MAX)");
    }
    Ok(out)
}

/// Splits a normalised path into parent and last component (`("", "a")` for `a`).
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Joins a normalised parent and a name.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parent.len() + 1 + name.len());
    out.extend_from_slice(parent);
    if !parent.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// Normalises and classifies a raw tar path by its last component, whatever the entry type
/// (some tools write whiteouts as hardlinks or with odd modes).
pub fn classify(raw: &[u8]) -> Result<Class, &'static str> {
    let path = normalise(raw)?;
    let (parent, name) = split_parent(&path);
    for dir in parent.split(|&b| b == b'/') {
        if dir.starts_with(AUFS_META_PREFIX) {
            return Ok(Class::Skip);
        }
        if dir.starts_with(WHITEOUT_PREFIX) {
            return Err("entry lies under a whiteout name");
        }
    }
    if !name.starts_with(WHITEOUT_PREFIX) {
        return Ok(Class::Entry(path));
    }
    if name == OPAQUE {
        return Ok(Class::Opaque(parent.to_vec()));
    }
    if name.starts_with(AUFS_META_PREFIX) {
        return Ok(Class::Skip);
    }
    let hidden = &name[WHITEOUT_PREFIX.len()..];
    match hidden {
        b"" => Err("a bare '.wh.' whiteout names nothing"),
        b"." | b".." => Err("whiteout names '.' or '..'"),
        _ => Ok(Class::Whiteout(join(parent, hidden))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: &str) -> Class {
        Class::Entry(p.as_bytes().to_vec())
    }

    #[test]
    fn equivalent_spellings_normalise_to_one_path() {
        for raw in [
            "a/b",
            "./a/b",
            "/a/b",
            "a/b/",
            "a//b",
            "./a/./b/.",
            "//a/b//",
        ] {
            assert_eq!(classify(raw.as_bytes()), Ok(entry("a/b")), "{raw}");
        }
        for raw in [".", "./", "/", ""] {
            assert_eq!(classify(raw.as_bytes()), Ok(entry("")), "{raw}");
        }
    }

    #[test]
    fn dotdot_and_nul_are_refused() {
        for raw in ["../x", "a/../../x", "/../etc", "a/..", "..", "a/b/../c"] {
            assert!(normalise(raw.as_bytes()).is_err(), "{raw}");
        }
        assert!(normalise(b"a\0b").is_err());
    }

    #[test]
    fn paths_up_to_path_max_are_kept() {
        let at_limit = "d/".repeat(MAX_PATH / 2 - 1) + "ff";
        assert_eq!(at_limit.len(), MAX_PATH);
        assert_eq!(
            normalise(at_limit.as_bytes()),
            Ok(at_limit.clone().into_bytes())
        );
        // Spelling that normalisation removes does not count.
        let spelled = "./".repeat(5000) + &at_limit;
        assert_eq!(
            normalise(spelled.as_bytes()),
            Ok(at_limit.clone().into_bytes())
        );
        assert!(normalise((at_limit + "f").as_bytes()).is_err());
    }

    #[test]
    fn whiteouts_by_name() {
        assert_eq!(classify(b"d/.wh.x"), Ok(Class::Whiteout(b"d/x".to_vec())));
        assert_eq!(classify(b"./.wh.top"), Ok(Class::Whiteout(b"top".to_vec())));
        assert_eq!(
            classify(b"d/.wh..wh..opq"),
            Ok(Class::Opaque(b"d".to_vec()))
        );
        assert_eq!(classify(b".wh..wh..opq"), Ok(Class::Opaque(Vec::new())));
        assert_eq!(classify(b".wh..wh.plnk/123.4"), Ok(Class::Skip));
        assert!(classify(b".wh.x/y").is_err());
        assert_eq!(classify(b".wh..wh.plnk"), Ok(Class::Skip));
        assert_eq!(classify(b"d/.wh..wh.aufs"), Ok(Class::Skip));
        assert!(classify(b"d/.wh.").is_err());
        assert!(classify(b".wh...").is_err());
    }

    #[test]
    fn names_that_merely_contain_wh_are_ordinary() {
        for raw in ["a.wh.b", ".wh_x", "x.wh.", "d/.whx", "wh.a"] {
            assert_eq!(classify(raw.as_bytes()), Ok(entry(raw)), "{raw}");
        }
    }

    #[test]
    fn non_utf8_names_survive() {
        assert_eq!(
            classify(b"./caf\xe9/\xff"),
            Ok(Class::Entry(b"caf\xe9/\xff".to_vec()))
        );
    }
}
