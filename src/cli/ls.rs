//! `flatfs ls`: the merged tree listed like `ls` (or `tar tv` with -R).

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;

use super::ui::Ui;
use crate::export;
use crate::inspect;
use crate::source::Platform;
use crate::tree::{Node, NodeId, NodeKind, Tree};

/// List the merged tree, like `ls` (or `tar tv` with -R).
#[derive(Args, Debug)]
pub struct LsArgs {
    /// The image.
    image: String,
    /// A path in the image [default: /]; symlinks in it are followed inside the image.
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
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
}

/// Runs `flatfs ls`.
pub fn run(args: LsArgs, ui: &Ui) -> Result<()> {
    let LsArgs {
        image,
        path,
        long,
        recursive,
        layer,
        platform,
        layers,
    } = args;
    let tree = ui.open(&image, platform.as_ref(), layers, None)?.tree;
    let id = inspect::resolve_following(&tree, path.as_bytes())?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let show = |out: &mut dyn Write, name: &[u8], id: NodeId| -> io::Result<()> {
        let node = tree.node(id);
        if layer {
            match node.layer {
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
        let prefix = path.trim_matches('/').as_bytes().to_vec();
        subtree_walk(&tree, id, &prefix, &mut |p, child| {
            if let Err(e) = show(&mut out, p, child) {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
    } else if tree.node(id).is_dir() {
        for (name, child) in tree.children(id) {
            show(&mut out, name, child)?;
        }
    } else {
        show(&mut out, path.trim_matches('/').as_bytes(), id)?;
    }
    out.flush()?;
    Ok(())
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

/// Visits `id` and everything below it, with paths relative to the image root.
fn subtree_walk(tree: &Tree, id: NodeId, prefix: &[u8], visit: &mut dyn FnMut(&[u8], NodeId)) {
    let mut stack = vec![(prefix.to_vec(), id)];
    while let Some((path, id)) = stack.pop() {
        visit(&path, id);
        for (name, child) in tree.children(id).iter().rev() {
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            stack.push((p, child));
        }
    }
}
