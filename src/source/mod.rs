//! Image sources: find the manifest, the config and the layer blobs of a docker-archive, an OCI
//! layout directory or an OCI archive, without extracting anything.

mod docker_archive;
mod oci;
mod registry;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blob::{Blob, Compression};
use crate::error::{Error, Result};

/// Largest JSON document (index, manifest, config) read into memory.
pub const MAX_JSON: u64 = 64 * 1024 * 1024;

/// Which family of tools produced the image; decides the default output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `docker save` output.
    Docker,
    /// OCI layout or archive.
    Oci,
}

/// One layer of an image: where its blob is and what the image says about it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// 1-based position, bottom layer first.
    pub number: usize,
    /// The compressed (or plain) layer blob.
    pub blob: Blob,
    /// Compression, sniffed from the blob.
    pub compression: Compression,
    /// The digest the manifest records for the blob, checked while reading.
    pub digest: Option<String>,
    /// The config's diff_id for the uncompressed tar, checked while reading.
    pub diff_id: Option<String>,
    /// The manifest's descriptor of the blob as JSON (OCI sources; docker archives have none):
    /// `export --keep` writes it back unchanged, annotations and all.
    pub descriptor: Option<serde_json::Value>,
}

impl Layer {
    /// "N (sha256:abcdef012345)" for messages.
    pub fn label(&self) -> String {
        match self.digest.as_ref().or(self.diff_id.as_ref()) {
            Some(d) => format!("{} ({})", self.number, short_digest(d)),
            None => format!("{} ({})", self.number, self.blob.name()),
        }
    }
}

/// `sha256:` and the first 12 hex digits.
pub fn short_digest(d: &str) -> &str {
    let end = d.find(':').map_or(12, |i| i + 13).min(d.len());
    &d[..end]
}

/// An image opened for reading: config, layers and where they came from.
#[derive(Debug)]
pub struct Image {
    /// The name the user gave, for messages and the fsname.
    pub name: String,
    /// docker or OCI.
    pub family: Family,
    /// True when read from an archive (tar file or stdin), false for a layout directory.
    pub archive: bool,
    /// Digest of the manifest the layers come from; for docker archives, which have no
    /// manifest blob, the image ID (config digest).
    pub manifest_digest: String,
    /// Digest of the config blob.
    pub config_digest: String,
    /// The image config, kept as JSON so that no field is lost on export.
    pub config: serde_json::Value,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Tags the image carried (`RepoTags`, or OCI ref names / `io.containerd.image.name`).
    pub tags: Vec<String>,
    /// True when an index entry with a platform selected the manifest: that platform is the
    /// image's, whatever the config says (containerd and skopeo select by the index too).
    pub platform_from_index: bool,
    // Keeps a spooled stdin alive as long as the blobs that point into it.
    _spool: Option<tempfile::TempPath>,
}

/// A wanted platform, `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub arch: String,
    /// e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the running host, in OCI's names.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            arch: arch.to_string(),
            variant: None,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.into(),
                arch: arch.into(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: os.into(),
                    arch: arch.into(),
                    variant: Some(variant.into()),
                })
            }
            _ => Err(format!("{s:?} is not OS/ARCH[/VARIANT], e.g. linux/amd64")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The config's `os`, `architecture` and `variant` (empty when missing).
fn config_platform(config: &serde_json::Value) -> (&str, &str, &str) {
    let field = |k: &str| config.get(k).and_then(|v| v.as_str()).unwrap_or("");
    (field("os"), field("architecture"), field("variant"))
}

/// The config's platform as `os/arch[/variant]`.
fn platform_text(config: &serde_json::Value) -> String {
    match config_platform(config) {
        (os, arch, "") => format!("{os}/{arch}"),
        (os, arch, variant) => format!("{os}/{arch}/{variant}"),
    }
}

/// Media types of Docker schema-1 manifests, unsigned and signed.
/// See: <https://distribution.github.io/distribution/spec/deprecated-schema-v1/>
pub(super) const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// Whether a document is a schema-1 manifest, whatever its descriptor said: checked before
/// parsing, so that the error names what it is rather than a field a schema-2 parser missed.
pub(super) fn is_schema1(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        schema_version: Option<serde_json::Value>,
        media_type: Option<String>,
    }
    serde_json::from_slice::<Head>(bytes).is_ok_and(|h| {
        h.schema_version.and_then(|v| v.as_u64()) == Some(1)
            || h.media_type.is_some_and(|m| SCHEMA1.contains(&m.as_str()))
    })
}

/// Where the image's files live: a directory, or members of one tar file read in place.
enum Store {
    Dir(PathBuf),
    Tar {
        file: Arc<File>,
        members: HashMap<Vec<u8>, (u64, u64)>,
    },
}

impl Store {
    /// Indexes the members of a tar archive by reading headers only.
    fn open_tar(path: &Path, display: &str) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(display, e))?;
        let mut members = HashMap::new();
        let len = file.metadata().map_err(|e| Error::io(display, e))?.len();
        let mut archive = tar::Archive::new(&file);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| Error::io(display, e))?;
        let mut last: Option<Vec<u8>> = None;
        let mut links: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for entry in entries {
            let entry = match (entry, &last) {
                (Ok(entry), _) => entry,
                // Not even one header: not a tar (often a compressed `docker save`).
                (Err(_), None) => return Err(not_a_tar(&file, display)),
                // Tar archives are whole 512-byte blocks: one that is not was cut off.
                (Err(_), Some(name)) if len % 512 != 0 => {
                    return Err(Error::invalid(
                        display,
                        format!(
                            "truncated: the file ({len} bytes) ends inside the header after \
                             member {:?}",
                            String::from_utf8_lossy(name)
                        ),
                    ));
                }
                (Err(e), Some(name)) => {
                    return Err(Error::invalid(
                        display,
                        format!(
                            "corrupt archive after member {:?}: {}",
                            String::from_utf8_lossy(name),
                            printable(&e.to_string())
                        ),
                    ));
                }
            };
            last = Some(entry.path_bytes().into_owned());
            let kind = entry.header().entry_type();
            if kind.is_symlink() {
                if let Some(target) = entry.link_name_bytes() {
                    links.insert(normalise_member(&entry.path_bytes()), target.into_owned());
                }
                continue;
            }
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                continue;
            }
            let name = normalise_member(&entry.path_bytes());
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        // Classic `docker save` stores a repeated layer once and links the other
        // `<id>/layer.tar` to it (`../<otherid>/layer.tar`): such a link reads as its target.
        for name in links.keys() {
            if !members.contains_key(name)
                && let Some(range) = resolve_link(name, &links, &members)
            {
                members.insert(name.clone(), range);
            }
        }
        // A cut-off archive (an interrupted copy or `docker save`) lists its last member with
        // more bytes than the file has left: say that, rather than that it is no image at all.
        if let Some((name, _)) = members.iter().find(|&(_, &(at, size))| at + size > len) {
            return Err(Error::invalid(
                display,
                format!(
                    "truncated: member {:?} runs past the end of the file ({len} bytes)",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        if members.is_empty() {
            return Err(Error::UnknownFormat(display.to_string()));
        }
        Ok(Store::Tar {
            file: Arc::new(file),
            members,
        })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Store::Dir(dir) => dir.join(name).is_file(),
            Store::Tar { members, .. } => members.contains_key(&normalise_member(name.as_bytes())),
        }
    }

    /// The blob stored under `name`, or `None` if there is no such member/file.
    fn blob(&self, name: &str) -> Result<Option<Blob>> {
        match self {
            Store::Dir(dir) => {
                // Names come from image JSON: never let one climb out of the layout.
                if name.split('/').any(|c| c == "..") || name.starts_with('/') {
                    return Err(Error::invalid(name, "blob path leaves the image"));
                }
                let path = dir.join(name);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(Error::io(path.display(), e)),
                };
                let meta = file.metadata().map_err(|e| Error::io(path.display(), e))?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some(Blob::new(
                    Arc::new(file),
                    0,
                    meta.len(),
                    &path.display().to_string(),
                )))
            }
            Store::Tar { file, members } => Ok(members
                .get(&normalise_member(name.as_bytes()))
                .map(|&(off, len)| Blob::new(file.clone(), off, len, name))),
        }
    }

    /// Like [`Store::blob`], but a missing blob is an error.
    fn need(&self, image: &str, name: &str) -> Result<Blob> {
        self.blob(name)?.ok_or_else(|| Error::MissingBlob {
            image: image.to_string(),
            name: name.to_string(),
        })
    }

    /// Reads and parses a small JSON member.
    fn json<T: serde::de::DeserializeOwned>(&self, image: &str, name: &str) -> Result<T> {
        let blob = self.need(image, name)?;
        let bytes = blob.read_all(MAX_JSON).map_err(|e| Error::io(name, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            what: name.to_string(),
            source: e,
        })
    }
}

/// The error for an archive whose first header does not parse, with a hint when it is compressed.
fn not_a_tar(file: &File, display: &str) -> Error {
    let mut magic = [0u8; 4];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut magic, 0).unwrap_or(0);
    match &magic[..n] {
        [0x1f, 0x8b, ..] | [0x28, 0xb5, 0x2f, 0xfd] => Error::invalid(
            display,
            "is compressed (gzip or zstd); flatfs reads image archives uncompressed, so \
             decompress it first",
        ),
        _ => Error::UnknownFormat(display.to_string()),
    }
}

/// Some tar crate errors quote raw header bytes; keep only the words before them.
fn printable(msg: &str) -> &str {
    if msg.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        msg
    } else {
        msg.split(':').next().unwrap_or("unreadable header")
    }
}

/// The member a symlink member ends at: targets are relative to the link's directory, must
/// stay inside the archive, and chains are cut off at 16 links (a loop resolves to nothing).
fn resolve_link(
    name: &[u8],
    links: &HashMap<Vec<u8>, Vec<u8>>,
    members: &HashMap<Vec<u8>, (u64, u64)>,
) -> Option<(u64, u64)> {
    let mut cur = name.to_vec();
    for _ in 0..16 {
        if let Some(&range) = members.get(&cur) {
            return Some(range);
        }
        let target = links.get(&cur)?;
        if target.starts_with(b"/") {
            return None;
        }
        let mut parts: Vec<&[u8]> = cur.split(|&b| b == b'/').collect();
        parts.pop();
        for comp in target.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    parts.pop()?;
                }
                c => parts.push(c),
            }
        }
        cur = parts.join(&b'/');
    }
    None
}

fn normalise_member(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for comp in name.split(|&b| b == b'/') {
        if comp.is_empty() || comp == b"." {
            continue;
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(comp);
    }
    out
}

/// Opens IMAGE as the CLI takes it: a path, `DIR:REF`, or `-` for a tar on stdin, or
/// skopeo's transports `docker://REF`, `oci:PATH[:REF]`, `oci-archive:PATH[:REF]`,
/// `docker-archive:PATH[:REF]`; registries are reached with the default options.
pub fn open(spec: &str, wanted: Option<&Platform>) -> Result<Image> {
    open_with(spec, wanted, &crate::registry::Options::default())
}

/// [`open`], with registry options (credentials, certificates, the blob store).
pub fn open_with(
    spec: &str,
    wanted: Option<&Platform>,
    registry: &crate::registry::Options,
) -> Result<Image> {
    let image = open_any(spec, wanted, registry)?;
    // An index entry without a platform (or a docker archive) says nothing about its platform;
    // the config does. Check it only when the user asked for one: by default the only image
    // there is is the one wanted.
    if let Some(want) = wanted
        && !image.platform_from_index
    {
        let (os, arch, variant) = config_platform(&image.config);
        let variant_ok = want
            .variant
            .as_deref()
            .is_none_or(|v| variant.is_empty() || variant == v);
        if os != want.os || arch != want.arch || !variant_ok {
            return Err(Error::NoPlatform {
                image: spec.to_string(),
                wanted: want.to_string(),
                available: platform_text(&image.config),
            });
        }
    }
    Ok(image)
}

fn open_any(
    spec: &str,
    platform: Option<&Platform>,
    registry: &crate::registry::Options,
) -> Result<Image> {
    let host = Platform::host();
    let platform = platform.unwrap_or(&host);
    if let Some(name) = spec.strip_prefix("docker://") {
        let reference: crate::reference::Reference = name
            .parse()
            .map_err(|e: crate::reference::ReferenceError| Error::invalid(spec, e.reason))?;
        return registry::open(&reference, spec, platform, registry);
    }
    // skopeo's local transports: the path ends at the first ':' (as containers/image splits).
    for transport in ["oci:", "oci-archive:", "docker-archive:"] {
        if let Some(rest) = spec.strip_prefix(transport) {
            let (path, reference) = match rest.split_once(':') {
                Some((p, r)) if !r.is_empty() => (p, Some(r)),
                _ => (rest.trim_end_matches(':'), None),
            };
            let path = PathBuf::from(path);
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(path.display(), e))?;
            let store = match (transport, meta.is_dir()) {
                ("oci:", true) => Store::Dir(path),
                ("oci:", false) => {
                    return Err(Error::invalid(spec, "oci: names a layout directory"));
                }
                (_, true) => return Err(Error::invalid(spec, "names a directory, not an archive")),
                (_, false) => Store::open_tar(&path, spec)?,
            };
            let want_docker = transport == "docker-archive:";
            if store.has("manifest.json") != want_docker {
                return Err(Error::invalid(
                    spec,
                    if want_docker {
                        "not a docker-archive (no manifest.json)"
                    } else {
                        "not an OCI layout (no index.json)"
                    },
                ));
            }
            return open_store(store, spec, reference, platform);
        }
    }
    if spec == "-" {
        let mut spool = tempfile::NamedTempFile::new().map_err(|e| Error::io("stdin spool", e))?;
        let n = io::copy(&mut io::stdin().lock(), spool.as_file_mut())
            .map_err(|e| Error::io("stdin", e))?;
        if n == 0 {
            return Err(Error::invalid("stdin", "no image on standard input"));
        }
        let path = spool.into_temp_path();
        let store = Store::open_tar(&path, "stdin")?;
        let mut image = open_store(store, "stdin", None, platform)?;
        image._spool = Some(path);
        return Ok(image);
    }
    let (path, reference) = split_reference(spec);
    let meta = std::fs::metadata(&path).map_err(|e| Error::io(path.display(), e))?;
    let store = if meta.is_dir() {
        Store::Dir(path)
    } else if meta.len() == 0 {
        return Err(Error::invalid(spec, "empty file"));
    } else {
        Store::open_tar(&path, spec)?
    };
    open_store(store, spec, reference.as_deref(), platform)
}

/// The platforms the image `spec` offers, for `export --all-platforms`: every image manifest
/// of its index (nested indexes walked, attestations left out). Empty for a single image.
pub fn platforms(spec: &str, registry: &crate::registry::Options) -> Result<Vec<Platform>> {
    if let Some(name) = spec.strip_prefix("docker://") {
        let reference: crate::reference::Reference = name
            .parse()
            .map_err(|e: crate::reference::ReferenceError| Error::invalid(spec, e.reason))?;
        return registry::platforms(&reference, spec, registry);
    }
    let rest = spec
        .strip_prefix("oci:")
        .or_else(|| spec.strip_prefix("oci-archive:"));
    let (path, reference) = match rest {
        Some(rest) => match rest.split_once(':') {
            Some((p, r)) if !r.is_empty() => (PathBuf::from(p), Some(r.to_string())),
            _ => (PathBuf::from(rest.trim_end_matches(':')), None),
        },
        None if spec == "-" => {
            return Err(Error::invalid(spec, "stdin can be read only once"));
        }
        None => split_reference(spec),
    };
    let meta = std::fs::metadata(&path).map_err(|e| Error::io(path.display(), e))?;
    let store = if meta.is_dir() {
        Store::Dir(path)
    } else {
        Store::open_tar(&path, spec)?
    };
    if store.has("manifest.json") || !store.has("index.json") {
        return Ok(Vec::new());
    }
    oci::platforms(&store, spec, reference.as_deref())
}

/// Splits `PATH:REF` when the whole string is not itself an existing path: at the first `:`
/// whose left side exists (a layout dir or an archive), so a REF may hold `:` itself
/// (`multi.tar:localhost/app:3`).
fn split_reference(spec: &str) -> (PathBuf, Option<String>) {
    if !Path::new(spec).exists() {
        for (i, _) in spec.match_indices(':') {
            let (path, reference) = (&spec[..i], &spec[i + 1..]);
            if !path.is_empty() && !reference.is_empty() && Path::new(path).exists() {
                return (PathBuf::from(path), Some(reference.to_string()));
            }
        }
    }
    (PathBuf::from(spec), None)
}

fn open_store(
    store: Store,
    name: &str,
    reference: Option<&str>,
    platform: &Platform,
) -> Result<Image> {
    let mut image = open_family(&store, name, reference, platform)?;
    image.archive = matches!(store, Store::Tar { .. });
    Ok(image)
}

fn open_family(
    store: &Store,
    name: &str,
    reference: Option<&str>,
    platform: &Platform,
) -> Result<Image> {
    // docker save (classic and >= 25) always writes manifest.json; Docker 25 also writes an OCI
    // index, but manifest.json is the one that carries RepoTags and the classic layer paths.
    if store.has("manifest.json") {
        return docker_archive::open(store, name, reference);
    }
    if store.has("index.json") {
        return oci::open(store, name, reference, platform);
    }
    Err(Error::UnknownFormat(name.to_string()))
}

/// Builds the list of layers once blob, digest and diff_id are known.
fn make_layer(
    number: usize,
    blob: Blob,
    digest: Option<String>,
    diff_id: Option<String>,
) -> Result<Layer> {
    let compression = Compression::detect(&blob).map_err(|e| Error::io(blob.name(), e))?;
    Ok(Layer {
        number,
        blob,
        compression,
        digest,
        diff_id,
        descriptor: None,
    })
}

/// The config's `rootfs.diff_ids`, checked to be a list of strings.
fn diff_ids(config: &serde_json::Value, what: &str) -> Result<Vec<String>> {
    let ids = config
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(|d| d.as_array())
        .ok_or_else(|| Error::invalid(what, "config has no rootfs.diff_ids"))?;
    ids.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(what, "rootfs.diff_ids holds a non-string"))
        })
        .collect()
}

/// Parses and checks a config blob against its digest.
fn read_config(blob: &Blob, expected: Option<&str>, what: &str) -> Result<serde_json::Value> {
    let bytes = blob.read_all(MAX_JSON).map_err(|e| Error::io(what, e))?;
    if let Some(expected) = expected {
        let found = crate::blob::sha256_of(&bytes);
        if found != expected {
            return Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: expected.to_string(),
                found,
            });
        }
    }
    parse_config(&bytes, what)
}

/// Parses config bytes whose digest is already settled.
fn parse_config(bytes: &[u8], what: &str) -> Result<serde_json::Value> {
    let config: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
        what: what.to_string(),
        source: e,
    })?;
    if !config.is_object() {
        return Err(Error::invalid(what, "config is not a JSON object"));
    }
    Ok(config)
}
