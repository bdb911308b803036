//! Consumers that explain an image without mounting it: `inspect` (config, per-layer numbers,
//! the waste flattening removes), `diff` (what a layer range changed), `ls` and `cat`.

use std::io::Write;

use serde::Serialize;
use serde_json::Value;

use crate::changes::{Event, Status};
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
    /// `docker-archive`, `oci-layout`, `oci-archive` or `registry`.
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
    /// Where the base image seems to end, when the history says so (see [`guess_base`]).
    pub base: Option<BaseGuess>,
}

/// The layers a partial squash would keep as the base, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseGuess {
    /// `export --keep N`: the base is layers 1..=N.
    pub keep: usize,
    /// What in the history says so.
    pub reason: String,
}

/// Where the base image ends, read from the history, or `None` when it does not say. Two
/// signs, in this order:
/// 1. A base image's build ends with its `CMD` or `ENTRYPOINT`, a history entry without a
///    layer. When more layers follow one, they are a later build's (a Dockerfile's `FROM`):
///    the base is the layers before the last such entry.
/// 2. Failing that, a pause between two layers that is at least an hour and longer than all
///    the layers after it took to build: one build stopped there and another began later.
pub fn guess_base(history: &[Value], layers: usize) -> Option<BaseGuess> {
    let mut seen = 0;
    let mut found = None;
    let mut pending = None;
    let mut created: Vec<Option<i64>> = Vec::new();
    for h in history {
        let empty = h.get("empty_layer").and_then(Value::as_bool) == Some(true);
        if empty {
            let by = h.get("created_by").and_then(Value::as_str).unwrap_or("");
            let by = by.trim();
            let step = by
                .strip_prefix("/bin/sh -c #(nop)")
                .unwrap_or(by)
                .trim_start();
            if (step.starts_with("CMD") || step.starts_with("ENTRYPOINT")) && seen > 0 {
                pending = Some((seen, one_line(step)));
            }
        } else {
            // A layer after the CMD: that CMD ended an earlier build.
            found = pending.take().or(found);
            seen += 1;
            created.push(
                h.get("created")
                    .and_then(Value::as_str)
                    .and_then(parse_rfc3339),
            );
        }
    }
    if seen != layers {
        // History and layers disagree: the history says nothing reliable about them.
        return None;
    }
    if let Some((keep, step)) = found {
        return Some(BaseGuess {
            keep,
            reason: format!(
                "`{step}` ends a build after layer {keep}; the layers above it are another build's"
            ),
        });
    }
    let times: Vec<i64> = created.into_iter().collect::<Option<_>>()?;
    let last = *times.last()?;
    let (keep, gap) = times
        .windows(2)
        .enumerate()
        .map(|(i, w)| (i + 1, w[1] - w[0]))
        .max_by_key(|&(i, gap)| (gap, std::cmp::Reverse(i)))?;
    let rest = last - times[keep];
    (gap >= 3600 && gap > rest).then(|| BaseGuess {
        keep,
        reason: format!(
            "layer {} was made {} after layer {keep}, and the {} layers from it on took {}",
            keep + 1,
            duration(gap),
            layers - keep,
            duration(rest)
        ),
    })
}

/// `3 days`, `5 h`, `12 min`, `40 s`: the largest unit that fits.
fn duration(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{} h", s / 3600),
        s if s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2024-01-02T03:04:05.5+01:00`); fractions are
/// dropped. `None` for anything else.
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let num = |r| num_at(t, r);
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let mut rest = &t[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (num_at(rest, 1..3)? * 3600 + num_at(rest, 4..6)? * 60)
        }
        _ => return None,
    };
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss - offset)
}

/// The decimal number at `r` of `s`, digits only.
fn num_at(s: &str, r: std::ops::Range<usize>) -> Option<i64> {
    let s = s.get(r)?;
    s.bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| s.parse().ok())?
}

/// Cmd, Entrypoint, Env, WorkingDir, User, ExposedPorts, Labels.
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
    /// Labels, by key (string values only, as the config holds them).
    pub labels: std::collections::BTreeMap<String, String>,
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
        labels: get("Labels")
            .and_then(|v| v.as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
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
            // Pulled into the blob store and opened as a layout, but it came from a registry.
            _ if image.name.starts_with("docker://") => "registry",
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
        base: cfg
            .get("history")
            .and_then(Value::as_array)
            .and_then(|h| guess_base(h, image.layers.len())),
    })
}

/// Human-readable byte counts (powers of 1024), e.g. `1.5 MiB`.
/// Parses a byte count as `human` writes it, roughly: `1073741824`, `1G`, `1GiB`, `512 MiB`
/// (K, M, G, T are powers of 1024, with or without `iB`/`B`).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or(unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// The byte count in environment variable `var` (see `parse_bytes`), else `default`; a value
/// that does not parse is said once (`FLATFS_CONTENT_CACHE_MAX=2X` silently meaning the
/// default would surprise whoever set it).
pub fn env_bytes(var: &'static str, default: u64) -> u64 {
    static WARNED: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());
    let Ok(value) = std::env::var(var) else {
        return default;
    };
    parse_bytes(&value).unwrap_or_else(|| {
        let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        if !warned.contains(&var) {
            warned.push(var);
            log::warn!(
                "${var}={value:?} is not a size (bytes, or with K, M, G, T): using {}",
                human(default)
            );
        }
        default
    })
}

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
    // Labels padded to the longest ("Entrypoint:"), so every value starts in one column.
    let field = |w: &mut dyn Write, label: &str, value: &str| writeln!(w, "{label:<12}{value}");
    let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_default();
    field(w, "Image:", &r.image)?;
    field(w, "Format:", &r.format)?;
    field(w, "Platform:", &r.platform)?;
    if !r.tags.is_empty() {
        field(w, "Tags:", &r.tags.join(", "))?;
    }
    // A docker archive's manifest.json has no digest: the one recorded is the image ID's.
    if r.format != "docker-archive" {
        field(w, "Manifest:", &r.manifest_digest)?;
    }
    field(w, "Image ID:", &r.config_digest)?;
    let c = &r.config;
    if let Some(e) = &c.entrypoint {
        field(w, "Entrypoint:", &json(e))?;
    }
    if let Some(cmd) = &c.cmd {
        field(w, "Cmd:", &json(cmd))?;
    }
    if let Some(d) = &c.working_dir {
        field(w, "WorkingDir:", d)?;
    }
    if let Some(u) = &c.user {
        field(w, "User:", u)?;
    }
    if !c.exposed_ports.is_empty() {
        field(w, "Ports:", &c.exposed_ports.join(" "))?;
    }
    for e in &c.env {
        field(w, "Env:", e)?;
    }
    for (k, v) in &c.labels {
        field(w, "Label:", &format!("{k}={v}"))?;
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
    field(
        w,
        "Merged:",
        &format!(
            "{} entries, {} of file content",
            t.entries,
            human(t.merged_size)
        ),
    )?;
    field(
        w,
        "Layers:",
        &format!(
            "{} uncompressed ({} stored)",
            human(t.layers_uncompressed),
            human(t.layers_compressed)
        ),
    )?;
    field(
        w,
        "Flat:",
        &format!(
            "{} uncompressed layer; flattening removes {}",
            human(t.flat_size),
            human(t.waste)
        ),
    )?;
    if let Some(b) = &r.base {
        writeln!(
            w,
            "Base:      layers 1-{} look like the base image: `flatfs export --keep {}` keeps them ({})",
            b.keep, b.keep, b.reason
        )?;
    }
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

/// Changes from tree `a` to tree `b` (see [`crate::changes::compare`]), sorted by path; every
/// deleted name is listed, also those under a deleted directory.
pub fn diff(a: &Tree, b: &Tree) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    crate::changes::compare(a, b, |e| {
        let (op, path, size) = match *e {
            Event::Name { path: [], .. } => return Ok(()),
            Event::Name {
                path, id, status, ..
            } => match status {
                Status::Same => return Ok(()),
                Status::Added => ('+', path, b.node(id).size()),
                Status::Modified => ('~', path, b.node(id).size()),
            },
            Event::Removed { path, id, .. } => ('-', path, a.node(id).size()),
        };
        out.push(Change {
            op,
            path: String::from_utf8_lossy(path).into_owned(),
            size,
        });
        Ok(())
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_do_not() {
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes(" 1000000 "), Some(1_000_000));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("512 mb"), Some(512 << 20));
        assert_eq!(parse_bytes("1t"), Some(1 << 40));
        assert_eq!(parse_bytes("64K"), Some(64 << 10));
        for bad in ["", "abc", "2X", "G", "-1", "1.5G", "99999999999T"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_parses_back_what_export_writes_and_offsets() {
        for secs in [0, 951_782_400, 1_700_000_000, -86_401] {
            assert_eq!(parse_rfc3339(&crate::export::rfc3339(secs)), Some(secs));
        }
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.123456789+01:00"),
            Some(1_700_000_000)
        );
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T00:00:00Z",
            "2023-11-14T00:00:00",
            "x023-11-14T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn layer(created: &str, by: &str) -> Value {
        json!({"created": created, "created_by": by})
    }

    fn empty(created: &str, by: &str) -> Value {
        json!({"created": created, "created_by": by, "empty_layer": true})
    }

    #[test]
    fn a_cmd_followed_by_layers_ends_the_base() {
        let t = "2024-01-01T00:00:00Z";
        let h = [
            layer(t, "/bin/sh -c #(nop) ADD file:abc in / "),
            empty(t, "/bin/sh -c #(nop)  CMD [\"bash\"]"),
            layer(t, "RUN apt-get update"),
            empty(t, "ENV A=b"),
            layer(t, "COPY . /app"),
            empty(t, "CMD [\"/app/run\"]"),
        ];
        let g = guess_base(&h, 3).expect("a guess");
        assert_eq!(g.keep, 1);
        assert!(g.reason.contains("CMD [\"bash\"]"), "{}", g.reason);
        // The history does not describe these layers: no guess.
        assert_eq!(guess_base(&h, 4), None);
    }

    #[test]
    fn a_long_pause_before_a_quick_build_ends_the_base() {
        let h = [
            layer("2024-01-01T00:00:00Z", "ADD rootfs"),
            layer("2024-01-01T00:05:00Z", "RUN install"),
            layer("2024-03-01T10:00:00Z", "RUN app"),
            layer("2024-03-01T10:02:00Z", "COPY app"),
        ];
        let g = guess_base(&h, 4).expect("a guess");
        assert_eq!(g.keep, 2, "{}", g.reason);
        // Evenly spread steps, or no times: nothing to say.
        let even = [
            layer("2024-01-01T00:00:00Z", "a"),
            layer("2024-01-01T02:00:00Z", "b"),
            layer("2024-01-01T04:00:00Z", "c"),
        ];
        assert_eq!(guess_base(&even, 3), None);
        assert_eq!(guess_base(&[json!({}), json!({})], 2), None);
    }
}
