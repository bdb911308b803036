//! The FUSE filesystem: the frozen merged tree served read-only through the kernel, file bytes
//! read on demand by `content.rs`. Inode = node id + 1, so the root is inode 1 (`FUSE_ROOT_ID`).
//! See: <https://www.kernel.org/doc/html/latest/filesystems/fuse.html>

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::content::Content;
use crate::error::Error;
use crate::tree::{Node, NodeId, NodeKind, ROOT, Tree};

/// How long the kernel may cache names, attributes and missing names: an image never changes
/// under its mount, so the only limit is the kernel's memory.
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Block size reported by `stat` and `statfs`.
const BLOCK_SIZE: u32 = 4096;
/// Inode numbers are never reused within a mount, so one generation serves all.
const GENERATION: Generation = Generation(0);
/// What the kernel shows for an id it cannot represent (`/proc/sys/fs/overflowuid`).
const OVERFLOW_ID: u32 = 65534;
/// Longest name `statfs` reports (Linux's `NAME_MAX`).
const NAME_MAX: u32 = 255;
/// Files up to this size are pushed into the page cache as their directory is listed.
const PREFETCH_FILE_MAX: u64 = 64 * 1024;
/// Bytes pushed per directory listing call, at most, so a listing never waits long.
const PREFETCH_PER_CALL: u64 = 8 << 20;

/// The merged tree of one image as a read-only FUSE filesystem.
pub struct FlatFs {
    tree: Arc<Tree>,
    content: Arc<Content>,
    /// Space the files take, in `BLOCK_SIZE` blocks, for `statfs`.
    blocks: u64,
    /// Whether the kernel takes ENOSYS from `open` / `opendir` as "no opens needed" (Linux
    /// 4.19 / 5.1 on); older ones would fail the open.
    zero_message_open: bool,
    zero_message_opendir: bool,
    /// Where small files are pushed into the kernel's page cache, once mounted.
    notifier: Arc<OnceLock<Notifier>>,
    /// Per directory, how many of its children have been handed to the pusher.
    prefetched: Mutex<HashMap<NodeId, usize>>,
    prefetch: bool,
    /// The pushing thread's queue, once the session has started.
    pushes: Option<SyncSender<Push>>,
    /// Started with the session, in the serving process (after the fork): stats, prefetch.
    on_start: Vec<Box<dyn FnOnce() + Send + Sync>>,
    /// Run when the session ends.
    on_stop: Vec<Box<dyn FnOnce() + Send + Sync>>,
}

/// Children `from..to` of directory `dir`, to push into the page cache.
struct Push {
    dir: NodeId,
    from: usize,
    to: usize,
}

/// Listings whose pushes may wait; beyond that they are dropped (their files are then read
/// the usual way).
const PUSH_QUEUE: usize = 64;

/// Answer to `getxattr`/`listxattr`: the length when asked with size 0, else the bytes.
#[derive(Debug, PartialEq, Eq)]
enum XattrReply<'a> {
    Size(u32),
    Data(Cow<'a, [u8]>),
}

impl FlatFs {
    /// Serves `tree`, reading file bytes through `content` (built from the same image's layers).
    pub fn new(tree: Tree, content: Content) -> Self {
        let blocks = (0..tree.len() as NodeId)
            .map(|id| match &tree.node(id).kind {
                NodeKind::File(e) => e.stored().div_ceil(u64::from(BLOCK_SIZE)),
                _ => 0,
            })
            .sum();
        FlatFs {
            tree: Arc::new(tree),
            content: Arc::new(content),
            blocks,
            zero_message_open: false,
            zero_message_opendir: false,
            notifier: Arc::default(),
            prefetched: Mutex::default(),
            prefetch: true,
            pushes: None,
            on_start: Vec::new(),
            on_stop: Vec::new(),
        }
    }

    /// The file contents the mount reads through (for its stats).
    pub fn content(&self) -> Arc<Content> {
        self.content.clone()
    }

    /// Runs `job` when the session starts, in the serving process: threads started before
    /// the daemon forks would not survive the fork.
    pub fn on_start(&mut self, job: Box<dyn FnOnce() + Send + Sync>) {
        self.on_start.push(job);
    }

    /// Runs `job` when the session ends (unmounted).
    pub fn on_stop(&mut self, job: Box<dyn FnOnce() + Send + Sync>) {
        self.on_stop.push(job);
    }

    /// Whether small files are pushed into the page cache as their directory is listed (on by
    /// default; `mount --no-prefetch`).
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Where the mount puts its notifier once the session exists: from then on, small files
    /// are pushed into the page cache as their directory is listed (see [`FlatFs::prefetch`]).
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// Hands the small files among the children of `dir` that the kernel has seen listed
    /// (those before `cookie`) to the pushing thread, which puts them into its page cache, so
    /// that reading them later — `tar`, `cp -r`, `grep -r` read every file they list — costs no
    /// round trip. Reading a small file otherwise costs a `READ` request and two context
    /// switches, which for 200k small files is most of the time taken. Children are handed
    /// over once, and only after the listing reply that introduced them, since the kernel
    /// drops data for inodes it does not know yet.
    fn prefetch(&self, dir: NodeId, cookie: u64) {
        let Some(pushes) = &self.pushes else {
            return;
        };
        // Cookies 1 and 2 are the dots; child i has cookie i + 3.
        let seen = usize::try_from(cookie.saturating_sub(2)).unwrap_or(usize::MAX);
        let seen = seen.min(self.tree.children(dir).len());
        let from = {
            let mut done = self.prefetched.lock().unwrap_or_else(|e| e.into_inner());
            let done = done.entry(dir).or_insert(0);
            if *done >= seen {
                return;
            }
            std::mem::replace(done, seen)
        };
        // Never wait: a serving thread blocked here could be the one a push waits for.
        let _ = pushes.try_send(Push {
            dir,
            from,
            to: seen,
        });
    }

    /// Starts the thread that pushes small files into the page cache. It is a thread of its
    /// own because a push waits for the page lock of any read of that file in flight, which
    /// only a free serving thread can answer.
    fn start_pushing(&mut self) -> io::Result<()> {
        let (tx, rx) = sync_channel::<Push>(PUSH_QUEUE);
        let (tree, content, notifier) = (
            self.tree.clone(),
            self.content.clone(),
            self.notifier.clone(),
        );
        thread::Builder::new()
            .name("flatfs-prefetch".into())
            .spawn(move || {
                let mut buf = Vec::new();
                for push in rx {
                    let Some(notifier) = notifier.get() else {
                        continue;
                    };
                    push_small_files(&tree, &content, notifier, &push, &mut buf);
                }
            })?;
        self.pushes = Some(tx);
        Ok(())
    }

    fn node(&self, ino: INodeNo) -> Result<(NodeId, Node<'_>), Errno> {
        let id = ino
            .0
            .checked_sub(1)
            .and_then(|id| NodeId::try_from(id).ok())
            .ok_or(Errno::ENOENT)?;
        let node = self.tree.get(id).ok_or(Errno::ENOENT)?;
        Ok((id, node))
    }

    fn dir(&self, ino: INodeNo) -> Result<(NodeId, Node<'_>), Errno> {
        let (id, node) = self.node(ino)?;
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok((id, node))
    }

    /// The attributes of a node, exactly as the tree records them.
    fn attr(&self, id: NodeId) -> FileAttr {
        let node = self.tree.node(id);
        let rdev = match node.kind {
            // The FUSE ABI carries rdev in 32 bits, the kernel's encoding, which is glibc's for
            // every device number the kernel can represent (major < 2^12, minor < 2^20).
            NodeKind::Char(major, minor) | NodeKind::Block(major, minor) => {
                libc::makedev(major, minor) as u32
            }
            _ => 0,
        };
        let size = node.size();
        // What the image stores: a sparse file's holes take no space.
        let stored = match node.kind {
            NodeKind::File(e) => e.stored(),
            _ => size,
        };
        let mtime = system_time(node.meta.mtime, node.meta.mtime_nsec);
        FileAttr {
            ino: ino_of(id),
            size,
            blocks: stored.div_ceil(512),
            // Images record only mtime; a fixed atime and ctime keep stat stable.
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(node),
            perm: (node.meta.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: u32::try_from(node.meta.uid).unwrap_or(OVERFLOW_ID),
            gid: u32::try_from(node.meta.gid).unwrap_or(OVERFLOW_ID),
            rdev,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    /// `None` when the name does not exist, which the kernel may cache as a negative entry.
    fn lookup_name(&self, parent: INodeNo, name: &[u8]) -> Result<Option<FileAttr>, Errno> {
        let (dir, node) = self.dir(parent)?;
        // The kernel resolves `.` and `..` itself, except for exported (NFS) handles.
        let id = match name {
            b"." => Some(dir),
            b".." => Some(node.parent),
            _ => self.tree.lookup(dir, name),
        };
        Ok(id.map(|id| self.attr(id)))
    }

    fn getattr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (id, _) = self.node(ino)?;
        Ok(self.attr(id))
    }

    /// The entries of a directory from position `offset` on: `.`, `..`, then the children in
    /// name order, each with the cookie (`position + 1`) that resumes after it.
    fn entries(
        &self,
        ino: INodeNo,
        offset: u64,
    ) -> Result<impl Iterator<Item = (u64, NodeId, &[u8])>, Errno> {
        let (dir, node) = self.dir(ino)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let dots = [(dir, &b"."[..]), (node.parent, &b".."[..])];
        // Slicing, not skipping: a big directory is listed in many calls.
        let children = self.tree.children(dir).starting_at(start.saturating_sub(2));
        let rest = dots
            .into_iter()
            .skip(start)
            .chain(children.iter().map(|(name, id)| (id, name)));
        // No overflow: an entry at `offset + i` exists, so the sum is at most the entry count.
        Ok(rest
            .enumerate()
            .map(move |(i, (id, name))| (offset + i as u64 + 1, id, name)))
    }

    /// Opens a file, or answers ENOSYS where the kernel allows it: that tells it to send no
    /// more opens, nor their releases. Nothing is kept per open, so each small file then costs
    /// one round trip (its read) instead of three; the kernel's no-open default keeps the page
    /// cache across opens, as FOPEN_KEEP_CACHE does, and the read-only mount refuses writes
    /// before they reach us.
    fn open_file(&self, ino: INodeNo, flags: OpenFlags) -> Result<FopenFlags, Errno> {
        let (_, node) = self.node(ino)?;
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(Errno::EROFS);
        }
        if node.is_dir() {
            return Err(Errno::EISDIR);
        }
        if self.zero_message_open {
            return Err(Errno::ENOSYS);
        }
        // The bytes never change: keep the page cache across opens. Closing has nothing to
        // flush, so spare the kernel the round trip.
        Ok(FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH)
    }

    /// Opens a directory, or answers ENOSYS for zero-message opendirs where the kernel allows
    /// it (its default then caches listings, as FOPEN_CACHE_DIR asks).
    fn open_dir(&self, ino: INodeNo) -> Result<FopenFlags, Errno> {
        self.dir(ino)?;
        if self.zero_message_opendir {
            return Err(Errno::ENOSYS);
        }
        Ok(FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// Reads `size` bytes at `offset`: all of them unless the file ends first, as the kernel
    /// would otherwise fill the rest of the page with zeros.
    fn read_file(&self, ino: INodeNo, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (id, node) = self.node(ino)?;
        let extent = match &node.kind {
            NodeKind::File(extent) => extent,
            NodeKind::Dir(_) => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        };
        let len = u64::from(size).min(extent.size.saturating_sub(offset));
        let mut buf = vec![0; len as usize];
        let n = self
            .content
            .read_at(extent, offset, &mut buf)
            .map_err(|e| self.read_error(id, e))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// `SEEK_DATA` / `SEEK_HOLE` from `offset` (the kernel answers the other kinds itself):
    /// the holes of sparse files, and the one at the end of every file.
    fn seek_file(&self, ino: INodeNo, offset: i64, whence: i32) -> Result<i64, Errno> {
        let (_, node) = self.node(ino)?;
        let NodeKind::File(extent) = node.kind else {
            return Err(Errno::EINVAL);
        };
        let start = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        let found = match whence {
            libc::SEEK_DATA => match Content::region(&extent, start) {
                None => None,
                Some((true, _)) => Some(start),
                // A hole is followed by data, or by the end of the file.
                Some((false, end)) => (end < extent.size).then_some(end),
            },
            libc::SEEK_HOLE => {
                let mut at = start;
                loop {
                    match Content::region(&extent, at) {
                        None if at == start => break None,
                        None => break Some(at),
                        Some((false, _)) => break Some(at),
                        // Runs may touch: the hole is after the last of them.
                        Some((true, end)) => at = end,
                    }
                }
            }
            _ => return Err(Errno::EINVAL),
        };
        let found = found.ok_or(Errno::ENXIO)?;
        i64::try_from(found).map_err(|_| Errno::EOVERFLOW)
    }

    fn read_error(&self, id: NodeId, err: io::Error) -> Errno {
        let path = self.path_of(id);
        let err = Error::io(Path::new(OsStr::from_bytes(&path)).display(), err);
        // A daemon's stderr is /dev/null; in the foreground this tells the user which file broke.
        eprintln!("flatfs: reading {err}");
        Errno::from_i32(err.errno())
    }

    /// The first name of a node, `/`-separated from the root, for messages.
    fn path_of(&self, mut id: NodeId) -> Vec<u8> {
        let mut names: Vec<&[u8]> = Vec::new();
        while id != ROOT {
            let parent = self.tree.node(id).parent;
            match self.tree.children(parent).iter().find(|(_, c)| *c == id) {
                Some((name, _)) => names.push(name),
                None => break,
            }
            id = parent;
        }
        let mut path = b"/".to_vec();
        for (i, name) in names.iter().rev().enumerate() {
            if i > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(name);
        }
        path
    }

    fn link_target(&self, ino: INodeNo) -> Result<&[u8], Errno> {
        match self.node(ino)?.1.kind {
            NodeKind::Symlink(target) => Ok(target),
            _ => Err(Errno::EINVAL),
        }
    }

    fn get_xattr(&self, ino: INodeNo, name: &[u8], size: u32) -> Result<XattrReply<'_>, Errno> {
        let (_, node) = self.node(ino)?;
        let (_, value) = node
            .xattrs
            .iter()
            .find(|(n, _)| **n == *name)
            .ok_or(Errno::NO_XATTR)?;
        xattr_reply(Cow::Borrowed(value), size)
    }

    fn list_xattrs(&self, ino: INodeNo, size: u32) -> Result<XattrReply<'_>, Errno> {
        let (_, node) = self.node(ino)?;
        let mut names = Vec::new();
        for (name, _) in &node.xattrs {
            names.extend_from_slice(name);
            names.push(0);
        }
        xattr_reply(Cow::Owned(names), size)
    }

    /// What `access(2)` answers when the mount lacks `default_permissions` (flatfs always sets
    /// it, so the kernel checks itself); supplementary groups are not known here.
    fn check_access(
        &self,
        ino: INodeNo,
        mask: AccessFlags,
        uid: u32,
        gid: u32,
    ) -> Result<(), Errno> {
        let (id, node) = self.node(ino)?;
        if mask.contains(AccessFlags::W_OK) {
            return Err(Errno::EROFS);
        }
        let want = (mask & (AccessFlags::R_OK | AccessFlags::X_OK)).bits() as u32;
        let mode = node.meta.mode;
        let allowed = if uid == 0 {
            // root reads anything, and executes what anyone may execute (or searches a dir).
            4 | u32::from(node.is_dir() || mode & 0o111 != 0)
        } else {
            let attr = self.attr(id);
            if uid == attr.uid {
                (mode >> 6) & 7
            } else if gid == attr.gid {
                (mode >> 3) & 7
            } else {
                mode & 7
            }
        };
        if allowed & want == want {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }
}

/// Pushes the files of up to [`PREFETCH_FILE_MAX`] bytes among `push`'s children into the page
/// cache, [`PREFETCH_PER_CALL`] bytes at most.
fn push_small_files(
    tree: &Tree,
    content: &Content,
    notifier: &Notifier,
    push: &Push,
    buf: &mut Vec<u8>,
) {
    let mut budget = PREFETCH_PER_CALL;
    for (_, id) in tree.children(push.dir).slice(push.from..push.to) {
        let NodeKind::File(extent) = tree.node(id).kind else {
            continue;
        };
        if extent.size == 0 || extent.size > PREFETCH_FILE_MAX {
            continue;
        }
        let Some(left) = budget.checked_sub(extent.size) else {
            break;
        };
        budget = left;
        buf.resize(extent.size as usize, 0);
        // Best effort: a file that cannot be read here reports its error when read, and the
        // kernel may have forgotten the inode again.
        if content.read_at(&extent, 0, buf).ok() == Some(buf.len()) {
            let _ = notifier.store(ino_of(id), 0, buf);
        }
    }
}

fn ino_of(id: NodeId) -> INodeNo {
    INodeNo(u64::from(id) + 1)
}

fn file_type(node: Node) -> FileType {
    match node.kind {
        NodeKind::Dir(_) => FileType::Directory,
        NodeKind::File(_) => FileType::RegularFile,
        NodeKind::Symlink(_) => FileType::Symlink,
        NodeKind::Char(..) => FileType::CharDevice,
        NodeKind::Block(..) => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

/// `secs` (possibly before 1970) plus `nsec`; out-of-range times show as the epoch.
fn system_time(secs: i64, nsec: u32) -> SystemTime {
    let whole = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    whole
        .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec.min(999_999_999)))))
        .unwrap_or(UNIX_EPOCH)
}

/// The xattr protocol: size 0 asks for the length; a buffer too small is `ERANGE`.
fn xattr_reply(data: Cow<'_, [u8]>, size: u32) -> Result<XattrReply<'_>, Errno> {
    let len = u32::try_from(data.len()).map_err(|_| Errno::E2BIG)?;
    if size == 0 {
        Ok(XattrReply::Size(len))
    } else if len > size {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrReply::Data(data))
    }
}

impl Filesystem for FlatFs {
    fn destroy(&mut self) {
        self.content.log_fetched();
        for job in self.on_stop.drain(..) {
            job();
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for job in self.on_start.drain(..) {
            job();
        }
        if self.prefetch {
            self.start_pushing()?;
        }
        // readdirplus, always (not READDIRPLUS_AUTO, which falls back to plain readdir and then
        // one lookup per name), fills `ls -l`, `find` and `tar` in one round trip per listing:
        // attributes are in memory, so sending them costs next to nothing. Parallel dirops lets
        // lookups in one directory run at once; cached symlinks spare readlink calls. Each is
        // only an optimisation, so ask for what this kernel offers and nothing else.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS;
        let offered = wanted & config.capabilities();
        self.zero_message_open = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.zero_message_opendir = config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        config
            .add_capabilities(offered)
            .map_err(|flags| io::Error::other(format!("kernel refused {flags:?}")))?;
        // The largest readahead the kernel allows: whole files stream in big requests.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            config
                .set_max_readahead(max)
                .map_err(|_| io::Error::other("kernel refused its own readahead"))?;
        }
        // More readahead requests in flight keep the serving threads busy.
        if config.set_max_background(64).is_err() {
            return Err(io::Error::other("kernel refused max_background"));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent, name.as_bytes()) {
            Ok(Some(attr)) => reply.entry(&TTL, &attr, GENERATION),
            // Node id 0 with a timeout is a negative entry: the kernel remembers the name is
            // missing (ld.so and $PATH searches ask again and again). Its attributes are unused.
            Ok(None) => {
                let mut attr = self.attr(ROOT);
                attr.ino = INodeNo(0);
                reply.entry(&TTL, &attr, GENERATION)
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.link_target(ino) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino, flags) {
            Ok(open_flags) => reply.opened(FileHandle(0), open_flags),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_file(ino, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.seek_file(ino, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever buffered: ENOSYS makes the kernel stop sending flushes on close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_dir(ino) {
            Ok(open_flags) => reply.opened(FileHandle(0), open_flags),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.entries(ino, offset) {
            Ok(entries) => {
                for (cookie, id, name) in entries {
                    let kind = file_type(self.tree.node(id));
                    if reply.add(ino_of(id), cookie, kind, OsStr::from_bytes(name)) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if offset > 0
            && let Ok((dir, _)) = self.dir(ino)
        {
            self.prefetch(dir, offset);
        }
        match self.entries(ino, offset) {
            Ok(entries) => {
                for (cookie, id, name) in entries {
                    let attr = self.attr(id);
                    let name = OsStr::from_bytes(name);
                    if reply.add(attr.ino, cookie, name, &TTL, &attr, GENERATION) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.tree.len() as u64;
        reply.statfs(
            self.blocks,
            0,
            0,
            files,
            0,
            BLOCK_SIZE,
            NAME_MAX,
            BLOCK_SIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.get_xattr(ino, name.as_bytes(), size) {
            Ok(XattrReply::Size(len)) => reply.size(len),
            Ok(XattrReply::Data(data)) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.list_xattrs(ino, size) {
            Ok(XattrReply::Size(len)) => reply.size(len),
            Ok(XattrReply::Data(data)) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.check_access(ino, mask, req.uid(), req.gid()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // Every operation that would change the image answers EROFS. The mount is read-only too,
    // so the kernel normally refuses first; these cover a `-o rw` remount or a future kernel.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, Kind, LayerIndex, Meta};
    use crate::tree::merge;

    fn entry(path: &str, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            meta: Meta {
                mode,
                uid: 0,
                gid: 0,
                mtime: 1000,
                mtime_nsec: 0,
            },
            size: 0,
            offset: 0,
            xattrs: Vec::new(),
            sparse: None,
        }
    }

    /// A one-layer filesystem without layer blobs: everything but reading file bytes works.
    fn flatfs(entries: Vec<Entry>) -> FlatFs {
        let index = LayerIndex {
            label: "1".into(),
            entries,
            ..LayerIndex::default()
        };
        FlatFs::new(merge(&[index]).expect("merge"), Content::new(&[], &[]))
    }

    fn ino(fs: &FlatFs, path: &str) -> INodeNo {
        ino_of(fs.tree.resolve(path.as_bytes()).expect("path exists"))
    }

    fn sample() -> FlatFs {
        let mut file = entry("d/f", Kind::File, 0o4755);
        file.size = 5000;
        file.meta.uid = 3_000_000;
        file.meta.gid = 1 << 33;
        file.meta.mtime = -5;
        file.meta.mtime_nsec = 250_000_000;
        file.xattrs = vec![
            (
                b"security.capability".to_vec(),
                b"\x01\x00\x00\x02".to_vec(),
            ),
            (b"user.empty".to_vec(), Vec::new()),
        ];
        flatfs(vec![
            entry("d", Kind::Dir, 0o1777),
            file,
            entry("d/h", Kind::Hardlink(b"d/f".to_vec()), 0o644),
            entry("d/s", Kind::Symlink(b"../nowhere".to_vec()), 0o777),
            entry("d/c", Kind::Char(4095, 1_048_575), 0o620),
            entry("d/b", Kind::Block(8, 1), 0o660),
            entry("d/p", Kind::Fifo, 0o644),
        ])
    }

    #[test]
    fn attributes_are_the_trees() {
        let fs = sample();
        let attr = fs.getattr_of(ino(&fs, "d/f")).expect("attr");
        assert_eq!(attr.kind, FileType::RegularFile);
        assert_eq!(attr.perm, 0o4755);
        assert_eq!(attr.size, 5000);
        assert_eq!(attr.blocks, 10);
        assert_eq!(attr.blksize, 4096);
        assert_eq!(attr.uid, 3_000_000);
        assert_eq!(
            attr.gid, OVERFLOW_ID,
            "ids past 32 bits show as the overflow id"
        );
        assert_eq!(attr.nlink, 2, "d/f and its hardlink d/h");
        assert_eq!(attr.mtime, UNIX_EPOCH - Duration::from_millis(4750));
        assert_eq!((attr.atime, attr.ctime), (attr.mtime, attr.mtime));
        assert_eq!(fs.getattr_of(ino(&fs, "d/h")).expect("attr"), attr);

        let dir = fs.getattr_of(ino(&fs, "d")).expect("attr");
        assert_eq!(
            (dir.kind, dir.perm, dir.nlink),
            (FileType::Directory, 0o1777, 2)
        );
        let root = fs.getattr_of(INodeNo::ROOT).expect("root");
        assert_eq!((root.ino, root.nlink, root.perm), (INodeNo::ROOT, 3, 0o755));
    }

    #[test]
    fn devices_carry_major_and_minor_in_rdev() {
        let fs = sample();
        let c = fs.getattr_of(ino(&fs, "d/c")).expect("attr");
        assert_eq!(c.kind, FileType::CharDevice);
        assert_eq!(libc::major(u64::from(c.rdev)), 4095);
        assert_eq!(libc::minor(u64::from(c.rdev)), 1_048_575);
        let b = fs.getattr_of(ino(&fs, "d/b")).expect("attr");
        assert_eq!((b.kind, b.rdev), (FileType::BlockDevice, 0x801));
        let p = fs.getattr_of(ino(&fs, "d/p")).expect("attr");
        assert_eq!((p.kind, p.rdev, p.size), (FileType::NamedPipe, 0, 0));
    }

    #[test]
    fn unknown_inodes_are_enoent() {
        let fs = sample();
        for bad in [0, fs.tree.len() as u64 + 1, u64::MAX] {
            assert_eq!(
                fs.getattr_of(INodeNo(bad)),
                Err(Errno::ENOENT),
                "inode {bad}"
            );
        }
    }

    #[test]
    fn lookup_finds_names_dots_and_reports_missing_ones() {
        let fs = sample();
        let d = ino(&fs, "d");
        let found = |name: &str| fs.lookup_name(d, name.as_bytes()).map(|a| a.map(|a| a.ino));
        assert_eq!(found("f"), Ok(Some(ino(&fs, "d/f"))));
        assert_eq!(
            found("h"),
            Ok(Some(ino(&fs, "d/f"))),
            "a hardlink is the same inode"
        );
        assert_eq!(found("."), Ok(Some(d)));
        assert_eq!(found(".."), Ok(Some(INodeNo::ROOT)));
        assert_eq!(found("missing"), Ok(None));
        assert_eq!(
            fs.lookup_name(INodeNo::ROOT, b"..")
                .map(|a| a.map(|a| a.ino)),
            Ok(Some(INodeNo::ROOT)),
            "the root is its own parent"
        );
        assert_eq!(
            fs.lookup_name(ino(&fs, "d/f"), b"x").map(|_| ()),
            Err(Errno::ENOTDIR)
        );
    }

    fn names(fs: &FlatFs, dir: INodeNo, offset: u64) -> Vec<(u64, String)> {
        fs.entries(dir, offset)
            .expect("a directory")
            .map(|(cookie, _, name)| (cookie, String::from_utf8_lossy(name).into_owned()))
            .collect()
    }

    #[test]
    fn readdir_lists_dots_then_children_and_resumes_after_each_cookie() {
        let fs = sample();
        let d = ino(&fs, "d");
        let all = names(&fs, d, 0);
        let expected = [".", "..", "b", "c", "f", "h", "p", "s"];
        assert_eq!(
            all.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(
            all.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>()
        );
        for (cookie, _) in &all {
            assert_eq!(
                names(&fs, d, *cookie),
                all[*cookie as usize..],
                "after {cookie}"
            );
        }
        assert!(names(&fs, d, u64::MAX).is_empty());
        let dots: Vec<NodeId> = fs
            .entries(d, 0)
            .expect("dir")
            .take(2)
            .map(|e| e.1)
            .collect();
        assert_eq!(dots, [d.0 as NodeId - 1, ROOT]);
        assert_eq!(fs.entries(ino(&fs, "d/f"), 0).err(), Some(Errno::ENOTDIR));
    }

    #[test]
    fn xattrs_follow_the_size_protocol() {
        let fs = sample();
        let f = ino(&fs, "d/f");
        let cap = b"\x01\x00\x00\x02";
        assert_eq!(
            fs.get_xattr(f, b"security.capability", 0),
            Ok(XattrReply::Size(4))
        );
        assert_eq!(
            fs.get_xattr(f, b"security.capability", 4),
            Ok(XattrReply::Data(Cow::Borrowed(&cap[..])))
        );
        assert_eq!(
            fs.get_xattr(f, b"security.capability", 3),
            Err(Errno::ERANGE)
        );
        assert_eq!(fs.get_xattr(f, b"user.empty", 0), Ok(XattrReply::Size(0)));
        assert_eq!(fs.get_xattr(f, b"user.missing", 100), Err(Errno::NO_XATTR));
        let list = b"security.capability\0user.empty\0";
        assert_eq!(fs.list_xattrs(f, 0), Ok(XattrReply::Size(31)));
        assert_eq!(
            fs.list_xattrs(f, 31),
            Ok(XattrReply::Data(Cow::Borrowed(&list[..])))
        );
        assert_eq!(fs.list_xattrs(f, 30), Err(Errno::ERANGE));
        assert_eq!(fs.list_xattrs(ino(&fs, "d"), 0), Ok(XattrReply::Size(0)));
    }

    #[test]
    fn opening_for_write_is_erofs_and_reads_stop_at_the_end() {
        let mut fs = sample();
        let f = ino(&fs, "d/f");
        let d = ino(&fs, "d");
        for zero_message in [false, true] {
            fs.zero_message_open = zero_message;
            fs.zero_message_opendir = zero_message;
            let (file, dir) = if zero_message {
                (Err(Errno::ENOSYS), Err(Errno::ENOSYS))
            } else {
                (
                    Ok(FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH),
                    Ok(FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE),
                )
            };
            assert_eq!(fs.open_file(f, OpenFlags(libc::O_RDONLY)), file);
            assert_eq!(fs.open_dir(d), dir);
            for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDWR | libc::O_APPEND] {
                assert_eq!(fs.open_file(f, OpenFlags(flags)), Err(Errno::EROFS));
            }
            assert_eq!(
                fs.open_file(d, OpenFlags(libc::O_RDONLY)),
                Err(Errno::EISDIR)
            );
            assert_eq!(fs.open_dir(f), Err(Errno::ENOTDIR));
        }
        assert_eq!(fs.read_file(f, 5000, 4096), Ok(Vec::new()));
        assert_eq!(fs.read_file(f, u64::MAX, 4096), Ok(Vec::new()));
        assert_eq!(fs.read_file(ino(&fs, "d"), 0, 1), Err(Errno::EISDIR));
        assert_eq!(fs.read_file(ino(&fs, "d/s"), 0, 1), Err(Errno::EINVAL));
    }

    #[test]
    fn a_read_that_fails_is_eio() {
        // No layer blobs behind this tree: the read cannot reach its bytes.
        let fs = sample();
        assert_eq!(fs.read_file(ino(&fs, "d/f"), 0, 10), Err(Errno::EIO));
    }

    #[test]
    fn readlink_returns_the_raw_target() {
        let fs = sample();
        assert_eq!(fs.link_target(ino(&fs, "d/s")), Ok(&b"../nowhere"[..]));
        assert_eq!(fs.link_target(ino(&fs, "d/f")), Err(Errno::EINVAL));
    }

    #[test]
    fn access_refuses_writes_and_checks_modes() {
        let fs = sample();
        let f = ino(&fs, "d/f");
        let (r, w, x) = (AccessFlags::R_OK, AccessFlags::W_OK, AccessFlags::X_OK);
        assert_eq!(fs.check_access(f, w, 0, 0), Err(Errno::EROFS));
        assert_eq!(fs.check_access(f, r | x, 0, 0), Ok(()));
        assert_eq!(fs.check_access(f, r | x, 3_000_000, 5), Ok(()));
        assert_eq!(fs.check_access(f, r | x, 1000, 1000), Ok(()));
        let p = ino(&fs, "d/p");
        assert_eq!(fs.check_access(p, x, 0, 0), Err(Errno::EACCES));
        assert_eq!(fs.check_access(p, r, 1000, 1000), Ok(()));
        assert_eq!(
            fs.check_access(ino(&fs, "d/c"), r, 1000, 1000),
            Err(Errno::EACCES)
        );
        assert_eq!(fs.check_access(p, AccessFlags::F_OK, 1000, 1000), Ok(()));
    }

    #[test]
    fn paths_for_messages_use_the_first_name() {
        let fs = sample();
        assert_eq!(fs.path_of(ino(&fs, "d/f").0 as NodeId - 1), b"/d/f");
        assert_eq!(fs.path_of(ROOT), b"/");
    }

    #[test]
    fn times_before_the_epoch_and_out_of_range_are_handled() {
        assert_eq!(system_time(0, 0), UNIX_EPOCH);
        assert_eq!(
            system_time(-1, 500_000_000),
            UNIX_EPOCH - Duration::from_millis(500)
        );
        assert_eq!(
            system_time(1, 2_000_000_000),
            UNIX_EPOCH + Duration::new(1, 999_999_999)
        );
        // Whatever the platform's range, an extreme time must not panic.
        let _ = system_time(i64::MIN, 0);
        let _ = system_time(i64::MAX, 999_999_999);
    }

    #[test]
    fn statfs_counts_blocks_of_distinct_files() {
        let fs = sample();
        // One 5000-byte file (two names) takes two 4 KiB blocks.
        assert_eq!(fs.blocks, 2);
    }
}
