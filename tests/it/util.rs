//! Test harness: describes layers as data, writes them as docker-archive and OCI images,
//! runs the real `flatfs` binary and turns its tar output into a canonical text listing.
//!
//! Layer tars are written header by header rather than with `tar::Builder`, because the
//! cases under test are exactly the ones a well-behaved builder refuses to produce: raw
//! non-UTF-8 names, `../x`, S_IFMT bits in the mode field, whiteouts typed as hardlinks,
//! archives without end-of-archive blocks.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Default mtime of every builder entry; implicit directories have mtime 0, so any
/// non-zero value tells the two apart.
pub const MTIME: u64 = 1000;
/// RepoTags of docker archives written by the builder.
pub const DOCKER_TAG: &str = "example.com/flatfs/test:v1";
/// `org.opencontainers.image.ref.name` of the OCI images written by the builder.
pub const OCI_REF: &str = "latest";

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MT_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

// ---------------------------------------------------------------------------------------
// Entries

#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
    /// Any other typeflag with its data, e.g. a global PAX header ('g').
    Other(u8, Vec<u8>),
    /// An old-GNU sparse file ('S'): the stored chunks at their offsets, holes between.
    GnuSparse(u64, Vec<(u64, Vec<u8>)>),
}

/// How a name or link target that does not fit the 100-byte header field is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LongNames {
    /// PAX `path` / `linkpath` records (what Go's archive/tar and buildkit write).
    Pax,
    /// GNU `L` / `K` pseudo-entries (what GNU tar writes by default).
    Gnu,
    /// The ustar `prefix` field (names up to 255 bytes split at a `/`).
    UstarPrefix,
}

/// How a uid/gid that does not fit 7 octal digits is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BigIds {
    Pax,
    Base256,
}

/// One tar entry of a layer, as it will be written.
#[derive(Clone, Debug)]
pub struct Entry {
    path: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    mtime_nanos: Option<u32>,
    uname: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    long_names: LongNames,
    big_ids: BigIds,
}

fn entry(path: &[u8], kind: Kind, mode: u32) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: MTIME,
        mtime_nanos: None,
        uname: Vec::new(),
        xattrs: Vec::new(),
        pax: Vec::new(),
        long_names: LongNames::Pax,
        big_ids: BigIds::Pax,
    }
}

/// A regular file, mode 0644.
pub fn file(path: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Entry {
    entry(path.as_ref(), Kind::File(data.as_ref().to_vec()), 0o644)
}

/// A directory, mode 0755, written with a trailing `/` as tar writers do.
pub fn dir(path: impl AsRef<[u8]>) -> Entry {
    let mut p = path.as_ref().to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    entry(&p, Kind::Dir, 0o755)
}

/// A symlink, mode 0777.
pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
    entry(
        path.as_ref(),
        Kind::Symlink(target.as_ref().to_vec()),
        0o777,
    )
}

/// A tar hardlink entry (type '1') named `path` pointing at `target`.
pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
    entry(
        path.as_ref(),
        Kind::Hardlink(target.as_ref().to_vec()),
        0o644,
    )
}

/// The whiteout for `path`: an empty file `DIR/.wh.NAME`.
pub fn whiteout(path: impl AsRef<[u8]>) -> Entry {
    let path = path.as_ref();
    let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    let mut p = parent.to_vec();
    p.extend_from_slice(b".wh.");
    p.extend_from_slice(name);
    file(p, b"")
}

/// The opaque marker of directory `dir`: an empty file `DIR/.wh..wh..opq`.
pub fn opaque(dir: impl AsRef<[u8]>) -> Entry {
    let mut p = dir.as_ref().to_vec();
    if !p.is_empty() && !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(b".wh..wh..opq");
    file(p, b"")
}

pub fn chardev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
    entry(path.as_ref(), Kind::CharDev(major, minor), 0o666)
}

pub fn blockdev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
    entry(path.as_ref(), Kind::BlockDev(major, minor), 0o660)
}

pub fn fifo(path: impl AsRef<[u8]>) -> Entry {
    entry(path.as_ref(), Kind::Fifo, 0o644)
}

/// An old-GNU sparse file of `real_size` bytes holding `chunks` (at most 4) at their
/// offsets and zeros elsewhere, as `tar --sparse` writes it.
pub fn gnu_sparse(path: impl AsRef<[u8]>, real_size: u64, chunks: &[(u64, &[u8])]) -> Entry {
    assert!(
        chunks.len() <= 4,
        "only the header's own sparse map is written"
    );
    let chunks = chunks.iter().map(|(o, d)| (*o, d.to_vec())).collect();
    entry(path.as_ref(), Kind::GnuSparse(real_size, chunks), 0o644).long_names(LongNames::Gnu)
}

/// A global PAX header ('g'), as `git archive` writes at the start of its tars.
pub fn global_pax_header(records: &[(&str, &[u8])]) -> Entry {
    let mut data = Vec::new();
    for (k, v) in records {
        data.extend(pax_record(k.as_bytes(), v));
    }
    entry(b"pax_global_header", Kind::Other(b'g', data), 0o666)
}

impl Entry {
    /// The raw mode field, S_IFMT bits included if the test puts them there.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn uid(mut self, uid: u64) -> Self {
        self.uid = uid;
        self
    }
    pub fn gid(mut self, gid: u64) -> Self {
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, secs: u64) -> Self {
        self.mtime = secs;
        self
    }
    /// Sub-second mtime, written as a PAX `mtime=SECS.NNNNNNNNN` record.
    pub fn mtime_ns(mut self, secs: u64, nanos: u32) -> Self {
        self.mtime = secs;
        self.mtime_nanos = Some(nanos);
        self
    }
    /// The header's user name field, which readers must ignore in favour of the uid.
    pub fn uname(mut self, name: &str) -> Self {
        self.uname = name.as_bytes().to_vec();
        self
    }
    /// An extended attribute, written as a PAX `SCHILY.xattr.NAME` record.
    pub fn xattr(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.xattrs
            .push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }
    /// Any extra PAX record, written after the builder's own ones.
    pub fn pax(mut self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax
            .push((key.as_bytes().to_vec(), value.as_ref().to_vec()));
        self
    }
    /// The exact bytes of the name, without the trailing `/` that `dir` adds.
    pub fn raw_path(mut self, path: impl AsRef<[u8]>) -> Self {
        self.path = path.as_ref().to_vec();
        self
    }
    pub fn long_names(mut self, how: LongNames) -> Self {
        self.long_names = how;
        self
    }
    pub fn big_ids(mut self, how: BigIds) -> Self {
        self.big_ids = how;
        self
    }

    fn typeflag(&self) -> u8 {
        match &self.kind {
            Kind::File(_) => b'0',
            Kind::Hardlink(_) => b'1',
            Kind::Symlink(_) => b'2',
            Kind::CharDev(..) => b'3',
            Kind::BlockDev(..) => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
            Kind::Other(t, _) => *t,
            Kind::GnuSparse(..) => b'S',
        }
    }

    fn data(&self) -> Vec<u8> {
        match &self.kind {
            Kind::File(d) | Kind::Other(_, d) => d.clone(),
            Kind::GnuSparse(_, chunks) => chunks.iter().flat_map(|(_, d)| d.clone()).collect(),
            _ => Vec::new(),
        }
    }

    fn link(&self) -> &[u8] {
        match &self.kind {
            Kind::Symlink(t) | Kind::Hardlink(t) => t,
            _ => b"",
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        let gnu = self.long_names == LongNames::Gnu;
        let mut pax = Vec::new();
        let mut name_field = self.path.clone();
        let mut prefix_field = Vec::new();
        if self.path.len() > 100 {
            match self.long_names {
                LongNames::Pax => pax.extend(pax_record(b"path", &self.path)),
                LongNames::Gnu => {
                    let mut name = self.path.clone();
                    name.push(0);
                    write_member(out, b"././@LongLink", b'L', &name, true);
                }
                LongNames::UstarPrefix => {
                    let split = self.path[..self.path.len().min(156)]
                        .iter()
                        .rposition(|&b| b == b'/')
                        .filter(|&i| self.path.len() - i - 1 <= 100)
                        .expect("path cannot be split into ustar prefix and name");
                    prefix_field = self.path[..split].to_vec();
                    name_field = self.path[split + 1..].to_vec();
                }
            }
            if self.long_names != LongNames::UstarPrefix {
                // A truncated name in the header makes a reader that ignores the long
                // name visibly wrong instead of accidentally right.
                name_field.truncate(100);
            }
        }
        let mut link_field = self.link().to_vec();
        if link_field.len() > 100 {
            if gnu {
                let mut name = link_field.clone();
                name.push(0);
                write_member(out, b"././@LongLink", b'K', &name, true);
            } else {
                pax.extend(pax_record(b"linkpath", &link_field));
            }
            link_field.truncate(100);
        }
        let mut uid_field = Some(self.uid);
        let mut gid_field = Some(self.gid);
        for (key, value, field) in [
            (&b"uid"[..], self.uid, &mut uid_field),
            (&b"gid"[..], self.gid, &mut gid_field),
        ] {
            if value > 0o7777777 && self.big_ids == BigIds::Pax {
                pax.extend(pax_record(key, value.to_string().as_bytes()));
                *field = None;
            }
        }
        if let Some(nanos) = self.mtime_nanos {
            pax.extend(pax_record(
                b"mtime",
                format!("{}.{:09}", self.mtime, nanos).as_bytes(),
            ));
        }
        for (name, value) in &self.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(name);
            pax.extend(pax_record(&key, value));
        }
        for (key, value) in &self.pax {
            pax.extend(pax_record(key, value));
        }
        if !pax.is_empty() {
            let mut pax_name = b"PaxHeaders.0/".to_vec();
            pax_name.extend_from_slice(&self.path[self.path.len().saturating_sub(80)..]);
            write_member(out, &pax_name, b'x', &pax, gnu);
        }

        let data = self.data();
        let mut h = [0u8; 512];
        put_bytes(&mut h[0..100], &name_field);
        put_octal(&mut h[100..108], u64::from(self.mode));
        put_number(&mut h[108..116], uid_field.unwrap_or(0));
        put_number(&mut h[116..124], gid_field.unwrap_or(0));
        put_number(&mut h[124..136], data.len() as u64);
        put_number(&mut h[136..148], self.mtime);
        h[156] = self.typeflag();
        put_bytes(&mut h[157..257], &link_field);
        if gnu {
            h[257..265].copy_from_slice(b"ustar  \0");
        } else {
            h[257..265].copy_from_slice(b"ustar\x0000");
        }
        put_bytes(&mut h[265..297], &self.uname);
        if let Kind::CharDev(major, minor) | Kind::BlockDev(major, minor) = self.kind {
            put_octal(&mut h[329..337], u64::from(major));
            put_octal(&mut h[337..345], u64::from(minor));
        }
        if let Kind::GnuSparse(real_size, chunks) = &self.kind {
            for (i, (offset, data)) in chunks.iter().enumerate() {
                let at = 386 + 24 * i;
                put_octal(&mut h[at..at + 12], *offset);
                put_octal(&mut h[at + 12..at + 24], data.len() as u64);
            }
            put_octal(&mut h[483..495], *real_size);
        } else {
            put_bytes(&mut h[345..500], &prefix_field);
        }
        finish_header(&mut h);
        out.extend_from_slice(&h);
        push_padded(out, &data);
    }
}

fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    // The length prefix counts itself, so find the width that is self-consistent.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut rec = format!("{len} ").into_bytes();
    rec.extend_from_slice(key);
    rec.push(b'=');
    rec.extend_from_slice(value);
    rec.push(b'\n');
    rec
}

fn write_member(out: &mut Vec<u8>, name: &[u8], typeflag: u8, data: &[u8], gnu: bool) {
    let mut h = [0u8; 512];
    put_bytes(&mut h[0..100], &name[..name.len().min(100)]);
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_number(&mut h[124..136], data.len() as u64);
    put_octal(&mut h[136..148], 0);
    h[156] = typeflag;
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..265].copy_from_slice(b"ustar\x0000");
    }
    finish_header(&mut h);
    out.extend_from_slice(&h);
    push_padded(out, data);
}

fn put_bytes(field: &mut [u8], value: &[u8]) {
    field[..value.len()].copy_from_slice(value);
}

fn put_octal(field: &mut [u8], value: u64) {
    let s = format!("{:0width$o}", value, width = field.len() - 1);
    assert!(s.len() < field.len(), "{value} does not fit in octal field");
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

/// Octal when it fits, else the GNU base-256 encoding (high bit set, big-endian).
fn put_number(field: &mut [u8], value: u64) {
    if value < 1 << (3 * (field.len() - 1)) {
        put_octal(field, value);
    } else {
        field.fill(0);
        let bytes = value.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
        field[0] |= 0x80;
    }
}

fn finish_header(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

fn push_padded(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// The bytes of a tar holding `entries`, with the two end-of-archive blocks unless `omit_eof`.
pub fn tar_of(entries: &[Entry], omit_eof: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.write_to(&mut out);
    }
    if !omit_eof {
        out.resize(out.len() + 1024, 0);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Layers

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compression {
    None,
    Gzip,
    /// Several concatenated gzip members, as pigz and `cat a.gz b.gz` produce.
    GzipMembers(usize),
    Zstd,
    /// zstd in frames of this many tar bytes each, as zstd:chunked writes.
    ZstdFrames(usize),
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => MT_LAYER_TAR,
            Compression::Gzip | Compression::GzipMembers(_) => MT_LAYER_GZIP,
            Compression::Zstd | Compression::ZstdFrames(_) => MT_LAYER_ZSTD,
        }
    }

    fn apply(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => gzip(tar),
            Compression::GzipMembers(n) => {
                // Cut at odd offsets so members do not line up with tar blocks.
                let step = (tar.len() / n.max(1)).max(1) | 1;
                tar.chunks(step).flat_map(gzip).collect()
            }
            Compression::Zstd => zstd::encode_all(tar, 3).expect("zstd"),
            Compression::ZstdFrames(n) => tar
                .chunks(n.max(1))
                .flat_map(|c| zstd::encode_all(c, 3).expect("zstd"))
                .collect(),
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// A layer: its entries plus how its blob is stored and described.
#[derive(Clone, Debug)]
pub struct Layer {
    entries: Vec<Entry>,
    /// A tar written by another program, stored as is instead of `entries`.
    raw: Option<Vec<u8>>,
    compression: Option<Compression>,
    omit_eof: bool,
    media_type: Option<String>,
    stored_instead: Option<Box<Layer>>,
    truncate_by: usize,
}

pub fn layer(entries: impl IntoIterator<Item = Entry>) -> Layer {
    Layer {
        entries: entries.into_iter().collect(),
        raw: None,
        compression: None,
        omit_eof: false,
        media_type: None,
        stored_instead: None,
        truncate_by: 0,
    }
}

/// A layer whose tar is `tar`, byte for byte (a real writer's output); compression and the
/// other [`Layer`] options still apply.
pub fn raw_layer(tar: impl Into<Vec<u8>>) -> Layer {
    Layer {
        raw: Some(tar.into()),
        ..layer([])
    }
}

/// A layer blob as written into an image.
pub struct Blob {
    /// What the image stores.
    pub bytes: Vec<u8>,
    pub media_type: String,
    /// `sha256:` digest of `bytes` (unless the layer was tampered with).
    pub digest: String,
    /// `sha256:` digest of the uncompressed tar the layer claims to be.
    pub diff_id: String,
}

impl Layer {
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = Some(c);
        self
    }
    /// Leave off the two zero blocks that end a tar (some tools do).
    pub fn omit_eof(mut self) -> Self {
        self.omit_eof = true;
        self
    }
    /// Describe the blob with this media type instead of the one its compression implies.
    pub fn media_type(mut self, mt: &str) -> Self {
        self.media_type = Some(mt.to_string());
        self
    }
    /// Describe this layer in manifest and config, but store `other`'s bytes: the digest
    /// (and diff_id) no longer match the blob.
    pub fn stored_as(mut self, other: Layer) -> Self {
        self.stored_instead = Some(Box::new(other));
        self
    }
    /// Cut `n` bytes off the end of the stored blob; the manifest digest and size describe
    /// the cut blob, so only decompressing or parsing it can notice.
    pub fn truncate_blob(mut self, n: usize) -> Self {
        self.truncate_by = n;
        self
    }

    /// The uncompressed tar of this layer.
    pub fn tar(&self) -> Vec<u8> {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        tar_of(&self.entries, self.omit_eof)
    }

    /// The blob, compressed as asked or with `default` when the layer does not say.
    pub fn blob(&self, default: Compression) -> Blob {
        let compression = self.compression.unwrap_or(default);
        let tar = self.tar();
        let mut bytes = compression.apply(&tar);
        let mut digest = digest_of(&bytes);
        if let Some(other) = &self.stored_instead {
            bytes = compression.apply(&other.tar());
        }
        if self.truncate_by > 0 {
            bytes.truncate(bytes.len() - self.truncate_by);
            digest = digest_of(&bytes);
        }
        Blob {
            bytes,
            media_type: self
                .media_type
                .clone()
                .unwrap_or_else(|| compression.media_type().to_string()),
            digest,
            diff_id: digest_of(&tar),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Configs and image writers

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `sha256:HEX` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The host platform's architecture in OCI spelling, which flatfs picks by default.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// A config with every field flatfs must carry over and one history entry per layer
/// (plus an `ENV` step with `empty_layer`, as docker history has).
pub fn default_config(layers: &[Layer]) -> Value {
    let mut history: Vec<Value> = (1..=layers.len())
        .map(|i| {
            json!({
                "created": "2024-01-02T03:04:05Z",
                "created_by": format!("/bin/sh -c build-step-{i}"),
                "comment": format!("layer {i}"),
            })
        })
        .collect();
    history.insert(
        0,
        json!({
            "created": "2024-01-02T03:04:00Z",
            "created_by": "/bin/sh -c #(nop)  ENV GREETING=hello",
            "empty_layer": true,
        }),
    );
    json!({
        "architecture": host_arch(),
        "os": "linux",
        "created": "2024-01-02T03:04:05Z",
        "author": "flatfs tests",
        "config": {
            "User": "1000:1000",
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["cat /message.txt"],
            "WorkingDir": "/srv",
            "Labels": {"org.example.test": "flatfs", "empty": ""},
            "ExposedPorts": {"8080/tcp": {}},
            "Volumes": {"/data": {}},
            "StopSignal": "SIGTERM",
        },
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": history,
    })
}

/// What an image writer produced, for tests that check digests in errors and outputs.
#[derive(Clone, Debug)]
pub struct Written {
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub layer_digests: Vec<String>,
    pub diff_ids: Vec<String>,
    /// Where each layer lies in the image (`<id>/layer.tar`, `blobs/sha256/<hex>`).
    pub layer_paths: Vec<String>,
}

fn config_with_diff_ids(config: &Value, diff_ids: &[String]) -> Vec<u8> {
    let mut config = config.clone();
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    serde_json::to_vec(&config).expect("config json")
}

/// Files of an archive or layout, in the order they are written.
#[derive(Default)]
pub struct Files(Vec<(String, Vec<u8>)>);

impl Files {
    fn add(&mut self, path: impl Into<String>, data: Vec<u8>) {
        let path = path.into();
        if !self.0.iter().any(|(p, _)| *p == path) {
            self.0.push((path, data));
        }
    }

    /// A tar with a directory entry before the first file of each directory, like
    /// `docker save` and `skopeo copy oci-archive:` write.
    pub fn to_tar(&self) -> Vec<u8> {
        let mut entries = Vec::new();
        let mut dirs: Vec<&str> = Vec::new();
        for (path, data) in &self.0 {
            let mut at = 0;
            while let Some(i) = path[at..].find('/') {
                let d = &path[..at + i];
                if !dirs.contains(&d) {
                    dirs.push(d);
                    entries.push(dir(d));
                }
                at += i + 1;
            }
            entries.push(file(path, data));
        }
        tar_of(&entries, false)
    }

    pub fn write_dir(&self, root: &Path) {
        for (path, data) in &self.0 {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, data).expect("write");
        }
    }
}

fn docker_files(layers: &[Layer], config: &Value) -> (Files, Written) {
    let blobs: Vec<Blob> = layers.iter().map(|l| l.blob(Compression::None)).collect();
    let diff_ids: Vec<String> = blobs.iter().map(|b| b.diff_id.clone()).collect();
    let config = config_with_diff_ids(config, &diff_ids);
    let mut files = Files::default();
    let mut layer_paths = Vec::new();
    let mut parent = String::new();
    for (i, blob) in blobs.iter().enumerate() {
        // The classic layout names each layer directory by a v1 id unrelated to digests.
        let id = sha256_hex(format!("{parent}{i}{}", blob.diff_id).as_bytes());
        files.add(format!("{id}/VERSION"), b"1.0".to_vec());
        let v1 = json!({"id": id, "parent": parent, "os": "linux"});
        files.add(format!("{id}/json"), serde_json::to_vec(&v1).expect("json"));
        files.add(format!("{id}/layer.tar"), blob.bytes.clone());
        layer_paths.push(format!("{id}/layer.tar"));
        parent = id;
    }
    let config_name = format!("{}.json", sha256_hex(&config));
    files.add(config_name.clone(), config.clone());
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": [DOCKER_TAG],
        "Layers": layer_paths,
    }]);
    files.add(
        "manifest.json",
        serde_json::to_vec(&manifest).expect("json"),
    );
    let (repo, tag) = DOCKER_TAG.rsplit_once(':').expect("tag");
    files.add(
        "repositories",
        serde_json::to_vec(&json!({ repo: { tag: parent } })).expect("json"),
    );
    let written = Written {
        manifest_digest: String::new(),
        config,
        layer_digests: blobs.iter().map(|b| b.digest.clone()).collect(),
        diff_ids,
        layer_paths,
    };
    (files, written)
}

/// A classic `docker save` archive: `manifest.json`, `<hex>.json`, `<id>/layer.tar`.
pub fn write_docker_archive(layers: &[Layer], config: &Value, path: &Path) -> Written {
    let (files, written) = docker_files(layers, config);
    std::fs::write(path, files.to_tar()).expect("write docker archive");
    written
}

/// The bytes of a classic docker archive, for feeding flatfs on stdin.
pub fn docker_archive_bytes(layers: &[Layer], config: &Value) -> Vec<u8> {
    docker_files(layers, config).0.to_tar()
}

/// A Docker >= 25 `docker save` archive: OCI blobs under `blobs/sha256/`, `index.json`,
/// `oci-layout`, and a `manifest.json` whose paths point into `blobs/`.
pub fn write_docker25_archive(layers: &[Layer], config: &Value, path: &Path) -> Written {
    let mut oci = OciLayout::new();
    let (desc, written) = oci.add_image_with(layers, config, Compression::None, false);
    let (repo_tag, tag) = (DOCKER_TAG, DOCKER_TAG.rsplit_once(':').expect("tag").1);
    oci.add_index_entry(with_annotations(
        desc,
        &[
            ("io.containerd.image.name", repo_tag),
            ("org.opencontainers.image.ref.name", tag),
        ],
    ));
    let manifest = json!([{
        "Config": format!("blobs/sha256/{}", sha256_hex(&written.config)),
        "RepoTags": [DOCKER_TAG],
        "Layers": written.layer_paths,
    }]);
    let mut files = oci.files();
    files.add(
        "manifest.json",
        serde_json::to_vec(&manifest).expect("json"),
    );
    std::fs::write(path, files.to_tar()).expect("write docker25 archive");
    written
}

/// An OCI image layout under construction; index entries are added explicitly so tests
/// can build multi-image, multi-platform and nested-index layouts.
#[derive(Default)]
pub struct OciLayout {
    blobs: Files,
    index: Vec<Value>,
}

impl OciLayout {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a blob; returns its descriptor (`mediaType`, `digest`, `size`).
    pub fn add_blob(&mut self, media_type: &str, bytes: Vec<u8>) -> Value {
        let digest = digest_of(&bytes);
        let desc = json!({"mediaType": media_type, "digest": digest, "size": bytes.len()});
        self.blobs.add(
            format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
            bytes,
        );
        desc
    }

    /// Stores layers, config and manifest (layers gzip unless they say otherwise);
    /// returns the manifest descriptor, not yet referenced by `index.json`.
    pub fn add_image(&mut self, layers: &[Layer], config: &Value) -> (Value, Written) {
        self.add_image_with(layers, config, Compression::Gzip, false)
    }

    /// Like [`OciLayout::add_image`], with Docker schema 2 media types for manifest,
    /// config and layers, as `nerdctl save` / `ctr export` leave them in an OCI layout.
    pub fn add_docker_image(&mut self, layers: &[Layer], config: &Value) -> (Value, Written) {
        self.add_image_with(layers, config, Compression::Gzip, true)
    }

    fn add_image_with(
        &mut self,
        layers: &[Layer],
        config: &Value,
        default: Compression,
        docker_types: bool,
    ) -> (Value, Written) {
        let mut blobs: Vec<Blob> = layers.iter().map(|l| l.blob(default)).collect();
        let (manifest_type, config_type) = if docker_types {
            (MT_DOCKER_MANIFEST, MT_DOCKER_CONFIG)
        } else {
            (MT_OCI_MANIFEST, MT_OCI_CONFIG)
        };
        if docker_types {
            for (blob, l) in blobs.iter_mut().zip(layers) {
                if l.media_type.is_none() {
                    match blob.media_type.as_str() {
                        MT_LAYER_GZIP => blob.media_type = MT_DOCKER_LAYER_GZIP.to_string(),
                        MT_LAYER_TAR => blob.media_type = MT_DOCKER_LAYER_TAR.to_string(),
                        _ => {}
                    }
                }
            }
        }
        let diff_ids: Vec<String> = blobs.iter().map(|b| b.diff_id.clone()).collect();
        let config = config_with_diff_ids(config, &diff_ids);
        let config_desc = self.add_blob(config_type, config.clone());
        let mut layer_descs = Vec::new();
        for blob in &blobs {
            // Stored under the digest the manifest claims, which for a tampered layer is
            // not the digest of the bytes.
            self.blobs.add(
                format!("blobs/sha256/{}", blob.digest.trim_start_matches("sha256:")),
                blob.bytes.clone(),
            );
            layer_descs.push(json!({
                "mediaType": blob.media_type,
                "digest": blob.digest,
                "size": blob.bytes.len(),
            }));
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config_desc,
            "layers": layer_descs,
        });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        let desc = self.add_blob(manifest_type, bytes);
        let written = Written {
            manifest_digest: desc["digest"].as_str().expect("digest").to_string(),
            config,
            layer_digests: blobs.iter().map(|b| b.digest.clone()).collect(),
            diff_ids,
            layer_paths: blobs
                .iter()
                .map(|b| format!("blobs/sha256/{}", b.digest.trim_start_matches("sha256:")))
                .collect(),
        };
        (desc, written)
    }

    /// Stores an image index over `manifests`; returns its descriptor.
    pub fn add_index(&mut self, manifests: Vec<Value>) -> Value {
        let index = json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests});
        self.add_blob(MT_OCI_INDEX, serde_json::to_vec(&index).expect("json"))
    }

    pub fn add_index_entry(&mut self, desc: Value) {
        self.index.push(desc);
    }

    pub fn files(&self) -> Files {
        let mut files = Files::default();
        for (p, b) in &self.blobs.0 {
            files.add(p.clone(), b.clone());
        }
        let index = json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": self.index});
        files.add("index.json", serde_json::to_vec(&index).expect("json"));
        files.add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
        files
    }

    pub fn write_dir(&self, dir: &Path) {
        self.files().write_dir(dir);
    }

    pub fn write_archive(&self, path: &Path) {
        std::fs::write(path, self.files().to_tar()).expect("write oci archive");
    }
}

/// `desc` with `annotations` added.
pub fn with_annotations(mut desc: Value, annotations: &[(&str, &str)]) -> Value {
    for (k, v) in annotations {
        desc["annotations"][*k] = json!(v);
    }
    desc
}

/// `desc` with a `platform` added (`variant` only when given).
pub fn with_platform(mut desc: Value, os: &str, arch: &str, variant: Option<&str>) -> Value {
    desc["platform"] = json!({"os": os, "architecture": arch});
    if let Some(v) = variant {
        desc["platform"]["variant"] = json!(v);
    }
    desc
}

/// An OCI layout directory holding one image, tagged `reference` when given.
pub fn write_oci_layout(
    layers: &[Layer],
    config: &Value,
    dir: &Path,
    reference: Option<&str>,
) -> Written {
    let mut oci = OciLayout::new();
    let (desc, written) = oci.add_image(layers, config);
    let desc = match reference {
        Some(r) => with_annotations(desc, &[("org.opencontainers.image.ref.name", r)]),
        None => desc,
    };
    oci.add_index_entry(desc);
    oci.write_dir(dir);
    written
}

/// An OCI archive (a tar of an OCI layout) holding one image tagged [`OCI_REF`].
pub fn write_oci_archive(layers: &[Layer], config: &Value, path: &Path) -> Written {
    let mut oci = OciLayout::new();
    let (desc, written) = oci.add_image(layers, config);
    oci.add_index_entry(with_annotations(
        desc,
        &[("org.opencontainers.image.ref.name", OCI_REF)],
    ));
    oci.write_archive(path);
    written
}

// ---------------------------------------------------------------------------------------
// Running flatfs

/// A `flatfs` command with an environment that cannot change its output.
pub fn flatfs() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatfs"));
    cmd.env_remove("SOURCE_DATE_EPOCH");
    // Never the user's own cache: a test run must neither depend on it nor fill it.
    if std::env::var_os("FLATFS_CACHE_DIR").is_none() {
        cmd.env(
            "FLATFS_CACHE_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-cache"),
        );
    }
    cmd
}

pub fn run_flatfs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    flatfs().args(args).output().expect("run flatfs")
}

/// Runs flatfs with `stdin` piped in; writes from a thread so a large stdout cannot
/// deadlock against a large stdin.
pub fn run_flatfs_stdin<I, S>(args: I, stdin: Vec<u8>) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = flatfs()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flatfs");
    let mut pipe = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        // flatfs may fail and close stdin early; the exit status tells the test.
        let _ = pipe.write_all(&stdin);
    });
    let out = child.wait_with_output().expect("wait flatfs");
    writer.join().expect("stdin writer");
    out
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "flatfs failed with {}\nstderr:\n{}",
        out.status,
        stderr_of(out)
    );
}

/// Asserts the error contract (exit 1, a `flatfs: ` message, no panic); returns stderr.
#[track_caller]
pub fn assert_error(out: &Output) -> String {
    let stderr = stderr_of(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit status 1, got {}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.starts_with("flatfs: "),
        "stderr must start with `flatfs: `, got:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "flatfs panicked:\n{stderr}");
    stderr
}

/// Asserts `dir` holds nothing: a failed export leaves neither OUT nor a temp file.
#[track_caller]
pub fn assert_empty_dir(dir: &Path) {
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read out dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    assert!(left.is_empty(), "failed export left files behind: {left:?}");
}

/// Exports `image` with `--format rootfs` plus `extra` args; returns the tar bytes.
pub fn export_rootfs(image: impl AsRef<OsStr>, extra: &[&str]) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("rootfs.tar");
    let mut args: Vec<&OsStr> = vec![
        "export".as_ref(),
        image.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--format".as_ref(),
        "rootfs".as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let res = run_flatfs(&args);
    assert_success(&res);
    std::fs::read(&out).expect("read rootfs output")
}

/// The canonical listing of `image` exported with `--format rootfs`.
pub fn rootfs_listing(image: impl AsRef<OsStr>) -> String {
    tar_listing(&export_rootfs(image, &[]))
}

/// Writes `layers` as an OCI layout with the default config and lists its rootfs.
pub fn listing_of(layers: Vec<Layer>) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("image");
    write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    rootfs_listing(&dir)
}

/// Writes `layers` as an OCI layout, exports it, asserts the export failed cleanly and
/// left nothing behind; returns stderr and what was written (for layer digests).
pub fn export_error(layers: Vec<Layer>) -> (String, Written) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("image");
    let written = write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let res = run_flatfs([
        "export".as_ref(),
        dir.as_os_str(),
        "-o".as_ref(),
        out_dir.join("rootfs.tar").as_os_str(),
        "--format".as_ref(),
        "rootfs".as_ref(),
    ]);
    let stderr = assert_error(&res);
    assert_empty_dir(&out_dir);
    (stderr, written)
}

/// Asserts `stderr` names layer `index` (0-based) of `written`: by its digest or diff_id
/// (at least the first 12 hex digits), by its path in the image, or as `layer N`
/// counting from 0 or 1.
#[track_caller]
pub fn assert_names_layer(stderr: &str, written: &Written, index: usize) {
    let hex = |d: &str| d.trim_start_matches("sha256:")[..12].to_string();
    let path = &written.layer_paths[index];
    let id = path.trim_start_matches("blobs/sha256/");
    let named = stderr.contains(&hex(&written.layer_digests[index]))
        || stderr.contains(&hex(&written.diff_ids[index]))
        || stderr.contains(&id[..12])
        || [index, index + 1].iter().any(|n| {
            stderr.contains(&format!("layer {n}")) || stderr.contains(&format!("layer #{n}"))
        });
    assert!(
        named,
        "error does not name layer {index} ({path}, {}):\n{stderr}",
        written.layer_digests[index]
    );
}

// ---------------------------------------------------------------------------------------
// Reading tars back

/// Undoes gzip (all members) or zstd, judged by magic bytes; plain bytes pass through.
pub fn decompress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("gunzip");
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        out = zstd::decode_all(data).expect("unzstd");
    } else {
        out = data.to_vec();
    }
    out
}

/// Regular files of a tar (docker archive, OCI archive) by normalised name.
pub fn tar_files(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
    raw_entries(tar)
        .into_iter()
        .filter(|e| matches!(e.typeflag, b'0' | b'\0' | b'7'))
        .map(|e| {
            let name = String::from_utf8(normalise(&e.name)).expect("utf-8 name");
            (name, e.data)
        })
        .collect()
}

/// One entry of a tar as stored, with the extension records (PAX, GNU long name/link)
/// that preceded it folded in. Read by hand rather than with the tar crate, whose PAX
/// parser splits records at newlines and so mangles binary xattr values.
#[derive(Clone, Debug)]
pub struct RawEntry {
    /// The effective name: PAX `path`, else GNU long name, else ustar prefix + name.
    pub name: Vec<u8>,
    pub typeflag: u8,
    /// The effective link target: PAX `linkpath`, else GNU long link, else the header's.
    pub link: Vec<u8>,
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    pub gnu_long_name: bool,
    pub gnu_long_link: bool,
    /// The mode field as stored, S_IFMT bits included if a writer put them there.
    pub mode: u64,
    /// Effective ids and mtime: the PAX record if there is one, else the header field.
    pub uid: u64,
    pub gid: u64,
    pub mtime: String,
    pub dev: (u64, u64),
    pub data: Vec<u8>,
}

impl RawEntry {
    pub fn pax_value(&self, key: &str) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

fn parse_pax(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ').expect("pax length");
        let len: usize = std::str::from_utf8(&rest[..sp])
            .expect("pax length")
            .parse()
            .expect("pax length");
        assert_eq!(rest[len - 1], b'\n', "pax record must end in a newline");
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=').expect("pax =");
        records.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    records
}

fn cstr(field: &[u8]) -> Vec<u8> {
    field[..field.iter().position(|&b| b == 0).unwrap_or(field.len())].to_vec()
}

/// A numeric header field: octal, or GNU base-256 when the high bit is set.
fn number(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        field[1..]
            .iter()
            .fold(u64::from(field[0] & 0x7f), |n, &b| (n << 8) | u64::from(b))
    } else {
        let digits = cstr(field);
        let digits = std::str::from_utf8(&digits).expect("octal field").trim();
        if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, 8).expect("octal field")
        }
    }
}

/// A PAX mtime as `SECS` or `SECS.NNNNNNNNN`, so equal times compare equal as text.
pub fn pax_mtime(v: &[u8]) -> String {
    let v = std::str::from_utf8(v).expect("pax mtime");
    match v.split_once('.') {
        Some((s, frac)) if frac.trim_end_matches('0').is_empty() => s.to_string(),
        Some((s, frac)) => format!("{s}.{frac:0<9}"),
        None => v.to_string(),
    }
}

/// Every entry of `tar` in stored order. Panics on anything malformed (bad checksum,
/// short data, a dangling extension header): the output of flatfs must always parse.
pub fn raw_entries(tar: &[u8]) -> Vec<RawEntry> {
    let mut out = Vec::new();
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut at = 0;
    loop {
        let h = tar
            .get(at..at + 512)
            .expect("tar ends without end-of-archive blocks");
        if h.iter().all(|&b| b == 0) {
            assert!(
                pax.is_empty() && long_name.is_none() && long_link.is_none(),
                "extension header with no entry after it"
            );
            break;
        }
        let stored: u32 = h[148..156]
            .iter()
            .filter(|b| b.is_ascii_digit())
            .fold(0, |n, &b| n * 8 + u32::from(b - b'0'));
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        assert_eq!(stored, sum, "tar header checksum at offset {at}");
        let typeflag = h[156];
        let pax_size = pax
            .iter()
            .rev()
            .find(|(k, _)| k == b"size")
            .map(|(_, v)| std::str::from_utf8(v).expect("size").parse().expect("size"));
        let size = match typeflag {
            b'x' | b'L' | b'K' | b'g' => number(&h[124..136]),
            _ => pax_size.unwrap_or_else(|| number(&h[124..136])),
        } as usize;
        let start = at + 512;
        let data = tar
            .get(start..start + size)
            .expect("tar entry data cut short")
            .to_vec();
        at = start + size.next_multiple_of(512);
        match typeflag {
            b'x' => pax.extend(parse_pax(&data)),
            b'L' => long_name = Some(cstr(&data)),
            b'K' => long_link = Some(cstr(&data)),
            _ => {
                let mut name = cstr(&h[0..100]);
                let prefix = cstr(&h[345..500]);
                if &h[257..263] == b"ustar\0" && !prefix.is_empty() {
                    name = [prefix, b"/".to_vec(), name].concat();
                }
                let gnu_long_name = long_name.is_some();
                let gnu_long_link = long_link.is_some();
                if let Some(n) = long_name.take() {
                    name = n;
                }
                let link = long_link.take().unwrap_or_else(|| cstr(&h[157..257]));
                let pax = std::mem::take(&mut pax);
                let mut e = RawEntry {
                    name,
                    typeflag,
                    link,
                    gnu_long_name,
                    gnu_long_link,
                    mode: number(&h[100..108]),
                    uid: number(&h[108..116]),
                    gid: number(&h[116..124]),
                    mtime: number(&h[136..148]).to_string(),
                    dev: (number(&h[329..337]), number(&h[337..345])),
                    data,
                    pax: Vec::new(),
                };
                for (k, v) in &pax {
                    let n = || std::str::from_utf8(v).expect("pax").parse().expect("pax");
                    match k.as_slice() {
                        b"path" => e.name = v.clone(),
                        b"linkpath" => e.link = v.clone(),
                        b"uid" => e.uid = n(),
                        b"gid" => e.gid = n(),
                        b"mtime" => e.mtime = pax_mtime(v),
                        _ => {}
                    }
                }
                e.pax = pax;
                out.push(e);
            }
        }
    }
    out
}

/// A tar path as the merge sees it: no `./` or `/` prefix, no trailing `/`, root is empty.
pub fn normalise(path: &[u8]) -> Vec<u8> {
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    comps.join(&b'/')
}

/// Sort key of the rootfs order: depth first, children by name bytes, parents first.
fn order_key(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

/// Bytes as listing text: printable ASCII except space and `\` as is, the rest `\xNN`.
pub fn esc(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' && b != b'"' {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s
}

fn unesc(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 4 <= b.len() {
            let hex = std::str::from_utf8(&b[i + 2..i + 4]).expect("escape");
            out.push(u8::from_str_radix(hex, 16).expect("escape"));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The CONTENT column of a regular file: the bytes quoted when short, else their sha256.
pub fn content(data: &[u8]) -> String {
    if data.len() <= 32 {
        format!("\"{}\"", esc(data))
    } else {
        format!("sha256:{}", sha256_hex(data))
    }
}

fn xattr_value(v: &[u8]) -> String {
    if v.iter()
        .all(|b| b.is_ascii_graphic() && !b";=\"\\".contains(b))
    {
        format!("\"{}\"", String::from_utf8_lossy(v))
    } else {
        format!(
            "0x{}",
            v.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        )
    }
}

/// The canonical listing of a tar, one line per entry, sorted in rootfs order:
///
/// `PATH TYPE MODE UID GID SIZE CONTENT XATTRS MTIME LINK`
///
/// - PATH: normalised (no `./`, no trailing `/`), root is `.`, escaped by [`esc`].
/// - TYPE: `f d l c b p`; for a hardlink entry, the type of what it links to.
/// - MODE: the mode field in octal, 4 digits; S_IFMT bits, if written, show up as more.
/// - SIZE: file size or symlink target length, else `-`.
/// - CONTENT: file bytes per [`content`], `->TARGET` for symlinks, `MAJOR,MINOR` for devices.
/// - XATTRS: `-` or `name=value;...` by name, values `"text"` or `0xHEX` (empty: `""`).
/// - MTIME: seconds, or `SECS.NNNNNNNNN` when the entry carries sub-second time.
/// - LINK: `=>TARGET` for a hardlink entry (type '1'), whose other columns are the
///   target's, as extraction gives; `-` otherwise.
pub fn tar_listing(tar: &[u8]) -> String {
    let mut lines: Vec<(Vec<Vec<u8>>, String)> = Vec::new();
    let mut inodes: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    for e in raw_entries(tar) {
        let path = normalise(&e.name);
        let mut xattrs: Vec<(&[u8], &[u8])> = e
            .pax
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(b"SCHILY.xattr.")?, v.as_slice())))
            .collect();
        xattrs.sort();
        let xattrs = if xattrs.is_empty() {
            "-".to_string()
        } else {
            xattrs
                .iter()
                .map(|(n, v)| format!("{}={}", esc(n), xattr_value(v)))
                .collect::<Vec<_>>()
                .join(";")
        };
        let attrs = |t: &str, size: String, content: String| {
            format!(
                "{t} {:04o} {} {} {size} {content} {xattrs} {}",
                e.mode, e.uid, e.gid, e.mtime
            )
        };
        let none = || "-".to_string();
        let (inode, hardlink) = match e.typeflag {
            b'0' | b'\0' | b'7' => (
                attrs("f", e.data.len().to_string(), content(&e.data)),
                none(),
            ),
            b'5' => (attrs("d", none(), none()), none()),
            b'2' => (
                attrs("l", e.link.len().to_string(), format!("->{}", esc(&e.link))),
                none(),
            ),
            b'3' | b'4' => {
                let t = if e.typeflag == b'3' { "c" } else { "b" };
                (attrs(t, none(), format!("{},{}", e.dev.0, e.dev.1)), none())
            }
            b'6' => (attrs("p", none(), none()), none()),
            b'1' => {
                let target = normalise(&e.link);
                let inode = inodes
                    .get(&target)
                    .cloned()
                    .unwrap_or_else(|| "! - - - - !missing-target - -".to_string());
                (inode, format!("=>{}", esc(&target)))
            }
            other => (
                attrs(&format!("?{}", char::from(other)), none(), none()),
                none(),
            ),
        };
        inodes.insert(path.clone(), inode.clone());
        let shown = if path.is_empty() {
            ".".to_string()
        } else {
            esc(&path)
        };
        lines.push((order_key(&path), format!("{shown} {inode} {hardlink}")));
    }
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    lines.into_iter().map(|(_, l)| l + "\n").collect()
}

/// An expected listing written by hand: whitespace runs collapse to one space (so the
/// columns may be aligned), blank lines go, lines sort into rootfs order.
pub fn expected(text: &str) -> String {
    let mut lines: Vec<(Vec<Vec<u8>>, String)> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .map(|l| {
            let path = l.split(' ').next().expect("path column");
            (order_key(&unesc(path)), l)
        })
        .collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    lines.into_iter().map(|(_, l)| l + "\n").collect()
}

/// Asserts a listing equals the expected text (see [`expected`]), printing both sides and
/// the lines that differ.
#[track_caller]
pub fn assert_listing(actual: &str, expected_text: &str) {
    let want = expected(expected_text);
    if actual != want {
        let a: Vec<&str> = actual.lines().collect();
        let w: Vec<&str> = want.lines().collect();
        let mut diff = String::new();
        for l in &w {
            if !a.contains(l) {
                let _ = writeln!(diff, "- {l}");
            }
        }
        for l in &a {
            if !w.contains(l) {
                let _ = writeln!(diff, "+ {l}");
            }
        }
        panic!(
            "rootfs listing differs\n--- expected\n{want}--- actual\n{actual}--- lines only expected (-) / only actual (+)\n{diff}"
        );
    }
}

/// Deterministic bytes that do not compress (xorshift: no extra dependency), so layers have
/// real sizes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// True if FUSE tests can run; otherwise says why (a failure under `FLATFS_REQUIRE_FUSE=1`).
pub fn fuse_available(test: &str) -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    let msg = format!(
        "{test}: SKIPPED: /dev/fuse is missing (load the fuse module; a container needs \
         --device /dev/fuse)"
    );
    if std::env::var("FLATFS_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{msg}, and FLATFS_REQUIRE_FUSE=1 says FUSE tests must run");
    }
    eprintln!("{msg}");
    false
}

/// `../shared/tools` beside the checkout (or `$FLATFS_SHARED_DIR/tools`): make-images.sh and
/// the listing scripts the oracle tests compare with. Whether it exists is the caller's check.
pub fn shared_tools_dir() -> PathBuf {
    std::env::var_os("FLATFS_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
        .join("tools")
}

/// True when `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}
