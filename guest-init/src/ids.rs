//! The host ids of workspaces started by root: one unprivileged uid (and the same gid) per
//! workspace, leased for as long as it runs.
//!
//! Run by the host's root, the namespace backend maps the workspace's root to an otherwise
//! unused host id, never to host uid 0. One id shared by every workspace would make a kept
//! home of one readable from every other, so each
//! workspace gets its own from [`FIRST_RUN_ID`]`..`[`FIRST_RUN_ID`]` + `[`RUN_IDS`]:
//!
//! - a lease is an exclusive `flock` on `<state>/<id>` held by `moat run` for the workspace's
//!   lifetime: the kernel releases it when that process ends, however it ends;
//! - a kept home (`--home DIR`) is written into its id's file, and the id stays the home's
//!   while that directory exists and is owned by it: the next run with the same home gets the
//!   same id (its files stay the agent's), and no other workspace is ever given that id;
//! - an id the host names in `/etc/passwd`, `/etc/group`, `/etc/subuid` or `/etc/subgid` is
//!   never leased.
//!
//! The range lies in what systemd documents as unused (1879048192–2147352575): above the login
//! accounts, the dynamic service users, nobody (65534), the ranges `useradd` hands out in
//! /etc/subuid (100000 up to about 600 million by default) and systemd-nspawn's container
//! ranges (524288–1879048191); below the foreign-image range (2147352576) and 2^31 (ids that
//! some tools read as negative).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The first host id a workspace started by root runs as.
pub const FIRST_RUN_ID: u32 = 2_000_000_000;
/// How many ids workspaces started by root may use, at most as many running at once or kept
/// homes in all.
pub const RUN_IDS: u32 = 65_536;
/// Where leases and kept homes' claims live (root's, 0700).
pub const STATE_DIR: &str = "/var/lib/moat/ids";

/// Whether `id` is one a workspace started by root may run as.
pub fn is_run_id(id: u32) -> bool {
    (FIRST_RUN_ID..FIRST_RUN_ID + RUN_IDS).contains(&id)
}

/// Why no id could be leased.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    /// The state directory or an id's file could not be used.
    #[error("cannot use {}", .0.display())]
    State(PathBuf, #[source] std::io::Error),
    /// The home is another running workspace's.
    #[error(
        "{home} belongs to host uid {id}, which a running workspace holds: one home, one \
         workspace at a time", home = .0.display(), id = .1
    )]
    HomeInUse(PathBuf, u32),
    /// The home's owner is not a workspace id, and it is not an empty directory of root's.
    #[error(
        "{home} is owned by uid {owner}, and a workspace started by root runs as its own \
         unprivileged host uid ({FIRST_RUN_ID} and up): give moat an empty directory of root's \
         (it hands it to the workspace's uid) or one a previous workspace kept, or leave out \
         --home for a fresh one", home = .0.display(), owner = .1
    )]
    HomeOwner(PathBuf, u32),
    /// The home cannot be read.
    #[error("cannot use {} as the agent's home", .0.display())]
    Home(PathBuf, #[source] std::io::Error),
    /// Every id of the range is running or kept.
    #[error(
        "all {RUN_IDS} workspace uids from {FIRST_RUN_ID} are running or kept by a home (see \
         {STATE_DIR})"
    )]
    Exhausted,
}

/// A host id held for one workspace: the lock goes when this is dropped or the process ends.
#[derive(Debug)]
pub struct IdLease {
    id: u32,
    _lock: File,
}

impl IdLease {
    /// The leased host uid (and gid).
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// Leases a host id for a workspace started by root whose home is `home`: `Some((dir, kept))`
/// names the home and whether it outlives the workspace (`--home`).
///
/// A kept home already owned by a workspace id gets that id (refused while another workspace
/// runs with it); an empty kept home owned by root is handed (chown) to a fresh id and claimed
/// for it; a temporary home gets a fresh id that is no kept home's. The caller gives a fresh
/// temporary home to the id itself.
pub fn lease(state: &Path, home: &Path, kept: bool) -> Result<IdLease, IdError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .map_err(|e| IdError::State(state.to_owned(), e))?;
    let taken = HostIds::read();
    if kept {
        let meta = std::fs::metadata(home).map_err(|e| IdError::Home(home.to_owned(), e))?;
        if is_run_id(meta.uid()) && meta.gid() == meta.uid() {
            let id = meta.uid();
            let lock = try_lock(state, id)?.ok_or(IdError::HomeInUse(home.to_owned(), id))?;
            return claim(lock, id, Some(home));
        }
        let empty = std::fs::read_dir(home)
            .map_err(|e| IdError::Home(home.to_owned(), e))?
            .next()
            .is_none();
        if meta.uid() != 0 || !empty {
            return Err(IdError::HomeOwner(home.to_owned(), meta.uid()));
        }
    }
    for id in FIRST_RUN_ID..FIRST_RUN_ID + RUN_IDS {
        if taken.uses(id) {
            continue;
        }
        let Some(mut lock) = try_lock(state, id)? else {
            continue;
        };
        if kept_home(&mut lock, id).is_some() {
            continue;
        }
        if kept {
            // The workspace's alone: no other id (another workspace's included) reads it.
            std::os::unix::fs::chown(home, Some(id), Some(id))
                .and_then(|()| {
                    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| IdError::Home(home.to_owned(), e))?;
        }
        return claim(lock, id, kept.then_some(home));
    }
    Err(IdError::Exhausted)
}

/// Locks `<state>/<id>` exclusively without waiting: `None` if a running workspace holds it.
fn try_lock(state: &Path, id: u32) -> Result<Option<File>, IdError> {
    let path = state.join(id.to_string());
    let err = |e| IdError::State(path.clone(), e);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(err)?;
    // SAFETY: a valid descriptor and integer flags.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err(e))
    }
}

/// The kept home an id's file names, if that directory still exists and `id` owns it.
fn kept_home(lock: &mut File, id: u32) -> Option<PathBuf> {
    let mut text = String::new();
    lock.read_to_string(&mut text).ok()?;
    let path = PathBuf::from(text.trim_end_matches('\n'));
    let meta = std::fs::symlink_metadata(&path).ok()?;
    (!text.is_empty() && meta.is_dir() && meta.uid() == id).then_some(path)
}

/// Records in the locked file which kept home the id belongs to (none for a temporary one).
fn claim(mut lock: File, id: u32, home: Option<&Path>) -> Result<IdLease, IdError> {
    let text = home.map_or_else(String::new, |h| {
        let h = std::fs::canonicalize(h).unwrap_or_else(|_| h.to_owned());
        format!("{}\n", h.display())
    });
    let mut write = || -> std::io::Result<()> {
        lock.set_len(0)?;
        lock.rewind()?;
        lock.write_all(text.as_bytes())
    };
    write().map_err(|e| IdError::State(PathBuf::from(format!("<lease of {id}>")), e))?;
    Ok(IdLease { id, _lock: lock })
}

/// The ids the host's own files name or hand out. Read directly, not through NSS (whose
/// modules have no place in a process that later forks): ids from a directory service are not
/// seen.
struct HostIds {
    named: Vec<u32>,
    ranges: Vec<(u64, u64)>,
}

impl HostIds {
    fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let mut named = Vec::new();
        for path in ["/etc/passwd", "/etc/group"] {
            named.extend(read(path).lines().filter_map(named_id));
        }
        let mut ranges = Vec::new();
        for path in ["/etc/subuid", "/etc/subgid"] {
            ranges.extend(read(path).lines().filter_map(handed_out));
        }
        Self { named, ranges }
    }

    fn uses(&self, id: u32) -> bool {
        self.named.contains(&id)
            || self
                .ranges
                .iter()
                .any(|&(first, end)| (first..end).contains(&u64::from(id)))
    }
}

/// A passwd or group line's id (third field).
fn named_id(line: &str) -> Option<u32> {
    line.split(':').nth(2)?.parse().ok()
}

/// A subuid or subgid line's range (`name:first:count`), as `first..end`.
fn handed_out(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split(':').skip(1).map(|f| f.parse::<u64>().ok());
    let (first, count) = (fields.next()??, fields.next()??);
    Some((first, first.saturating_add(count)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_named_or_handed_out_are_read() {
        assert_eq!(
            named_id("ws:x:2000000000:100::/:/bin/sh"),
            Some(FIRST_RUN_ID)
        );
        assert_eq!(named_id("broken"), None);
        assert_eq!(
            handed_out("alice:1999999999:2"),
            Some((1_999_999_999, 2_000_000_001))
        );
        assert_eq!(handed_out("# comment"), None);
        let host = HostIds {
            named: vec![FIRST_RUN_ID + 5],
            ranges: vec![(1_999_999_999, 2_000_000_001)],
        };
        assert!(host.uses(FIRST_RUN_ID));
        assert!(!host.uses(FIRST_RUN_ID + 1));
        assert!(host.uses(FIRST_RUN_ID + 5));
    }

    #[test]
    fn concurrent_leases_get_different_ids_and_a_released_one_comes_back() {
        let state = tempfile::tempdir().unwrap();
        let home = state.path().join("tmp-home");
        let a = lease(state.path(), &home, false).unwrap();
        let b = lease(state.path(), &home, false).unwrap();
        assert_ne!(a.id(), b.id());
        assert!(is_run_id(a.id()) && is_run_id(b.id()));
        let released = a.id();
        drop(a);
        let c = lease(state.path(), &home, false).unwrap();
        assert_eq!(c.id(), released, "a released id is leased again");
    }

    // chown needs root; as anyone else the kept-home half is not checked.
    #[test]
    fn a_kept_home_keeps_its_id_and_no_other_workspace_gets_it() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root (chown)");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let homes = tempfile::tempdir().unwrap();
        let kept = homes.path().join("kept");
        std::fs::create_dir(&kept).unwrap();
        let first = lease(state.path(), &kept, true).unwrap();
        let id = first.id();
        assert_eq!(std::fs::metadata(&kept).unwrap().uid(), id, "handed over");
        // While it runs, the same home is refused to a second workspace.
        let err = lease(state.path(), &kept, true).unwrap_err();
        assert!(matches!(err, IdError::HomeInUse(_, i) if i == id), "{err}");
        drop(first);
        // Stopped, its id is still the kept home's: a temporary workspace gets another.
        let other = lease(state.path(), &homes.path().join("t"), false).unwrap();
        assert_ne!(other.id(), id);
        drop(other);
        // And the next run with that home gets it back.
        assert_eq!(lease(state.path(), &kept, true).unwrap().id(), id);
        // A home that is not empty and not a workspace's is refused, untouched.
        let foreign = homes.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("f"), b"x").unwrap();
        let err = lease(state.path(), &foreign, true).unwrap_err();
        assert!(matches!(err, IdError::HomeOwner(_, 0)), "{err}");
        assert_eq!(std::fs::metadata(&foreign).unwrap().uid(), 0);
        // Once the kept home is gone, its id is free again.
        std::fs::remove_dir(&kept).unwrap();
        let next = lease(state.path(), &homes.path().join("t"), false).unwrap();
        assert_eq!(next.id(), id);
    }
}
