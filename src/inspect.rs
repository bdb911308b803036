//! Consumers that explain an image without mounting it: `inspect` (config, per-layer numbers,
//! the waste flattening removes), `diff` (what a layer range changed), `ls` and `cat`.

use std::collections::HashMap;
use std::io::Write;

use serde::Serialize;
use serde_json::Value;

use crate::content::Content;
use crate::error::{Error, Result};
use crate::layer::{Kind, LayerIndex};
use crate::source::{Family, Image};
use crate::tree::{Merger, NodeId, NodeKind, ROOT, Tree};

/// Everything `flatfs inspect` reports; its JSON form is documented in docs/inspect-json.md.
#[derive(Debug, Serialize)]
pub struct Inspect {
    /// The IMAGE argument.
    pub image: String,
    /// `docker-archive`, `oci-layout` or `oci-archive`.
    pub format: String,
    /// `os/arch[/variant]` from the config.
    pub platform: String,
    /// Manifest digest (the image ID for docker archives, which carry no manifest blob).
    pub manifest_digest: String,
    /// Config digest.
    pub config_digest: String,
    /// Tags the image carries.
    pub tags: Vec<String>,
    /// The runtime config fields people look for.
    pub config: RuntimeConfig,
    /// One row per layer, bottom first.
    pub layers: Vec<LayerRow>,
    /// History entries that made no layer and come after the last layer (e.g. `CMD`).
    pub trailing_history: Vec<String>,
    /// Sums over the merged tree.
    pub totals: Totals,
}

/// Cmd, Entrypoint, Env, WorkingDir, User, ExposedPorts.
#[derive(Debug, Serialize, Default)]
pub struct RuntimeConfig {
    /// Entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// Cmd.
    pub cmd: Option<Vec<String>>,
    /// Env.
    pub env: Vec<String>,
    /// WorkingDir.
    pub working_dir: Option<String>,
    /// User.
    pub user: Option<String>,
    /// ExposedPorts keys.
    pub exposed_ports: Vec<String>,
}

/// One layer's numbers.
#[derive(Debug, Serialize)]
pub struct LayerRow {
    /// 1-based, bottom first (as in `mount --layers`).
    pub number: usize,
    /// Blob digest (or diff_id where the blob has none).
    pub digest: String,
    /// Bytes of the stored blob.
    pub compressed_size: u64,
    /// Bytes of the uncompressed tar.
    pub uncompressed_size: u64,
    /// Tar entries (not counting whiteouts).
    pub entries: u64,
    /// Non-directory entries at paths that did not exist below.
    pub added: u64,
    /// Non-directory entries that replace something from below.
    pub changed: u64,
    /// Whiteouts and opaque markers that removed something from below.
    pub whited_out: u64,
    /// File bytes from lower layers this layer deletes or replaces: the waste flattening removes.
    pub removed_bytes: u64,
    /// This layer's own file bytes that are hidden in the final image.
    pub hidden_bytes: u64,
    /// History lines with `empty_layer` just before this layer (ENV, LABEL, …).
    pub empty_history_before: Vec<String>,
    /// The history `created_by` that made this layer.
    pub created_by: Option<String>,
}

/// Sums over the merged image.
#[derive(Debug, Serialize)]
pub struct Totals {
    /// Names in the merged tree (hardlinks count per name).
    pub entries: u64,
    /// Bytes of regular-file content in the merged tree (each inode once).
    pub merged_size: u64,
    /// Bytes of all layer tars, uncompressed.
    pub layers_uncompressed: u64,
    /// Bytes of all layer blobs as stored.
    pub layers_compressed: u64,
    /// Size of the flat layer tar (uncompressed): headers, padded contents, end marker.
    pub flat_size: u64,
    /// Sum of `removed_bytes`: what flattening saves.
    pub waste: u64,
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    v?.as_array().map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    })
}

/// Computes the report from an opened image and its layer indexes.
pub fn inspect(image: &Image, indexes: &[LayerIndex]) -> Result<Inspect> {
    let cfg = &image.config;
    let field = |k: &str| {
        cfg.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut platform = format!("{}/{}", field("os"), field("architecture"));
    if !field("variant").is_empty() {
        platform = format!("{platform}/{}", field("variant"));
    }
    let rc = cfg.get("config");
    let get = |k: &str| rc.and_then(|c| c.get(k));
    let config = RuntimeConfig {
        entrypoint: strings(get("Entrypoint")),
        cmd: strings(get("Cmd")),
        env: strings(get("Env")).unwrap_or_default(),
        working_dir: get("WorkingDir")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        user: get("User")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        exposed_ports: get("ExposedPorts")
            .and_then(|v| v.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    };

    // History: empty_layer entries sit between the layers they were made between.
    let history: Vec<(bool, String)> = cfg
        .get("history")
        .and_then(|h| h.as_array())
        .map(|a| {
            a.iter()
                .map(|h| {
                    let empty = h
                        .get("empty_layer")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false);
                    let by = h
                        .get("created_by")
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string();
                    (empty, by)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut hist = history.into_iter();

    let mut merger = Merger::new();
    let mut layers = Vec::with_capacity(indexes.len());
    for (i, (index, layer)) in indexes.iter().zip(&image.layers).enumerate() {
        let mut row = LayerRow {
            number: i + 1,
            digest: layer
                .digest
                .clone()
                .or_else(|| layer.diff_id.clone())
                .unwrap_or_default(),
            compressed_size: layer.blob.len(),
            uncompressed_size: index.tar_size,
            entries: index.entries.len() as u64,
            added: 0,
            changed: 0,
            whited_out: 0,
            removed_bytes: 0,
            hidden_bytes: 0,
            empty_history_before: Vec::new(),
            created_by: None,
        };
        for (empty, by) in hist.by_ref() {
            if empty {
                row.empty_history_before.push(by);
            } else {
                row.created_by = Some(by);
                break;
            }
        }
        for w in index.whiteouts.iter().chain(&index.opaques) {
            if merger.exists(w) {
                row.whited_out += 1;
            }
        }
        for e in &index.entries {
            if e.kind == Kind::Dir {
                continue;
            }
            if merger.exists(&e.path) {
                row.changed += 1;
            } else {
                row.added += 1;
            }
        }
        // Counted as names go, not by comparing the tree before and after each layer, which
        // cost layers x entries (issue 15, item 4).
        row.removed_bytes = merger.apply(index)?;
        layers.push(row);
    }
    let trailing_history = hist.map(|(_, by)| by).collect();

    // Hidden: a layer's file contents that did not survive to the top.
    let visible = &merger.file_extents();
    for (i, index) in indexes.iter().enumerate() {
        layers[i].hidden_bytes = index
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File && !visible.contains_key(&(i as u32, e.offset)))
            .map(|e| e.size)
            .sum();
    }
    let tree = merger.finish();
    let mut entries = 0u64;
    let mut flat_size = 1024u64;
    tree.walk(|_, id, first| {
        entries += 1;
        flat_size += 512;
        if first && let NodeKind::File(e) = &tree.node(id).kind {
            flat_size += e.size.next_multiple_of(512);
        }
        Ok(())
    })?;
    let totals = Totals {
        entries,
        merged_size: visible.values().sum(),
        layers_uncompressed: indexes.iter().map(|i| i.tar_size).sum(),
        layers_compressed: image.layers.iter().map(|l| l.blob.len()).sum(),
        flat_size,
        waste: layers.iter().map(|l| l.removed_bytes).sum(),
    };
    Ok(Inspect {
        image: image.name.clone(),
        format: match (image.family, image.archive) {
            (Family::Docker, _) => "docker-archive",
            (Family::Oci, true) => "oci-archive",
            (Family::Oci, false) => "oci-layout",
        }
        .to_string(),
        platform,
        manifest_digest: image.manifest_digest.clone(),
        config_digest: image.config_digest.clone(),
        tags: image.tags.clone(),
        config,
        layers,
        trailing_history,
        totals,
    })
}

/// Human-readable byte counts (powers of 1024), e.g. `1.5 MiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Writes the report as text.
pub fn write_text(r: &Inspect, w: &mut impl Write) -> std::io::Result<()> {
    writeln!(w, "Image:     {}", r.image)?;
    writeln!(w, "Format:    {}", r.format)?;
    writeln!(w, "Platform:  {}", r.platform)?;
    if !r.tags.is_empty() {
        writeln!(w, "Tags:      {}", r.tags.join(", "))?;
    }
    writeln!(w, "Manifest:  {}", r.manifest_digest)?;
    writeln!(w, "Config:    {}", r.config_digest)?;
    let c = &r.config;
    if let Some(e) = &c.entrypoint {
        writeln!(
            w,
            "Entrypoint: {}",
            serde_json::to_string(e).unwrap_or_default()
        )?;
    }
    if let Some(cmd) = &c.cmd {
        writeln!(
            w,
            "Cmd:       {}",
            serde_json::to_string(cmd).unwrap_or_default()
        )?;
    }
    if let Some(d) = &c.working_dir {
        writeln!(w, "WorkingDir: {d}")?;
    }
    if let Some(u) = &c.user {
        writeln!(w, "User:      {u}")?;
    }
    if !c.exposed_ports.is_empty() {
        writeln!(w, "Ports:     {}", c.exposed_ports.join(" "))?;
    }
    for e in &c.env {
        writeln!(w, "Env:       {e}")?;
    }
    writeln!(w)?;
    // One column layout for the header, the layer rows and the history-only rows.
    let row = |w: &mut dyn Write, cells: [&str; 9], last: &str| {
        writeln!(
            w,
            "{:>3}  {:<12}  {:>10}  {:>10}  {:>7}  {:>6}  {:>6}  {:>6}  {:>10}  {last}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8]
        )
    };
    let header = [
        "#",
        "DIGEST",
        "COMPRESSED",
        "SIZE",
        "ENTRIES",
        "ADDED",
        "CHANGED",
        "WHITED",
        "REMOVES",
    ];
    row(w, header, "CREATED BY")?;
    for l in &r.layers {
        for h in &l.empty_history_before {
            row(w, [""; 9], &one_line(h))?;
        }
        let short = l.digest.split(':').nth(1).unwrap_or(&l.digest);
        let cells = [
            l.number.to_string(),
            short[..short.len().min(12)].to_string(),
            human(l.compressed_size),
            human(l.uncompressed_size),
            l.entries.to_string(),
            l.added.to_string(),
            l.changed.to_string(),
            l.whited_out.to_string(),
            human(l.removed_bytes),
        ];
        row(
            w,
            cells.each_ref().map(String::as_str),
            &one_line(l.created_by.as_deref().unwrap_or("")),
        )?;
    }
    for h in &r.trailing_history {
        row(w, [""; 9], &one_line(h))?;
    }
    let t = &r.totals;
    writeln!(w)?;
    writeln!(
        w,
        "Merged:    {} entries, {} of file content",
        t.entries,
        human(t.merged_size)
    )?;
    writeln!(
        w,
        "Layers:    {} uncompressed ({} stored)",
        human(t.layers_uncompressed),
        human(t.layers_compressed)
    )?;
    writeln!(
        w,
        "Flat:      {} uncompressed layer; flattening removes {}",
        human(t.flat_size),
        human(t.waste)
    )?;
    Ok(())
}

fn one_line(s: &str) -> String {
    let s = s.trim().replace('\n', " ");
    let s = s
        .strip_prefix("/bin/sh -c #(nop) ")
        .unwrap_or(&s)
        .to_string();
    if s.chars().count() > 70 {
        format!("{}…", s.chars().take(69).collect::<String>())
    } else {
        s
    }
}

/// One line of `diff` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `+` added, `~` modified, `-` deleted.
    pub op: char,
    /// Path (lossy UTF-8 for display).
    pub path: String,
    /// File size after (added/modified) or before (deleted); 0 for non-files.
    pub size: u64,
}

/// What a node looks like for comparison: type, data identity, metadata.
fn fingerprint(tree: &Tree, id: NodeId) -> String {
    let n = tree.node(id);
    let kind = match &n.kind {
        NodeKind::Dir(_) => "d".to_string(),
        NodeKind::File(e) => format!("f{}:{}:{}", e.layer, e.offset, e.size),
        NodeKind::Symlink(t) => format!("l{t:?}"),
        NodeKind::Char(a, b) => format!("c{a},{b}"),
        NodeKind::Block(a, b) => format!("b{a},{b}"),
        NodeKind::Fifo => "p".into(),
    };
    format!("{kind} {:?} {:?}", n.meta, n.xattrs)
}

fn paths(tree: &Tree) -> Result<Vec<(Vec<u8>, NodeId)>> {
    let mut v = Vec::with_capacity(tree.len());
    tree.walk(|p, id, _| {
        if !p.is_empty() {
            v.push((p.to_vec(), id));
        }
        Ok(())
    })?;
    Ok(v)
}

/// Changes from tree `a` to tree `b`, in `b`'s walk order with deletions where they were.
pub fn diff(a: &Tree, b: &Tree) -> Result<Vec<Change>> {
    let pa = paths(a)?;
    let pb = paths(b)?;
    let index_a: HashMap<&[u8], NodeId> = pa.iter().map(|(p, id)| (p.as_slice(), *id)).collect();
    let index_b: HashMap<&[u8], NodeId> = pb.iter().map(|(p, id)| (p.as_slice(), *id)).collect();
    let mut out = Vec::new();
    for (p, id) in &pb {
        let change = match index_a.get(p.as_slice()) {
            None => Some('+'),
            Some(old) if fingerprint(a, *old) != fingerprint(b, *id) => Some('~'),
            Some(_) => None,
        };
        if let Some(op) = change {
            out.push(Change {
                op,
                path: String::from_utf8_lossy(p).into_owned(),
                size: b.node(*id).size(),
            });
        }
    }
    for (p, id) in &pa {
        if !index_b.contains_key(p.as_slice()) {
            out.push(Change {
                op: '-',
                path: String::from_utf8_lossy(p).into_owned(),
                size: a.node(*id).size(),
            });
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// Resolves a path inside the image, following symlinks (never outside the image root).
pub fn resolve_following(tree: &Tree, path: &[u8]) -> Result<NodeId> {
    const MAX_LINKS: usize = 40;
    let not_found = |msg: &str| Error::invalid(String::from_utf8_lossy(path), msg);
    let mut pending: Vec<Vec<u8>> = components(path);
    pending.reverse();
    let mut stack: Vec<NodeId> = vec![ROOT];
    let mut links = 0;
    while let Some(comp) = pending.pop() {
        let cur = *stack.last().expect("the root is never popped");
        match comp.as_slice() {
            b"." => continue,
            b".." => {
                // `..` at the root stays at the root, as in a chroot.
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        if !tree.node(cur).is_dir() {
            return Err(not_found("not a directory"));
        }
        let child = tree
            .lookup(cur, &comp)
            .ok_or_else(|| not_found("no such file or directory"))?;
        if let NodeKind::Symlink(target) = &tree.node(child).kind {
            links += 1;
            if links > MAX_LINKS {
                return Err(not_found("too many levels of symbolic links"));
            }
            if target.starts_with(b"/") {
                stack.truncate(1);
            }
            let mut t = components(target);
            t.reverse();
            pending.extend(t);
            continue;
        }
        stack.push(child);
    }
    Ok(*stack.last().expect("the root is never popped"))
}

fn components(p: &[u8]) -> Vec<Vec<u8>> {
    p.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Copies a regular file's content to `w`.
pub fn cat(tree: &Tree, content: &Content, path: &[u8], w: &mut impl Write) -> Result<()> {
    let id = resolve_following(tree, path)?;
    let NodeKind::File(extent) = &tree.node(id).kind else {
        return Err(Error::invalid(
            String::from_utf8_lossy(path),
            "not a regular file",
        ));
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < extent.size {
        let n = content
            .read_at(extent, off, &mut buf)
            .map_err(|e| Error::io(String::from_utf8_lossy(path), e))?;
        if n == 0 {
            return Err(Error::invalid(
                String::from_utf8_lossy(path),
                "layer ends inside the file",
            ));
        }
        w.write_all(&buf[..n]).map_err(|e| Error::io("stdout", e))?;
        off += n as u64;
    }
    Ok(())
}
