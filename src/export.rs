//! Export: the merged tree streamed into one deterministic layer tar, wrapped as a
//! docker-archive, OCI archive, OCI layout directory, or written bare as a rootfs tar.
//! Digests are computed while writing; a file output goes to a temp file renamed on success
//! (a device or FIFO is written in place).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::blob::{Compression, HashWriter, open_decoded, sha256_of};
use crate::compress::{ESTARGZ_CHUNK, ParallelGzip, ParallelZstd};
use crate::error::{Error, Result};
use crate::layer::Meta;
use crate::par::{self, ParallelReader};
use crate::pipe::{CHUNK, DEPTH, PipeReader, PipeWriter, drain_into, is_hangup, joined, pipe};
use crate::reference::Reference;
use crate::source::{Family, Image};
use crate::squash::Plan;
use crate::tree::{Extent, NodeId, NodeKind, Tree, Xattrs};
use crate::zran::Checkpoints;

/// Output container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `docker save` layout, for `docker load` / `podman load`.
    DockerArchive,
    /// A tar of an OCI image layout.
    OciArchive,
    /// An OCI image layout directory.
    Oci,
    /// Only the merged tree as a plain tar (what `docker export` gives).
    Rootfs,
}

/// Compression of the output layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutCompression {
    /// gzip (`tar+gzip`).
    Gzip,
    /// zstd (`tar+zstd`).
    Zstd,
    /// Plain tar.
    None,
    /// eStargz: gzip members per file chunk and a table of contents (`tar+gzip` to any reader).
    Estargz,
}

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Output format; default from the input's family.
    pub format: Option<Format>,
    /// Layer compression; default gzip, but none for docker-archive and rootfs.
    pub compression: Option<OutCompression>,
    /// `NAME:TAG` for the output; default the input's tag.
    pub tag: Option<String>,
    /// `SOURCE_DATE_EPOCH`: clamps mtimes and sets `created`.
    pub source_date_epoch: Option<i64>,
    /// Per layer, by position, the checkpoints of its cached index ([`crate::Opened`]): a
    /// compressed layer that has some is decompressed on every core ([`ParallelReader`]).
    pub checkpoints: Vec<Option<Arc<Checkpoints>>>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    /// Format written.
    pub format: Format,
    /// sha256 of the uncompressed layer tar.
    pub diff_id: String,
    /// sha256 of the layer blob as stored.
    pub layer_digest: String,
    /// Size of the layer blob.
    pub layer_size: u64,
    /// Manifest digest, when the output holds a manifest (OCI formats; not docker-archive,
    /// whose manifest.json has no digest, nor rootfs).
    pub manifest_digest: Option<String>,
    /// The image ID: the digest of the config written (not for rootfs).
    pub image_id: Option<String>,
    /// Names (nodes) written.
    pub entries: u64,
    /// With `--keep`: what the squashed layer holds.
    pub squash: Option<crate::squash::Stats>,
}

const BLOCK: usize = 512;

/// Set by SIGINT/SIGTERM (see [`catch_interrupts`]); export stops at the next entry or MiB and
/// its temp files are removed as the error unwinds.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM stop an export cleanly instead of killing the process mid-write.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only performs an atomic store; sa_mask is initialised empty.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

fn check_interrupt() -> io::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "interrupted by a signal",
        ));
    }
    Ok(())
}

/// Writes the merged tree of `image` to `out` (`-` for stdout).
pub fn export(image: &Image, tree: &Tree, out: &str, opts: &Options) -> Result<Report> {
    export_with_progress(image, tree, out, opts, &|_| {})
}

/// Total bytes of file content an export writes: what `progress` counts up to.
pub fn content_bytes(tree: &Tree) -> u64 {
    let mut total = 0;
    let _ = tree.walk(|_, id, first| {
        if first && let NodeKind::File(e) = &tree.node(id).kind {
            total += e.size;
        }
        Ok(())
    });
    total
}

/// [`export`], telling `progress` how many content bytes each file added.
pub fn export_with_progress(
    image: &Image,
    tree: &Tree,
    out: &str,
    opts: &Options,
    progress: &dyn Fn(u64),
) -> Result<Report> {
    export_image(image, tree, None, out, opts, progress)
}

/// What `export --keep N` keeps: the first `layers` layers, and the plan of the layer that
/// replaces the rest ([`Plan::new`] of those layers' merged tree and the full one).
#[derive(Clone, Copy)]
pub struct Keep<'a> {
    /// How many layers, from the bottom, are kept as they are.
    pub layers: usize,
    /// What the new layer holds.
    pub plan: &'a Plan,
}

/// Writes `image` with its first `keep.layers` layers as they are (same blobs, descriptors
/// and diff_ids) and the rest replaced by one layer, as `keep.plan` says (see
/// src/squash.rs). `keep.layers == 0` is [`export_with_progress`].
pub fn export_keeping(
    image: &Image,
    tree: &Tree,
    keep: Keep,
    out: &str,
    opts: &Options,
    progress: &dyn Fn(u64),
) -> Result<Report> {
    if keep.layers == 0 {
        return export_with_progress(image, tree, out, opts, progress);
    }
    if keep.layers > image.layers.len() {
        return Err(Error::invalid(
            &image.name,
            format!(
                "has {} layers; cannot keep {}",
                image.layers.len(),
                keep.layers
            ),
        ));
    }
    export_image(image, tree, Some(keep), out, opts, progress)
}

/// Total bytes of file content an export keeping `keep` writes into its new layer.
pub fn planned_content_bytes(tree: &Tree, plan: &Plan) -> u64 {
    let mut total = 0;
    let _ = tree.walk(|_, id, first| {
        if first
            && plan.writes(id)
            && let NodeKind::File(e) = &tree.node(id).kind
        {
            total += e.size;
        }
        Ok(())
    });
    total
}

fn export_image(
    image: &Image,
    tree: &Tree,
    keep: Option<Keep>,
    out: &str,
    opts: &Options,
    progress: &dyn Fn(u64),
) -> Result<Report> {
    let format = opts.format.unwrap_or(match image.family {
        Family::Docker => Format::DockerArchive,
        Family::Oci => Format::OciArchive,
    });
    let compression = opts.compression.unwrap_or(match format {
        Format::DockerArchive | Format::Rootfs => OutCompression::None,
        Format::OciArchive | Format::Oci => OutCompression::Gzip,
    });
    if format == Format::Oci && out == "-" {
        return Err(Error::invalid(
            "-o -",
            "an OCI layout directory cannot be written to stdout",
        ));
    }
    let out_dir = scratch_dir(out);
    if keep.is_some() && format == Format::Rootfs {
        return Err(Error::invalid(
            "--keep",
            "a rootfs tar has no layers to keep (use --format oci, oci-archive or docker-archive)",
        ));
    }
    let plan = keep.map(|k| k.plan);
    let kept = match keep {
        Some(k) => crate::squash::kept_layers(image, k.layers)?,
        None => Vec::new(),
    };

    if format == Format::Rootfs {
        let mut dest = Dest::open(out)?;
        let (layer, entries) = write_layer(
            image,
            tree,
            dest.writer(),
            compression,
            opts.source_date_epoch,
            &out_dir,
            progress,
            None,
            &opts.checkpoints,
        )?;
        dest.commit()?;
        return Ok(Report {
            format,
            diff_id: layer.diff_id,
            layer_digest: layer.digest,
            layer_size: layer.size,
            manifest_digest: None,
            image_id: None,
            entries,
            squash: None,
        });
    }

    // The layer goes to a spool first: its digest names it and its size heads its tar member.
    let mut spool = tempfile::tempfile_in(&out_dir).map_err(|e| Error::io(out_dir.display(), e))?;
    let (layer, entries) = write_layer(
        image,
        tree,
        BufWriter::with_capacity(1 << 20, &mut spool),
        compression,
        opts.source_date_epoch,
        &out_dir,
        progress,
        plan,
        &opts.checkpoints,
    )?;
    spool.rewind().map_err(|e| Error::io("layer spool", e))?;

    let config = new_config(image, kept.len(), &layer.diff_id, opts.source_date_epoch);
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Json {
        what: "new config".into(),
        source: e,
    })?;
    let config_digest = sha256_of(&config_bytes);
    let layer_media_type = match compression {
        OutCompression::Gzip | OutCompression::Estargz => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        OutCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        OutCompression::None => "application/vnd.oci.image.layer.v1.tar",
    };
    let mut layer_descriptor = json!({
        "mediaType": layer_media_type,
        "digest": layer.digest,
        "size": layer.size,
    });
    if let Some(e) = &layer.estargz {
        // What stargz-aware readers (flatfs's lazy mount too) locate and check the TOC by.
        layer_descriptor["annotations"] = json!({
            "containerd.io/snapshot/stargz/toc.digest": e.toc_digest,
            "io.containers.estargz.uncompressed-size": e.uncompressed.to_string(),
        });
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": kept.iter().map(|k| k.descriptor.clone()).chain([layer_descriptor]).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Json {
        what: "new manifest".into(),
        source: e,
    })?;
    let manifest_digest = sha256_of(&manifest_bytes);
    let tag = output_name(opts.tag.as_deref(), &image.tags)?;

    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    let mut files: Vec<(String, Member)> = Vec::new();
    match format {
        Format::DockerArchive => {
            // RepoTags in the short form, as `docker save` writes them.
            let tags: Vec<String> = tag.iter().map(Reference::familiar).collect();
            let layer_names: Vec<String> = kept
                .iter()
                .map(|k| &k.digest)
                .chain([&layer.digest])
                .map(|d| format!("{}/layer.tar", hex(d)))
                .collect();
            let docker_manifest = json!([{
                "Config": format!("{}.json", hex(&config_digest)),
                "RepoTags": if tags.is_empty() { Value::Null } else { json!(tags) },
                "Layers": layer_names,
            }]);
            for k in &kept {
                files.push((
                    format!("{}/layer.tar", hex(&k.digest)),
                    Member::Blob(k.blob.clone()),
                ));
            }
            files.push((format!("{}/layer.tar", hex(&layer.digest)), Member::Spool));
            files.push((
                format!("{}.json", hex(&config_digest)),
                Member::Bytes(config_bytes),
            ));
            files.push((
                "manifest.json".into(),
                Member::Bytes(to_json(&docker_manifest)?),
            ));
        }
        Format::OciArchive | Format::Oci => {
            let mut annotations = serde_json::Map::new();
            let reference = tag
                .as_ref()
                .and_then(Reference::tag)
                .unwrap_or(crate::reference::DEFAULT_TAG);
            annotations.insert("org.opencontainers.image.ref.name".into(), json!(reference));
            // The full form, as containerd writes it (`docker.io/library/app:latest`).
            if let Some(full) = &tag {
                annotations.insert("io.containerd.image.name".into(), json!(full.to_string()));
            }
            let index = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest_bytes.len(),
                    "annotations": annotations,
                }],
            });
            files.push((
                "oci-layout".into(),
                Member::Bytes(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            ));
            for k in &kept {
                files.push((
                    format!("blobs/sha256/{}", hex(&k.digest)),
                    Member::Blob(k.blob.clone()),
                ));
            }
            files.push((
                format!("blobs/sha256/{}", hex(&layer.digest)),
                Member::Spool,
            ));
            files.push((
                format!("blobs/sha256/{}", hex(&config_digest)),
                Member::Bytes(config_bytes),
            ));
            files.push((
                format!("blobs/sha256/{}", hex(&manifest_digest)),
                Member::Bytes(manifest_bytes),
            ));
            files.push(("index.json".into(), Member::Bytes(to_json(&index)?)));
        }
        Format::Rootfs => unreachable!("handled above"),
    }
    // Two kept layers, or a kept layer and the new one, can be the same blob (an empty tar,
    // say): one copy, as the content-addressed name promises.
    let mut names = std::collections::HashSet::new();
    files.retain(|(name, _)| names.insert(name.clone()));

    if format == Format::Oci {
        write_layout_dir(Path::new(out), &files, &mut spool)?;
    } else {
        let mut dest = Dest::open(out)?;
        write_archive(dest.writer(), &files, &mut spool, layer.size)?;
        dest.commit()?;
    }
    Ok(Report {
        format,
        diff_id: layer.diff_id,
        layer_digest: layer.digest,
        layer_size: layer.size,
        manifest_digest: (format != Format::DockerArchive).then_some(manifest_digest),
        image_id: Some(config_digest),
        entries,
        squash: plan.map(|p| p.stats),
    })
}

fn to_json(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Json {
        what: "output JSON".into(),
        source: e,
    })
}

/// The output's name: `--tag` (refused if invalid), else the input's first valid tag; an
/// untagged name gets `latest`, as `docker tag` gives it.
fn output_name(tag: Option<&str>, input_tags: &[String]) -> Result<Option<Reference>> {
    if let Some(t) = tag {
        return Reference::parse_tag_arg(t)
            .map(Some)
            .map_err(|e| Error::invalid("--tag", e));
    }
    let found = input_tags
        .iter()
        .find_map(|t| Reference::parse_tag_arg(t).ok());
    if found.is_none() && !input_tags.is_empty() {
        log::warn!(
            "the output has no name: the input's {} not a valid image name (give one with --tag)",
            match input_tags {
                [one] => format!("tag {one:?} is"),
                many => format!("tags {many:?} are"),
            }
        );
    }
    Ok(found)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

enum Member {
    Bytes(Vec<u8>),
    Spool,
    /// A kept layer's blob, copied as it is.
    Blob(crate::blob::Blob),
}

fn write_archive(
    w: &mut dyn Write,
    files: &[(String, Member)],
    spool: &mut File,
    spool_len: u64,
) -> Result<()> {
    let mut builder = tar::Builder::new(w);
    for (name, member) in files {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        let res = match member {
            Member::Bytes(b) => {
                header.set_size(b.len() as u64);
                builder.append_data(&mut header, name, &b[..])
            }
            Member::Spool => {
                header.set_size(spool_len);
                spool.rewind().map_err(|e| Error::io("layer spool", e))?;
                builder.append_data(
                    &mut header,
                    name,
                    BufReader::with_capacity(1 << 20, &mut *spool),
                )
            }
            Member::Blob(blob) => {
                header.set_size(blob.len());
                builder.append_data(
                    &mut header,
                    name,
                    BufReader::with_capacity(1 << 20, blob.reader()),
                )
            }
        };
        res.map_err(|e| Error::io(name, e))?;
    }
    // Builder swallows errors in Drop: finish explicitly.
    builder.finish().map_err(|e| Error::io("output", e))?;
    Ok(())
}

fn write_layout_dir(out: &Path, files: &[(String, Member)], spool: &mut File) -> Result<()> {
    if let Ok(meta) = fs::symlink_metadata(out) {
        let empty_dir = meta.is_dir()
            && fs::read_dir(out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty_dir {
            return Err(Error::invalid(
                out.display(),
                "already exists (an OCI layout is written only to a new or empty directory)",
            ));
        }
    }
    let parent = parent_dir(out);
    let tmp = tempfile::Builder::new()
        .prefix(".flatfs-")
        // The kernel applies the umask: the layout ends up as mkdir would make it.
        .permissions(fs::Permissions::from_mode(0o777))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(parent.display(), e))?;
    for (name, member) in files {
        let path = tmp.path().join(name);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        }
        let mut f = File::create(&path).map_err(|e| Error::io(path.display(), e))?;
        match member {
            Member::Bytes(b) => f.write_all(b),
            Member::Spool => spool
                .rewind()
                .and_then(|()| io::copy(spool, &mut f).map(|_| ())),
            Member::Blob(blob) => io::copy(
                &mut BufReader::with_capacity(1 << 20, blob.reader()),
                &mut f,
            )
            .map(|_| ()),
        }
        .map_err(|e| Error::io(path.display(), e))?;
    }
    if out.is_dir() {
        fs::remove_dir(out).map_err(|e| Error::io(out.display(), e))?;
    }
    let kept = tmp.keep();
    fs::rename(&kept, out).map_err(|e| {
        let _ = fs::remove_dir_all(&kept);
        Error::io(out.display(), e)
    })?;
    Ok(())
}

/// OUT with symlinks followed (a dangling link gives the path it would create), so writing
/// replaces the link's target and keeps the link.
fn resolve_out(out: &Path) -> Result<PathBuf> {
    let mut path = out.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&path).map_err(|e| Error::io(path.display(), e))?;
                path = parent_dir(&path).join(target);
            }
            _ => return Ok(path),
        }
    }
    Err(Error::invalid(
        out.display(),
        "too many levels of symbolic links",
    ))
}

/// Whether OUT (followed) exists and is a device, FIFO or socket: written in place, since
/// renaming a file over it would replace the node itself (`-o /dev/null` as root).
fn is_special(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Where scratch files for OUT go: beside the file that will be written (so the final rename
/// stays on one filesystem), or the temp dir when OUT is stdout or a special file.
pub fn scratch_dir(out: &str) -> PathBuf {
    if out == "-" {
        return std::env::temp_dir();
    }
    match resolve_out(Path::new(out)) {
        Ok(path) if !is_special(&path) => parent_dir(&path),
        Ok(_) => std::env::temp_dir(),
        Err(_) => parent_dir(Path::new(out)),
    }
}

/// The output: stdout, a device or FIFO written in place, or a temp file beside OUT (its
/// symlink target) renamed over it on success.
enum Dest {
    Stdout(BufWriter<io::Stdout>),
    Special {
        file: BufWriter<File>,
        path: PathBuf,
    },
    File {
        tmp: BufWriter<tempfile::NamedTempFile>,
        path: PathBuf,
    },
}

impl Dest {
    fn open(out: &str) -> Result<Self> {
        if out == "-" {
            return Ok(Dest::Stdout(BufWriter::with_capacity(
                1 << 20,
                io::stdout(),
            )));
        }
        let path = resolve_out(Path::new(out))?;
        if path.is_dir() {
            return Err(Error::invalid(out, "is a directory"));
        }
        if is_special(&path) {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(path.display(), e))?;
            return Ok(Dest::Special {
                file: BufWriter::with_capacity(1 << 20, file),
                path,
            });
        }
        let parent = parent_dir(&path);
        let tmp = tempfile::Builder::new()
            .prefix(".flatfs-")
            // The kernel applies the umask: OUT ends up as a plain `>` redirect would make it.
            .permissions(fs::Permissions::from_mode(0o666))
            .tempfile_in(&parent)
            .map_err(|e| Error::io(parent.display(), e))?;
        Ok(Dest::File {
            tmp: BufWriter::with_capacity(1 << 20, tmp),
            path,
        })
    }

    fn writer(&mut self) -> &mut (dyn Write + Send) {
        match self {
            Dest::Stdout(w) => w,
            Dest::Special { file, .. } => file,
            Dest::File { tmp, .. } => tmp,
        }
    }

    fn commit(self) -> Result<()> {
        match self {
            Dest::Stdout(mut w) => w.flush().map_err(|e| Error::io("stdout", e)),
            Dest::Special { mut file, path } => {
                file.flush().map_err(|e| Error::io(path.display(), e))
            }
            Dest::File { tmp, path } => {
                let tmp = tmp
                    .into_inner()
                    .map_err(|e| Error::io(path.display(), e.into_error()))?;
                // No fsync: the rename makes OUT appear whole or not at all, which is the
                // promise; durability across a power cut is the filesystem's (as for
                // docker save and skopeo), and an fsync of a big image costs seconds.
                tmp.persist(&path)
                    .map_err(|e| Error::io(path.display(), e.error))?;
                Ok(())
            }
        }
    }
}

/// The new config: the old one with the kept layers' diff_ids and one new one, and the squash
/// recorded in history. History entries map to layers by skipping `empty_layer` ones: the kept
/// layers' entries (and the empty ones among them) stay as they are, the rest become empty.
fn new_config(image: &Image, keep: usize, diff_id: &str, epoch: Option<i64>) -> Value {
    let mut config = image.config.clone();
    let obj = config
        .as_object_mut()
        .expect("config was checked to be an object");
    let kept_ids = obj
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(|d| d.as_array())
        .map(|d| d[..keep.min(d.len())].to_vec())
        .unwrap_or_default();
    let diff_ids: Vec<Value> = kept_ids.into_iter().chain([json!(diff_id)]).collect();
    obj.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history: Vec<Value> = obj
        .get("history")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    let mut layers_seen = 0;
    for h in &mut history {
        if let Some(h) = h.as_object_mut() {
            if layers_seen < keep {
                let empty = h.get("empty_layer").and_then(Value::as_bool) == Some(true);
                layers_seen += usize::from(!empty);
                continue;
            }
            h.insert("empty_layer".into(), Value::Bool(true));
        }
    }
    let created = match epoch {
        Some(e) => Some(Value::String(rfc3339(e))),
        None => obj.get("created").cloned(),
    };
    if let Some(c) = &created {
        obj.insert("created".into(), c.clone());
    }
    let mut entry = serde_json::Map::new();
    if let Some(c) = created {
        entry.insert("created".into(), c);
    }
    let created_by = if keep == 0 {
        format!(
            "flatfs export: flattened {} layers of {}",
            image.layers.len(),
            image.manifest_digest
        )
    } else {
        format!(
            "flatfs export: kept {keep} layers, squashed layers {}-{} of {}",
            keep + 1,
            image.layers.len(),
            image.manifest_digest
        )
    };
    entry.insert("created_by".into(), json!(created_by));
    entry.insert(
        "comment".into(),
        json!(format!("flatfs {}", env!("CARGO_PKG_VERSION"))),
    );
    history.push(Value::Object(entry));
    obj.insert("history".into(), Value::Array(history));
    config
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The written layer's digests and size.
struct LayerOut {
    diff_id: String,
    digest: String,
    size: u64,
    /// The TOC digest and uncompressed size of an eStargz layer.
    estargz: Option<crate::compress::EstargzOut>,
}

enum Compressor<W: Write> {
    None(W),
    Gzip(ParallelGzip<W>),
    Zstd(ParallelZstd<W>),
}

impl<W: Write> Compressor<W> {
    fn new(w: W, c: OutCompression) -> io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(match c {
            OutCompression::None => Compressor::None(w),
            // Level 6, like gzip's and pigz's default.
            OutCompression::Gzip => Compressor::Gzip(ParallelGzip::new(w, 6, threads)),
            // Level 3, zstd's default; many frames, so the layer is seekable.
            OutCompression::Zstd => Compressor::Zstd(ParallelZstd::new(w, 3, threads)?),
            OutCompression::Estargz => unreachable!("eStargz is written from a spooled tar"),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Gzip(e) => e.finish(),
            Compressor::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(e) => e.write(buf),
            Compressor::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(e) => e.flush(),
            Compressor::Zstd(e) => e.flush(),
        }
    }
}

/// Writes the merged tree as one tar through `compression` into `w`.
// The walk's inputs, handed on to write_entries on one side of the pipe.
#[allow(clippy::too_many_arguments)]
fn write_layer<W: Write + Send>(
    image: &Image,
    tree: &Tree,
    w: W,
    compression: OutCompression,
    epoch: Option<i64>,
    spill_dir: &Path,
    progress: &dyn Fn(u64),
    plan: Option<&Plan>,
    checkpoints: &[Option<Arc<Checkpoints>>],
) -> Result<(LayerOut, u64)> {
    // Building the tar (headers, contents read from the layers) and hashing, compressing and
    // writing it run on two threads: each is about half the work.
    let (tx, rx) = pipe(DEPTH, CHUNK);
    let (walked, written) = std::thread::scope(|s| {
        let writing = s.spawn(move || write_stage(rx, w, compression, spill_dir));
        let walked = write_entries(
            image,
            tree,
            tx,
            epoch,
            spill_dir,
            progress,
            plan,
            checkpoints,
        );
        (walked, joined(writing.join()))
    });
    match (walked, written) {
        (Ok(entries), Ok(layer)) => Ok((layer, entries)),
        // The writer failed first (say, a full disk) and the walk then found the pipe closed.
        (_, Err(e)) if !is_hangup(&e) => Err(Error::io("output", e)),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(Error::io("output", e)),
    }
}

/// The writing stage: hashes the tar (diff_id), compresses it and hashes and writes the result.
fn write_stage<W: Write>(
    mut input: PipeReader,
    w: W,
    compression: OutCompression,
    spill_dir: &Path,
) -> io::Result<LayerOut> {
    if compression == OutCompression::Estargz {
        // eStargz lays members out per entry, which needs each entry's header parsed: the
        // tar is spooled and rewritten from there.
        let mut spool = tempfile::tempfile_in(spill_dir)?;
        drain_into(&mut input, &mut spool)?;
        let outer = HashWriter::new(w);
        let (outer, e) = crate::compress::write_estargz(&spool, outer, ESTARGZ_CHUNK, 6)?;
        let (digest, size, mut w) = outer.finish();
        w.flush()?;
        return Ok(LayerOut {
            diff_id: e.diff_id.clone(),
            digest,
            size,
            estargz: Some(e),
        });
    }
    if compression == OutCompression::None {
        // The blob is the tar: one digest serves as both.
        let mut tar = HashWriter::new(w);
        drain_into(&mut input, &mut tar)?;
        let (diff_id, size, mut w) = tar.finish();
        w.flush()?;
        return Ok(LayerOut {
            digest: diff_id.clone(),
            diff_id,
            size,
            estargz: None,
        });
    }
    let outer = HashWriter::new(w);
    let compressor = Compressor::new(outer, compression)?;
    let mut tar = HashWriter::new(compressor);
    drain_into(&mut input, &mut tar)?;
    let (diff_id, _, compressor) = tar.finish();
    let outer = compressor.finish()?;
    let (digest, size, mut w) = outer.finish();
    w.flush()?;
    Ok(LayerOut {
        diff_id,
        digest,
        size,
        estargz: None,
    })
}

/// Streams the merged tree as one tar into `tar` (with a plan, only what it writes, and its
/// whiteouts and opaque markers); returns the number of names written.
#[allow(clippy::too_many_arguments)]
fn write_entries(
    image: &Image,
    tree: &Tree,
    mut tar: PipeWriter,
    epoch: Option<i64>,
    spill_dir: &Path,
    progress: &dyn Fn(u64),
    plan: Option<&Plan>,
    checkpoints: &[Option<Arc<Checkpoints>>],
) -> Result<u64> {
    let mut contents = LayerPasses::new(image, tree, spill_dir, plan, checkpoints)?;
    let mut first_name: HashMap<NodeId, Vec<u8>> = HashMap::new();
    let mut entries = 0u64;
    let out_err = |e: io::Error| Error::io("output", e);
    tree.walk(|path, id, first| {
        check_interrupt().map_err(out_err)?;
        if plan.is_some_and(|p| !p.writes(id)) {
            return Ok(());
        }
        entries += 1;
        let node = tree.node(id);
        let mut meta = node.meta;
        if let Some(e) = epoch
            && meta.mtime > e
        {
            meta.mtime = e;
            meta.mtime_nsec = 0;
        }
        let mut name = if path.is_empty() {
            b".".to_vec()
        } else {
            path.to_vec()
        };
        if !first {
            let target = &first_name[&id];
            let h = Header {
                path: &name,
                kind: tar::EntryType::Link,
                meta: &meta,
                size: 0,
                link: target,
                dev: (0, 0),
                xattrs: Xattrs::default(),
            };
            return h.write(&mut tar).map_err(out_err);
        }
        if node.nlink > 1 && !node.is_dir() {
            first_name.insert(id, name.clone());
        }
        let (kind, size, link, dev): (_, u64, &[u8], _) = match &node.kind {
            NodeKind::Dir(_) => {
                name.push(b'/');
                (tar::EntryType::Directory, 0, &[], (0, 0))
            }
            NodeKind::File(e) => (tar::EntryType::Regular, e.size, &[], (0, 0)),
            NodeKind::Symlink(t) => (tar::EntryType::Symlink, 0, t, (0, 0)),
            NodeKind::Char(a, b) => (tar::EntryType::Char, 0, &[], (*a, *b)),
            NodeKind::Block(a, b) => (tar::EntryType::Block, 0, &[], (*a, *b)),
            NodeKind::Fifo => (tar::EntryType::Fifo, 0, &[], (0, 0)),
        };
        let h = Header {
            path: &name,
            kind,
            meta: &meta,
            size,
            link,
            dev,
            xattrs: node.xattrs,
        };
        h.write(&mut tar).map_err(out_err)?;
        if let Some(plan) = plan
            && node.is_dir()
        {
            write_markers(plan, id, path, &mut tar).map_err(out_err)?;
        }
        if let NodeKind::File(extent) = &node.kind {
            contents.copy(id, extent, &mut tar)?;
            progress(extent.size);
            pad(&mut tar, extent.size).map_err(out_err)?;
        }
        Ok(())
    })?;
    // End of archive: two zero blocks.
    tar.write_all(&[0; 2 * BLOCK]).map_err(out_err)?;
    tar.finish().map_err(out_err)?;
    Ok(entries)
}

/// Directory `dir`'s opaque marker and whiteouts, right after its entry: the spec asks for
/// whiteouts before their siblings, and some appliers apply them in tar order.
fn write_markers(plan: &Plan, dir: NodeId, path: &[u8], w: &mut impl Write) -> io::Result<()> {
    let (opaque, names) = plan.markers(dir);
    let marker = |name: &[u8]| {
        let mut p = path.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(crate::layer::path::WHITEOUT_PREFIX);
        p.extend_from_slice(name);
        p
    };
    let meta = Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
    };
    let mut paths: Vec<Vec<u8>> = Vec::with_capacity(names.len() + 1);
    if opaque {
        paths.push(marker(b".wh..opq"));
    }
    paths.extend(names.iter().map(|n| marker(n)));
    for p in &paths {
        Header {
            path: p,
            kind: tar::EntryType::Regular,
            meta: &meta,
            size: 0,
            link: &[],
            dev: (0, 0),
            xattrs: Xattrs::default(),
        }
        .write(w)?;
    }
    Ok(())
}

fn pad(w: &mut impl Write, size: u64) -> io::Result<()> {
    let rem = (size % BLOCK as u64) as usize;
    if rem != 0 {
        w.write_all(&[0; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

/// One tar member's header (plus a PAX header for what ustar cannot hold).
struct Header<'a> {
    path: &'a [u8],
    kind: tar::EntryType,
    meta: &'a Meta,
    size: u64,
    link: &'a [u8],
    dev: (u32, u32),
    xattrs: Xattrs<'a>,
}

const MAX_OCTAL_7: u64 = 0o7777777;
const MAX_OCTAL_11: u64 = 0o77777777777;

impl Header<'_> {
    fn write(&self, w: &mut impl Write) -> io::Result<()> {
        let mut pax: Vec<u8> = Vec::new();
        let m = self.meta;
        if self.path.len() > 100 {
            pax_record(&mut pax, b"path", self.path);
        }
        if self.link.len() > 100 {
            pax_record(&mut pax, b"linkpath", self.link);
        }
        if m.uid > MAX_OCTAL_7 {
            pax_record(&mut pax, b"uid", m.uid.to_string().as_bytes());
        }
        if m.gid > MAX_OCTAL_7 {
            pax_record(&mut pax, b"gid", m.gid.to_string().as_bytes());
        }
        if self.size > MAX_OCTAL_11 {
            pax_record(&mut pax, b"size", self.size.to_string().as_bytes());
        }
        if m.mtime_nsec != 0 || m.mtime < 0 || m.mtime as u64 > MAX_OCTAL_11 {
            pax_record(
                &mut pax,
                b"mtime",
                pax_time(m.mtime, m.mtime_nsec).as_bytes(),
            );
        }
        for (k, v) in self.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if self.dev.0 as u64 > MAX_OCTAL_7 || self.dev.1 as u64 > MAX_OCTAL_7 {
            return Err(io::Error::other(format!(
                "{}: device number too large for a tar header",
                String::from_utf8_lossy(self.path)
            )));
        }
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            set_name(&mut h, b"././@PaxHeader");
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(pax.len() as u64);
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_cksum();
            w.write_all(h.as_bytes())?;
            w.write_all(&pax)?;
            pad(w, pax.len() as u64)?;
        }
        let mut h = tar::Header::new_ustar();
        set_name(&mut h, self.path);
        let link = &self.link[..self.link.len().min(100)];
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_mode(m.mode);
        h.set_uid(m.uid.min(MAX_OCTAL_7));
        h.set_gid(m.gid.min(MAX_OCTAL_7));
        h.set_mtime((m.mtime.max(0) as u64).min(MAX_OCTAL_11));
        h.set_size(self.size.min(MAX_OCTAL_11));
        h.set_entry_type(self.kind);
        if matches!(self.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(self.dev.0)?;
            h.set_device_minor(self.dev.1)?;
        }
        h.set_cksum();
        w.write_all(h.as_bytes())
    }
}

/// Puts up to 100 bytes of `name` in the name field (PAX `path` carries the rest).
fn set_name(h: &mut tar::Header, name: &[u8]) {
    let n = &name[..name.len().min(100)];
    h.as_old_mut().name[..n.len()].copy_from_slice(n);
}

/// Appends `"%d %s=%s\n"`, where the length counts itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 1 + key.len() + 1 + value.len() + 1; // ' ' key '=' value '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn pax_time(secs: i64, nsec: u32) -> String {
    if nsec == 0 {
        return secs.to_string();
    }
    // PAX times are sign + magnitude: -2 s + 0.75 s is written -1.25.
    let (sign, whole, frac) = if secs < 0 {
        ("-", -(secs + 1), 1_000_000_000 - nsec)
    } else {
        ("", secs, nsec)
    };
    let frac = format!("{frac:09}");
    format!("{sign}{whole}.{}", frac.trim_end_matches('0'))
}

/// Reads each layer once, forward only, in the order export needs file contents. Contents
/// needed later than they pass by (when the merged order differs from a layer's tar order) are
/// spilled to an anonymous temp file, so memory stays bounded and no layer is decompressed twice.
struct LayerPasses<'a> {
    image: &'a Image,
    passes: Vec<Option<Pass>>,
    /// Per layer: the files it still has to deliver, by offset.
    wanted: Vec<Vec<(u64, u64, NodeId)>>,
    next: Vec<usize>,
    spill: Option<File>,
    spill_dir: PathBuf,
    spill_len: u64,
    spilled: HashMap<NodeId, u64>,
    windows: Windows,
    /// Per layer: how to decompress it on several threads, when its index has checkpoints.
    parallel: Vec<Option<Parallel>>,
}

/// What a [`ParallelReader`] of one layer is made with.
struct Parallel {
    checkpoints: Arc<Checkpoints>,
    threads: usize,
    range: u64,
    ahead: usize,
}

/// Most layers decompressed on several threads at once: a walk alternating between layers
/// keeps a reader, its threads and its ranges alive for each; the biggest layers gain most.
const PARALLEL_LAYERS: usize = 4;
/// Decompressed bytes all parallel readers together may hold ahead of the walk.
const PARALLEL_BUDGET: u64 = 64 << 20;

struct Pass {
    decoder: Box<dyn Read + Send>,
    pos: u64,
}

impl<'a> LayerPasses<'a> {
    fn new(
        image: &'a Image,
        tree: &Tree,
        spill_dir: &Path,
        plan: Option<&Plan>,
        checkpoints: &[Option<Arc<Checkpoints>>],
    ) -> Result<Self> {
        let mut wanted = vec![Vec::new(); image.layers.len()];
        tree.walk(|_, id, first| {
            if first
                && plan.is_none_or(|p| p.writes(id))
                && let NodeKind::File(e) = &tree.node(id).kind
            {
                wanted[e.layer as usize].push((e.offset, e.stored(), id));
            }
            Ok(())
        })?;
        for w in &mut wanted {
            w.sort_unstable();
        }
        Ok(LayerPasses {
            image,
            passes: image.layers.iter().map(|_| None).collect(),
            next: vec![0; wanted.len()],
            wanted,
            spill: None,
            spill_dir: spill_dir.to_path_buf(),
            spill_len: 0,
            spilled: HashMap::new(),
            windows: Windows::new(image.layers.len()),
            parallel: parallel_plan(image, checkpoints),
        })
    }

    /// Copies the content of file `id` into `w`: a sparse file's stored runs with its holes
    /// filled in as zeros, so the output is a plain file of its real size.
    fn copy(&mut self, id: NodeId, extent: &Extent, w: &mut impl Write) -> Result<()> {
        let Some(map) = extent.sparse else {
            return self.copy_stored(id, extent, w);
        };
        let mut filled = Holes {
            inner: w,
            runs: map,
            pos: 0,
            left: 0,
        };
        self.copy_stored(id, extent, &mut filled)?;
        filled
            .zeros_to(extent.size)
            .map_err(|e| Error::io("output", e))
    }

    /// Copies the bytes the layer stores for file `id` into `w`.
    fn copy_stored(&mut self, id: NodeId, extent: &Extent, w: &mut impl Write) -> Result<()> {
        let stored = extent.stored();
        let li = extent.layer as usize;
        let layer = &self.image.layers[li];
        let layer_err = |e: io::Error| Error::Layer {
            layer: layer.label(),
            source: e,
        };
        if let Some(&at) = self.spilled.get(&id) {
            let spill = self.spill.as_ref().expect("spilled implies a spill file");
            return copy_range(|buf, pos| spill.read_at(buf, pos), at, stored, w)
                .map_err(|e| Error::io("spill file", e));
        }
        if layer.compression == Compression::None {
            // Random access is free: read in place.
            return self
                .windows
                .copy(li, &layer.blob, extent.offset, stored, w)
                .map_err(layer_err);
        }
        // Everything this layer delivers before our offset is wanted later: spill it.
        while let Some(&(off, size, other)) = self.wanted[li].get(self.next[li]) {
            self.next[li] += 1;
            if other == id {
                break;
            }
            if self.spill.is_none() {
                self.spill = Some(
                    tempfile::tempfile_in(&self.spill_dir)
                        .map_err(|e| Error::io(self.spill_dir.display(), e))?,
                );
            }
            let at = self.spill_len;
            let spill = self.spill.as_mut().expect("created above");
            let pass =
                pass_for(&mut self.passes[li], layer, &self.parallel[li]).map_err(layer_err)?;
            pass.read_to(
                off,
                size,
                &mut SpillWriter {
                    file: spill,
                    pos: at,
                },
            )
            .map_err(layer_err)?;
            self.spill_len += size;
            self.spilled.insert(other, at);
        }
        let pass = pass_for(&mut self.passes[li], layer, &self.parallel[li]).map_err(layer_err)?;
        pass.read_to(extent.offset, stored, w).map_err(layer_err)
    }
}

/// Which layers get a [`ParallelReader`], and its shape: compressed layers with checkpoints
/// (their index came from the cache), the biggest [`PARALLEL_LAYERS`] of them.
fn parallel_plan(image: &Image, checkpoints: &[Option<Arc<Checkpoints>>]) -> Vec<Option<Parallel>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut eligible: Vec<usize> = (0..image.layers.len())
        .filter(|&i| {
            image.layers[i].compression != Compression::None
                && checkpoints
                    .get(i)
                    .is_some_and(|c| c.as_ref().is_some_and(|c| !c.is_empty()))
        })
        .collect();
    // On one core the single worker still overlaps decompression with the tar walk.
    let mut plan: Vec<Option<Parallel>> = image.layers.iter().map(|_| None).collect();
    eligible.sort_by_key(|&i| std::cmp::Reverse(image.layers[i].blob.len()));
    eligible.truncate(PARALLEL_LAYERS);
    let share = PARALLEL_BUDGET / eligible.len().max(1) as u64;
    for i in eligible {
        let Some(Some(c)) = checkpoints.get(i) else {
            continue;
        };
        // Enough ranges ahead to keep every thread busy, within this layer's share.
        let range = par::RANGE.min(share / (2 * threads as u64)).max(256 << 10);
        plan[i] = Some(Parallel {
            checkpoints: Arc::clone(c),
            threads,
            range,
            ahead: ((share / range) as usize).clamp(2, 2 * threads),
        });
    }
    plan
}

fn pass_for<'p>(
    slot: &'p mut Option<Pass>,
    layer: &crate::source::Layer,
    parallel: &Option<Parallel>,
) -> io::Result<&'p mut Pass> {
    if slot.is_none() {
        let decoder: Box<dyn Read + Send> = match parallel {
            Some(p) => {
                log::info!(
                    "layer {}: decompressing on {} threads from {} checkpoints",
                    layer.label(),
                    p.threads,
                    p.checkpoints.len()
                );
                Box::new(ParallelReader::new(
                    layer.blob.clone(),
                    layer.compression,
                    Arc::clone(&p.checkpoints),
                    p.threads,
                    p.range,
                    p.ahead,
                )?)
            }
            None => Box::new(open_decoded(&layer.blob, layer.compression)?),
        };
        *slot = Some(Pass { decoder, pos: 0 });
    }
    Ok(slot.as_mut().expect("set above"))
}

impl Pass {
    /// Skips to `offset` and copies `size` bytes to `w`.
    fn read_to(&mut self, offset: u64, size: u64, w: &mut impl Write) -> io::Result<()> {
        debug_assert!(offset >= self.pos, "passes only move forward");
        let skip = offset - self.pos;
        let skipped = io::copy(&mut (&mut self.decoder).take(skip), &mut io::sink())?;
        let copied = io::copy(&mut (&mut self.decoder).take(size), w)?;
        self.pos += skipped + copied;
        if skipped + copied < skip + size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer ends inside a file",
            ));
        }
        Ok(())
    }
}

/// Puts a sparse file's stored runs, written to it in order, at their places in the file, with
/// zeros for the holes before each.
struct Holes<'a, W> {
    inner: W,
    runs: &'a [crate::layer::Segment],
    /// Bytes of the file written so far.
    pos: u64,
    /// Bytes left of the current run.
    left: u64,
}

impl<W: Write> Holes<'_, W> {
    /// Writes zeros up to `end` of the file.
    fn zeros_to(&mut self, end: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        while self.pos < end {
            // A hole can be terabytes: let a signal stop it.
            check_interrupt()?;
            let n = (end - self.pos).min(ZEROS.len() as u64) as usize;
            self.inner.write_all(&ZEROS[..n])?;
            self.pos += n as u64;
        }
        Ok(())
    }
}

impl<W: Write> Write for Holes<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let Some((run, rest)) = self.runs.split_first() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more stored bytes than the sparse map places",
                ));
            };
            self.runs = rest;
            self.zeros_to(run.logical)?;
            self.left = run.len;
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.inner.write_all(&buf[..n])?;
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct SpillWriter<'f> {
    file: &'f mut File,
    pos: u64,
}

impl Write for SpillWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Most bytes read ahead per layer read in place. Export visits a layer's files mostly in its
/// tar order, and most files in an image are small: one read per window instead of one per file
/// saves a system call per file.
const WINDOW: usize = 1 << 20;
/// Least bytes read ahead, for images of many layers.
const MIN_WINDOW: usize = 64 << 10;
/// What all windows together may hold: memory stays bounded however many layers an image has.
/// Export's walk in name order alternates between layers as often as they touch the same
/// directories (a file from layer 7, the next from layer 63), so every layer gets a window of
/// its own while that fits: with 4 windows, a 100-layer image refilled a 1 MiB window for
/// nearly every small file (12.6 GB read to export 150 MB, issue 15, item 4).
const WINDOWS_BUDGET: usize = 8 << 20;

/// Read-ahead windows over in-place layers, the least recently used one recycled.
struct Windows {
    windows: Vec<Window>,
    clock: u64,
    /// Bytes per window and most windows at once, from the number of layers.
    size: usize,
    max: usize,
    /// Bytes read into windows so far (a measure of read-ahead waste, for tests).
    filled: u64,
}

struct Window {
    layer: usize,
    buf: Vec<u8>,
    /// Where `buf` starts in the layer, and how much of it is filled.
    start: u64,
    len: usize,
    /// Where the last file read from this layer ended, to tell a forward walk from a jump.
    last_end: u64,
    used: u64,
}

impl Windows {
    /// Windows for an image of `layers` layers: one per layer within [`WINDOWS_BUDGET`].
    fn new(layers: usize) -> Self {
        let size = (WINDOWS_BUDGET / layers.max(1)).clamp(MIN_WINDOW, WINDOW);
        Windows {
            windows: Vec::new(),
            clock: 0,
            size,
            max: WINDOWS_BUDGET / size,
            filled: 0,
        }
    }

    /// Copies `size` bytes at `offset` of `blob` (layer `layer`) into `w`.
    fn copy(
        &mut self,
        layer: usize,
        blob: &crate::blob::Blob,
        offset: u64,
        size: u64,
        w: &mut impl Write,
    ) -> io::Result<()> {
        if size == 0 {
            // Nothing to read, and no reason to move a window for it.
            return Ok(());
        }
        self.clock += 1;
        let slot = match self.windows.iter().position(|win| win.layer == layer) {
            Some(i) => i,
            None if self.windows.len() < self.max => {
                self.windows.push(Window {
                    layer,
                    buf: Vec::new(),
                    start: 0,
                    len: 0,
                    last_end: 0,
                    used: 0,
                });
                self.windows.len() - 1
            }
            None => {
                let (i, _) = self
                    .windows
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, win)| win.used)
                    .expect("max > 0");
                self.windows[i] = Window {
                    layer,
                    buf: std::mem::take(&mut self.windows[i].buf),
                    start: 0,
                    len: 0,
                    last_end: 0,
                    used: 0,
                };
                i
            }
        };
        let window = self.size;
        let win = &mut self.windows[slot];
        win.used = self.clock;
        let end = offset.checked_add(size).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "file extent out of range")
        })?;
        let forward = offset >= win.last_end && offset - win.last_end < window as u64;
        win.last_end = end;
        let inside = offset >= win.start && end <= win.start + win.len as u64;
        if !inside && (!forward || size > window as u64 / 2) {
            // A jump or a big file: reading ahead would fetch bytes nobody asked for.
            return copy_range(|buf, pos| blob.read_at(buf, pos), offset, size, w);
        }
        if !inside {
            // Describes nothing until the refill succeeds.
            win.len = 0;
            win.buf.resize(window, 0);
            let want = (blob.len().saturating_sub(offset)).min(window as u64) as usize;
            let mut filled = 0;
            while filled < want {
                check_interrupt()?;
                match blob.read_at(&mut win.buf[filled..want], offset + filled as u64)? {
                    0 => break,
                    n => filled += n,
                }
            }
            win.start = offset;
            win.len = filled;
            self.filled += filled as u64;
            if (filled as u64) < size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob ends inside a file",
                ));
            }
        }
        let at = (offset - win.start) as usize;
        w.write_all(&win.buf[at..at + size as usize])
    }
}

/// Copies `len` bytes read by positioned reads from `start` into `w`.
fn copy_range(
    read_at: impl Fn(&mut [u8], u64) -> io::Result<usize>,
    start: u64,
    len: u64,
    w: &mut impl Write,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        check_interrupt()?;
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = read_at(&mut buf[..want], start + done)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob ends inside a file",
            ));
        }
        w.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob_of(data: &[u8]) -> crate::blob::Blob {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        crate::blob::Blob::new(std::sync::Arc::new(f), 0, data.len() as u64, "blob")
    }

    #[test]
    fn windows_give_the_bytes_asked_for_in_any_order() {
        let data: Vec<u8> = (0..3 * WINDOW as u32 + 77)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut windows = Windows::new(1);
        assert_eq!(windows.size, WINDOW);
        let blobs: Vec<_> = (0..windows.max + 2).map(|_| blob_of(&data)).collect();
        // Forward in small steps, a jump back, a big file, a zero-size one, the very end, and
        // more layers than there are windows, interleaved.
        let reads = [
            (0, 10),
            (600, 1000),
            (5000, 0),
            (WINDOW as u64 - 10, 100),
            (100, 50),
            (WINDOW as u64, WINDOW as u64 + 5),
            (data.len() as u64 - 77, 77),
        ];
        for (layer, blob) in blobs.iter().enumerate() {
            for &(off, len) in &reads {
                let mut out = Vec::new();
                windows.copy(layer, blob, off, len, &mut out).unwrap();
                assert_eq!(out, data[off as usize..(off + len) as usize], "{off}+{len}");
            }
        }
        assert!(windows.windows.len() <= windows.max);
    }

    #[test]
    fn a_walk_alternating_between_a_hundred_layers_reads_each_about_once() {
        // 100 layers of 300 small files each, read as export's walk in name order reads an
        // image whose layers all touch the same directories: one file from each layer in turn.
        let (layers, files, size) = (100, 300u64, 1500u64);
        let data: Vec<u8> = (0..files * size).map(|i| (i % 251) as u8).collect();
        let blobs: Vec<_> = (0..layers).map(|_| blob_of(&data)).collect();
        let mut windows = Windows::new(layers);
        assert!(windows.size * layers <= WINDOWS_BUDGET && windows.max >= layers);
        for f in 0..files {
            for (layer, blob) in blobs.iter().enumerate() {
                let mut out = Vec::new();
                windows.copy(layer, blob, f * size, size, &mut out).unwrap();
                assert!(out[..] == data[(f * size) as usize..((f + 1) * size) as usize]);
            }
        }
        let total = (layers as u64) * files * size;
        assert!(
            windows.filled <= total + total / 10,
            "read {} bytes into windows for {total} bytes of files",
            windows.filled
        );
    }

    #[test]
    fn a_window_past_the_end_of_the_blob_is_an_error() {
        let blob = blob_of(&[1; 1000]);
        let mut windows = Windows::new(1);
        windows.copy(0, &blob, 0, 10, &mut Vec::new()).unwrap();
        let e = windows
            .copy(0, &blob, 900, 200, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"a");
        assert_eq!(v, b"9 path=a\n");
        let mut v = Vec::new();
        pax_record(&mut v, b"k", &[b'x'; 95]);
        // 1 + 1 + 95 + 3 = 100 bytes + "100" would be 103; the length must equal the record.
        assert_eq!(v.len().to_string(), String::from_utf8_lossy(&v[..3]));
    }

    #[test]
    fn pax_times_round_trip_sign() {
        assert_eq!(pax_time(5, 0), "5");
        assert_eq!(pax_time(5, 500_000_000), "5.5");
        assert_eq!(pax_time(-2, 750_000_000), "-1.25");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
