use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pluto_engine::backup::{backup, BackupOptions, BackupReport, NoProgress};
use pluto_engine::check::{check, CheckOptions, CheckReport, NoCheckProgress};
use pluto_engine::keys::MasterKey;
use pluto_engine::restore::{restore, NoRestoreProgress, RestoreOptions, RestoreReport};
use pluto_engine::{Config, Home, LockMode, Repo};

// Link the store plugins the tests open by URL.
use pluto_store_fs as _;
use pluto_store_sqlite as _;

pub struct TestHome {
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub repo: Option<Repo>,
}

impl TestHome {
    pub fn new() -> Self {
        Self::with_config(Config::default())
    }

    pub fn with_config(cfg: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("home"));
        Repo::init(&home, &MasterKey::generate(), &cfg).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let repo = rt.block_on(Repo::open(home, LockMode::Exclusive)).unwrap();
        Self {
            dir,
            rt,
            repo: Some(repo),
        }
    }

    pub fn repo(&self) -> &Repo {
        self.repo.as_ref().unwrap()
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// A fresh directory inside the test's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn reopen(&mut self) {
        self.repo = None;
        let repo = self
            .rt
            .block_on(Repo::open(Home::new(self.home()), LockMode::Exclusive))
            .unwrap();
        self.repo = Some(repo);
    }

    pub fn backup_with(&self, opts: BackupOptions) -> BackupReport {
        backup(self.repo(), self.rt.handle().clone(), &opts, &NoProgress).unwrap()
    }

    pub fn backup(&self, paths: &[&Path]) -> BackupReport {
        self.backup_with(BackupOptions {
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            ..Default::default()
        })
    }

    pub fn restore(&self, spec: &str, target: &Path, include: &[&Path]) -> RestoreReport {
        let repo = self.repo();
        let snap = self.rt.block_on(repo.find_snapshot(spec)).unwrap();
        let index = self.rt.block_on(repo.load_index()).unwrap();
        let opts = RestoreOptions {
            target: target.to_path_buf(),
            include: include.iter().map(|p| p.to_path_buf()).collect(),
            threads: 0,
        };
        restore(repo, &index, &snap, &opts, &NoRestoreProgress).unwrap()
    }

    pub fn check(&self, read_data: bool) -> CheckReport {
        check(
            self.repo(),
            self.rt.handle(),
            CheckOptions { read_data },
            &NoCheckProgress,
        )
        .unwrap()
    }
}

/// Deterministic bytes: compressible text when `text`, random-looking otherwise.
pub fn bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if text {
            let word = ["alpha ", "beta ", "gamma ", "delta\n", "pluto "][(x % 5) as usize];
            out.extend_from_slice(word.as_bytes());
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A tree with every kind of entry pluto keeps.
pub fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("docs/empty")).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("docs/readme.txt"), bytes(1, 20_000, true)).unwrap();
    fs::write(root.join("docs/empty.txt"), b"").unwrap();
    fs::write(root.join("bin/blob"), bytes(2, 3 << 20, false)).unwrap();
    fs::write(root.join("bin/big"), bytes(3, 11 << 20, false)).unwrap();
    fs::write(root.join("bin/copy-of-blob"), bytes(2, 3 << 20, false)).unwrap();
    fs::set_permissions(root.join("bin/blob"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        root.join("docs/readme.txt"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let odd = root.join(std::ffi::OsStr::from_bytes(b"caf\xe9 \xff name"));
    fs::write(&odd, b"latin-1 name").unwrap();
    std::os::unix::fs::symlink("docs/readme.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let old = filetime::FileTime::from_unix_time(1_000_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("docs/readme.txt"), old).unwrap();
    filetime::set_file_mtime(root.join("docs/empty"), old).unwrap();
}

/// Asserts two trees are equal: types, modes, mtimes, sizes, contents, link targets.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    assert_eq!(
        ma.mode() & 0o7777,
        mb.mode() & 0o7777,
        "mode of {}",
        b.display()
    );
    if !ma.file_type().is_symlink() {
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "mtime of {}",
            b.display()
        );
    }
    if ma.is_file() {
        assert_eq!(
            fs::read(a).unwrap(),
            fs::read(b).unwrap(),
            "content of {}",
            b.display()
        );
    } else if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
    } else if ma.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "entries of {}", b.display());
        for n in na {
            assert_same_tree(&a.join(&n), &b.join(&n));
        }
    }
}

/// Where a restore puts an absolute source path.
pub fn restored(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}
