//! The namespace backend's root file system: which one, and what of the host it would show.
//!
//! The workspace's root is an image, never the host's root: by default the Debian root image
//! the VM boots (`cargo xtask images rootfs` keeps it as a directory beside its ext4 form),
//! `--rootfs DIR` for another, `--image PATH` for an OCI image (unpacked by moat-image into a
//! cache; for the VM backend also made into an ext4 disk there). `--host-root` keeps the old mode (the host's root, read-only,
//! minus [`moat_guest_init::MASKED`]) for hosts without the image, and says what it exposes.
//! Whatever the root, `moat run` refuses to start when a file the agent must not read would be
//! visible inside: a secret's source file, the enrolment directory, the run directory (the
//! proxy's and the connector's sockets) or the audit log.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use moat_guest_init::RootFs;

/// Chooses the workspace's root: `--rootfs DIR`, `--host-root`, or the root image built by
/// `cargo xtask images rootfs` (`found`: the image's directory, or why there is none).
pub(crate) fn choose(
    rootfs: Option<&Path>,
    host_root: bool,
    found: impl FnOnce() -> Result<PathBuf, String>,
) -> Result<RootFs> {
    match (rootfs, host_root) {
        (Some(_), true) => bail!("--rootfs and --host-root name two roots: give one"),
        (Some(dir), false) => Ok(RootFs::Image(checked_dir(dir)?)),
        (None, true) => Ok(RootFs::Host),
        (None, false) => match found() {
            Ok(dir) => Ok(RootFs::Image(checked_dir(&dir)?)),
            Err(why) => bail!(
                "the namespace backend needs a root image for the workspace, and {why}.\n\
                 Build it with `cargo xtask images rootfs` (as root; a few minutes, cached after), \
                 or start the workspace with `cargo xtask run`, which builds it; or pass \
                 --rootfs DIR (a directory holding a root file system), or --host-root to show \
                 the agent this host's own files read-only (every file your uid may read outside \
                 /tmp, /run, /home and /root)"
            ),
        },
    }
}

/// The workspace's root from an OCI image (`--image PATH`: a layout directory or an archive
/// of one), unpacked into the image cache (digests checked, layers applied, kept by the
/// manifest's digest) or found there, with what happened said on stderr.
pub(crate) fn from_image(image: &Path) -> Result<moat_image::Unpacked> {
    let cache = image_cache()?;
    let unpacked = moat_image::unpack(image, &cache, &mut |step| {
        eprintln!("moat: image {}: {step}", image.display());
    })
    .with_context(|| format!("--image {}", image.display()))?;
    eprintln!(
        "moat: image {} ({}), {} {}",
        image.display(),
        unpacked.digest,
        if unpacked.cached {
            "cached in"
        } else {
            "unpacked into"
        },
        unpacked.root.display()
    );
    // The checks every root gets (a shell, /etc, /tmp, /dev, /proc to mount on).
    checked_dir(&unpacked.root)?;
    Ok(unpacked)
}

/// The VM's root disk for an unpacked image (an ext4 image of its root, made once).
pub(crate) fn image_disk(unpacked: &moat_image::Unpacked) -> Result<PathBuf> {
    eprintln!("moat: the VM's root disk from image {}", unpacked.digest);
    let (disk, made) = moat_image::ext4_disk(unpacked)
        .with_context(|| format!("the root disk for image {}", unpacked.digest))?;
    eprintln!(
        "moat: root disk {} {}",
        if made { "made:" } else { "cached:" },
        disk.display()
    );
    Ok(disk)
}

/// Where unpacked images are kept: `MOAT_IMAGE_CACHE`, else /var/cache/moat/images for root,
/// `$XDG_CACHE_HOME/moat/images` (or `~/.cache/moat/images`) for anyone else.
fn image_cache() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = if let Some(dir) = std::env::var_os("MOAT_IMAGE_CACHE") {
        PathBuf::from(dir)
    } else if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/cache/moat/images")
    } else {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .context(
                "neither XDG_CACHE_HOME nor HOME is set, so there is no directory to unpack                  images into: set one, or MOAT_IMAGE_CACHE",
            )?
            .join("moat/images")
    };
    // Readable by all: run by root, the workspace's own unprivileged uid reads the root.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .with_context(|| format!("cannot create the image cache {}", dir.display()))?;
    Ok(dir)
}

/// `dir`, absolute and without links, if it looks like a root file system.
fn checked_dir(dir: &Path) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(dir)
        .map_err(|e| anyhow::anyhow!("the workspace root {}: {e}", dir.display()))?;
    if canonical == Path::new("/") {
        bail!("--rootfs /: that is the host's root; say --host-root if it is meant");
    }
    for needed in ["bin/sh", "etc", "tmp", "dev", "proc"] {
        if std::fs::symlink_metadata(canonical.join(needed)).is_err() {
            bail!(
                "the workspace root {} has no /{needed}: not a root file system",
                dir.display()
            );
        }
    }
    Ok(canonical)
}

/// What of the host the workspace shows, by path: the root (minus what is masked or replaced
/// inside) and the agent's home.
pub(crate) struct Exposure {
    root: PathBuf,
    home: PathBuf,
    /// Run by root: the workspace's own host id, which is nobody else's (no file belongs to
    /// it but the home, and it has no supplementary groups): a path it has no permission to
    /// reach is not shown. Otherwise the caller's own uid and groups: every path is.
    agent_id: Option<u32>,
}

impl Exposure {
    pub(crate) fn new(root: &RootFs, home: &Path, agent_id: Option<u32>) -> Self {
        Self {
            root: match root {
                RootFs::Image(dir) => dir.clone(),
                RootFs::Host => PathBuf::from("/"),
            },
            home: canonical(home),
            agent_id,
        }
    }

    /// Whether `path` (a host path) can be reached by path inside the workspace.
    pub(crate) fn shows(&self, path: &Path) -> bool {
        self.shows_as(path, true)
    }

    /// Whether `path` lies in the workspace's view at all, whatever its permissions: for what
    /// is handed to the workspace's ids later (the run directory, whose group becomes the
    /// workspace's).
    pub(crate) fn has_in_view(&self, path: &Path) -> bool {
        self.shows_as(path, false)
    }

    fn shows_as(&self, path: &Path, judge_permissions: bool) -> bool {
        let path = canonical(path);
        if path.starts_with(&self.home) {
            return !judge_permissions || self.reachable(&self.home, &path);
        }
        let Ok(inside) = path.strip_prefix(&self.root) else {
            return false;
        };
        let inside = Path::new("/").join(inside);
        !moat_guest_init::MASKED
            .iter()
            .chain(moat_guest_init::REPLACED)
            .any(|m| inside.starts_with(m))
            && (!judge_permissions || self.reachable(&self.root, &path))
    }

    /// Whether the agent may search every directory from `base` (where its view of it starts)
    /// down to `path`, and open `path` in some way. Judged conservatively: what cannot be read
    /// is taken as reachable.
    fn reachable(&self, base: &Path, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(id) = self.agent_id else {
            return true;
        };
        // The permission bits that apply to `id`: owner's, group's (its gid is its uid) or
        // everyone else's.
        let bits = |m: &std::fs::Metadata| {
            if m.uid() == id {
                (m.mode() >> 6) & 7
            } else if m.gid() == id {
                (m.mode() >> 3) & 7
            } else {
                m.mode() & 7
            }
        };
        let mut dir = base.to_owned();
        let rest = path.strip_prefix(base).unwrap_or(Path::new(""));
        let mut components = rest.components().peekable();
        loop {
            let Ok(meta) = std::fs::metadata(&dir) else {
                return true;
            };
            match components.next() {
                // A directory on the way: it must be searchable.
                Some(c) => {
                    if bits(&meta) & 1 == 0 {
                        return false;
                    }
                    dir.push(c);
                }
                // The path itself: any permission at all.
                None => return bits(&meta) != 0,
            }
        }
    }

    /// Refuses the workspace if any of `files` would be visible inside: what each is, where,
    /// and whether the workspace's ids are given access to it later (then only its place in
    /// the view counts, [`Self::has_in_view`]).
    pub(crate) fn refuse_visible(&self, files: &[(String, PathBuf, bool)]) -> Result<()> {
        let shown: Vec<String> = files
            .iter()
            .filter(|(_, path, handed)| {
                if *handed {
                    self.has_in_view(path)
                } else {
                    self.shows(path)
                }
            })
            .map(|(what, path, _)| format!("{what} ({})", path.display()))
            .collect();
        if shown.is_empty() {
            return Ok(());
        }
        bail!(
            "refusing to start: the workspace would show the agent {}. Move {} out of the \
             workspace's root ({}) and the agent's home ({}): under /tmp, /run, /home or /root \
             of the host (hidden inside), or anywhere else on a root image",
            shown.join(", "),
            if shown.len() == 1 { "it" } else { "them" },
            self.root.display(),
            self.home.display(),
        )
    }
}

/// `path` made absolute without links, as far as it exists (a file not yet created is judged
/// by its directory).
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
            canonical(parent).join(name)
        }
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(dir: &Path) {
        for d in ["bin", "etc", "tmp", "dev", "proc"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("bin/sh"), b"").unwrap();
    }

    #[test]
    fn the_host_root_shows_everything_but_what_is_masked_and_the_home_always() {
        let home = tempfile::tempdir().unwrap();
        let e = Exposure::new(&RootFs::Host, home.path(), None);
        assert!(e.shows(Path::new("/etc/moat/secret")));
        assert!(e.shows(Path::new("/var/tmp/moat-abc/vsock_1025")));
        assert!(!e.shows(Path::new("/tmp/moat-abc/vsock_1025")));
        assert!(!e.shows(Path::new("/home/alice/.config/moat/secret")));
        assert!(!e.shows(Path::new("/root/enrolment/workspace.key")));
        assert!(!e.shows(Path::new("/proc/1/environ")));
        // The home is bound inside whatever the root: under /tmp it is still shown.
        assert!(e.shows(&home.path().join("token")));
    }

    #[test]
    fn an_image_root_shows_only_itself_and_the_home() {
        let image = tempfile::tempdir().unwrap();
        fake_root(image.path());
        let home = tempfile::tempdir().unwrap();
        let root = choose(Some(image.path()), false, || unreachable!()).unwrap();
        let e = Exposure::new(&root, home.path(), None);
        assert!(!e.shows(Path::new("/etc/moat/secret")));
        assert!(!e.shows(Path::new("/var/tmp/moat-abc/vsock_1025")));
        assert!(e.shows(&image.path().join("etc/secret")));
        assert!(!e.shows(&image.path().join("tmp/secret")));
        assert!(e.shows(&home.path().join("audit.jsonl")));
        // Through a link the same: judged where it leads.
        let link = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(image.path().join("etc"), link.path().join("l")).unwrap();
        assert!(e.shows(&link.path().join("l/secret")));
        let err = e
            .refuse_visible(&[
                (
                    "the secret \"api\"".into(),
                    image.path().join("etc/key"),
                    false,
                ),
                (
                    "the audit log".into(),
                    PathBuf::from("/var/log/moat/a.jsonl"),
                    false,
                ),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the secret \"api\"") && !err.contains("audit"),
            "{err}"
        );
    }

    #[test]
    fn run_by_root_only_what_the_workspace_id_may_reach_is_shown() {
        use std::os::unix::fs::PermissionsExt;
        let id = moat_guest_init::ids::FIRST_RUN_ID;
        let home = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::write(private.join("key"), b"k").unwrap();
        std::fs::write(dir.path().join("open"), b"o").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            dir.path().join("open"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        // The image is the temporary directory itself: paths under it are in the root.
        let image = RootFs::Image(std::fs::canonicalize(dir.path()).unwrap());
        let as_id = Exposure::new(&image, home.path(), Some(id));
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap());
        if owner != id {
            assert!(
                !as_id.shows(&private.join("key")),
                "0700 directory of another uid"
            );
            assert!(
                as_id.has_in_view(&private.join("key")),
                "in view all the same"
            );
            assert!(as_id.shows(&dir.path().join("open")));
        }
        // Given to the workspace's gid (as the run directory is), it is shown.
        std::os::unix::fs::chown(&private, None, Some(id)).ok();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o710)).unwrap();
        if std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&private).unwrap()) == id {
            std::fs::set_permissions(private.join("key"), std::fs::Permissions::from_mode(0o604))
                .unwrap();
            assert!(as_id.shows(&private.join("key")));
        }
        // Not run by root: the caller's own uid, everything shown.
        assert!(Exposure::new(&image, home.path(), None).shows(&private.join("key")));
    }

    #[test]
    fn a_root_is_chosen_or_refused_with_the_way_out() {
        assert_eq!(choose(None, true, || unreachable!()).unwrap(), RootFs::Host);
        let err = choose(None, false, || Err("no image is built".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cargo xtask images rootfs") && err.contains("--host-root"),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        let err = choose(Some(empty.path()), false, || unreachable!()).unwrap_err();
        assert!(err.to_string().contains("not a root file system"), "{err}");
        assert!(choose(Some(Path::new("/")), false, || unreachable!()).is_err());
        assert!(choose(Some(empty.path()), true, || unreachable!()).is_err());
    }
}
