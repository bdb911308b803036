//! `flatfs ls`: the merged tree listed like `ls` (or `tar tv` with -R).

use std::collections::HashMap;
use std::io::{self, Write};

use anyhow::Result;
use clap::Args;

use super::ui::{Ui, UiArgs};
use crate::export;
use crate::inspect;
use crate::layer::LayerIndex;
use crate::source::Platform;
use crate::tree::{Node, NodeId, NodeKind, ROOT, Tree};

/// List the merged tree, like `ls` (or `tar tv` with -R).
#[derive(Args, Debug)]
pub struct LsArgs {
    /// The image.
    image: String,
    /// A path in the image; symlinks in it are followed inside the image (one at the end is
    /// shown itself with -l, unless PATH ends in `/`).
    #[arg(default_value = "/")]
    path: String,
    /// Long format: mode, links, owner, size, mtime.
    #[arg(short, long)]
    long: bool,
    /// Everything below PATH, with full paths.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Add the layer each entry comes from (1 = bottom; `-` for a directory no layer has).
    #[arg(long)]
    layer: bool,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<Platform>,
    /// List the image as it was after its first N layers.
    #[arg(long, value_name = "N", value_parser = layer_count)]
    layers: Option<usize>,
    #[command(flatten)]
    pub ui: UiArgs,
}

/// Runs `flatfs ls`.
pub fn run(ui: &Ui, args: LsArgs) -> Result<()> {
    let LsArgs {
        image,
        path,
        long,
        recursive,
        layer,
        platform,
        layers,
        ..
    } = args;
    let opened = ui.open(&image, platform.as_ref(), layers, None)?;
    let tree = &opened.tree;
    let (id, canonical) = resolve(tree, &path, long)?;
    // Hardlinked names share one node, which knows only the layer of the first name: the layer
    // that added a name is read from the layer indexes (see "Which layer" in docs/guide.md).
    let name_layers = if layer {
        Some(name_layers(&ui.index(&opened.image, layers, None)?))
    } else {
        None
    };
    let layer_of = |canonical: &[u8], id: NodeId| -> u32 {
        name_layers
            .as_ref()
            .and_then(|m| m.get(canonical).copied())
            .unwrap_or(tree.node(id).layer)
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let show = |out: &mut dyn Write, name: &[u8], canonical: &[u8], id: NodeId| -> io::Result<()> {
        let node = tree.node(id);
        if layer {
            match layer_of(canonical, id) {
                0 => write!(out, "{:>3} ", "-")?,
                n => write!(out, "{n:>3} ")?,
            }
        }
        if long {
            write!(
                out,
                "{} {:>3} {:>5} {:>5} {:>10} {} ",
                mode_string(node),
                node.nlink,
                node.meta.uid,
                node.meta.gid,
                match node.kind {
                    NodeKind::Char(a, b) | NodeKind::Block(a, b) => format!("{a}, {b}"),
                    _ => node.size().to_string(),
                },
                short_time(node.meta.mtime)
            )?;
        }
        out.write_all(if name.is_empty() { b"." } else { name })?;
        if long && let NodeKind::Symlink(t) = &node.kind {
            out.write_all(b" -> ")?;
            out.write_all(t)?;
        }
        out.write_all(b"\n")
    };
    if recursive {
        let mut err = None;
        let prefix = path.trim_matches('/').as_bytes();
        subtree_walk(tree, id, &mut |rel, child| {
            let (shown, real) = (join(prefix, rel), join(&canonical, rel));
            if let Err(e) = show(&mut out, &shown, &real, child) {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
    } else if tree.node(id).is_dir() {
        for (name, child) in tree.children(id) {
            show(&mut out, name, &join(&canonical, name), child)?;
        }
    } else {
        // The path as given, as ls prints its operands.
        show(&mut out, path.as_bytes(), &canonical, id)?;
    }
    out.flush()?;
    Ok(())
}

/// The node `path` names, and its path with symlinks resolved. Symlinks on the way are
/// followed inside the image; one at the end too, except with `-l` and no trailing `/`, where
/// ls shows the link itself.
fn resolve(tree: &Tree, path: &str, long: bool) -> Result<(NodeId, Vec<u8>)> {
    let trimmed = path.trim_end_matches('/');
    let (parent, last) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if !last.is_empty() && last != "." && last != ".." {
        let dir = inspect::resolve_following(tree, parent.as_bytes())?;
        if tree.node(dir).is_dir()
            && let Some(id) = tree.lookup(dir, last.as_bytes())
        {
            // The name looked up, not the node's first name: hardlinks share the node.
            let here = join(&canonical_path(tree, dir), last.as_bytes());
            match tree.node(id).kind {
                NodeKind::Symlink(_) if long && !path.ends_with('/') => return Ok((id, here)),
                NodeKind::Symlink(_) => {}
                _ => return Ok((id, here)),
            }
        }
    }
    let id = inspect::resolve_following(tree, path.as_bytes())?;
    Ok((id, canonical_path(tree, id)))
}

/// Where a node is in the image, by the names of its (first) parents: symlinks resolved.
fn canonical_path(tree: &Tree, id: NodeId) -> Vec<u8> {
    let mut names: Vec<&[u8]> = Vec::new();
    let mut cur = id;
    while cur != ROOT {
        let parent = tree.node(cur).parent;
        match tree.children(parent).iter().find(|&(_, c)| c == cur) {
            Some((name, _)) => names.push(name),
            None => break,
        }
        cur = parent;
    }
    names.reverse();
    names.join(&b'/')
}

/// For every path some layer has an entry at, the topmost such layer (1-based): the layer that
/// put the name there, whatever node it names.
fn name_layers(indexes: &[LayerIndex]) -> HashMap<Vec<u8>, u32> {
    let mut map = HashMap::new();
    for (i, index) in indexes.iter().enumerate() {
        for e in &index.entries {
            map.insert(e.path.clone(), i as u32 + 1);
        }
    }
    map
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_vec(),
        (_, true) => a.to_vec(),
        _ => [a, b].join(&b'/'),
    }
}

/// `drwxr-xr-x`, as `ls -l` writes it.
fn mode_string(node: Node) -> String {
    let t = match node.kind {
        NodeKind::Dir(_) => 'd',
        NodeKind::File(_) => '-',
        NodeKind::Symlink(_) => 'l',
        NodeKind::Char(..) => 'c',
        NodeKind::Block(..) => 'b',
        NodeKind::Fifo => 'p',
    };
    let m = node.meta.mode;
    let bit = |mask: u32, c: char| if m & mask != 0 { c } else { '-' };
    let special = |x: u32, s: u32, lower: char, upper: char| match (m & x != 0, m & s != 0) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    format!(
        "{t}{}{}{}{}{}{}{}{}{}",
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    )
}

/// `YYYY-MM-DD HH:MM` (UTC).
fn short_time(secs: i64) -> String {
    let t = export::rfc3339(secs);
    format!("{} {}", &t[..10], &t[11..16])
}

/// Visits `id` and everything below it, with paths relative to `id`.
fn subtree_walk(tree: &Tree, id: NodeId, visit: &mut dyn FnMut(&[u8], NodeId)) {
    let mut stack = vec![(Vec::new(), id)];
    while let Some((path, id)) = stack.pop() {
        visit(&path, id);
        for (name, child) in tree.children(id).iter().rev() {
            stack.push((join(&path, name), child));
        }
    }
}

/// `--layers N`: 1 or more (an image after no layers is empty, nothing to show).
pub(super) fn layer_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("layers are counted from 1, the bottom layer".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
