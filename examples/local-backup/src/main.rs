//! pluto's main job on embedded defaults, in one command:
//!
//! ```text
//! cargo run -p local-backup -- [FOLDER]
//! ```
//!
//! Creates a node home in a temporary directory (SQLite catalog, local pack
//! store, no external service), backs FOLDER up (default: the current
//! directory), backs it up again to show the incremental path, restores
//! the latest snapshot into another temporary directory, verifies every
//! blob, and compares the restored tree with the original byte for byte.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pluto_engine::backup::{backup, BackupOptions, NoProgress};
use pluto_engine::check::{check, CheckOptions, NoCheckProgress};
use pluto_engine::keys::MasterKey;
use pluto_engine::restore::{restore, NoRestoreProgress, RestoreOptions};
use pluto_engine::{Config, Home, LockMode, Repo};

// The example picks the default plugins.
use pluto_store_fs as _;
use pluto_store_sqlite as _;

fn main() -> Result<()> {
    let folder = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let folder = std::path::absolute(&folder)?;
    let tmp = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let home = Home::new(tmp.path().join("home"));
    Repo::init(&home, &MasterKey::generate(), &Config::default())?;
    let repo = rt.block_on(Repo::open(home, LockMode::Exclusive))?;
    println!(
        "node {} in {}",
        repo.keys.node_id().short(),
        repo.home.root().display()
    );

    let opts = BackupOptions {
        paths: vec![folder.clone()],
        ..Default::default()
    };
    for run in ["first backup", "second backup (incremental)"] {
        let t = Instant::now();
        let r = backup(&repo, rt.handle().clone(), &opts, &NoProgress)?;
        let s = &r.summary;
        println!(
            "{run}: snapshot {}: {} new, {} changed, {} unmodified files; read {:.1} MB, stored {:.1} MB in {:.2}s",
            r.snapshot.short(),
            s.files_new,
            s.files_changed,
            s.files_unmodified,
            s.bytes_read as f64 / 1e6,
            s.bytes_added_packed as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        for w in &r.warnings {
            println!("  warning: {w}");
        }
    }

    let target = tmp.path().join("restored");
    let snap = rt.block_on(repo.find_snapshot("latest"))?;
    let index = rt.block_on(repo.load_index())?;
    let t = Instant::now();
    let rr = restore(
        &repo,
        &index,
        &snap,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        },
        &NoRestoreProgress,
    )?;
    println!(
        "restore: {} files, {:.1} MB in {:.2}s",
        rr.files_restored,
        rr.bytes_written as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    if !rr.errors.is_empty() {
        bail!("restore failed: {:?}", rr.errors);
    }
    let report = check(
        &repo,
        rt.handle(),
        CheckOptions { read_data: true },
        &NoCheckProgress,
    )?;
    if !report.ok() {
        bail!("check failed: {:?}", report.errors);
    }
    println!(
        "check --read-data: {} packs, {} blobs, no errors",
        report.packs, report.blobs
    );

    let restored = target.join(folder.strip_prefix("/")?);
    let files = compare(&folder, &restored)?;
    println!(
        "compared {files} files: the restored tree is identical to {}",
        folder.display()
    );
    Ok(())
}

/// Compares two trees (content, type, mode, symlink targets); returns the
/// number of regular files compared. Unreadable source files are skipped,
/// as the backup skipped them.
fn compare(a: &Path, b: &Path) -> Result<u64> {
    let ma = fs::symlink_metadata(a)?;
    let mb =
        fs::symlink_metadata(b).with_context(|| format!("{} was not restored", b.display()))?;
    if ma.file_type() != mb.file_type() || ma.mode() & 0o7777 != mb.mode() & 0o7777 {
        bail!("{} differs in type or mode", b.display());
    }
    if ma.is_file() {
        let Ok(da) = fs::read(a) else { return Ok(0) };
        if da != fs::read(b)? {
            bail!("{} differs in content", b.display());
        }
        return Ok(1);
    }
    if ma.file_type().is_symlink() {
        if fs::read_link(a)? != fs::read_link(b)? {
            bail!("{} differs in target", b.display());
        }
        return Ok(0);
    }
    let mut n = 0;
    if ma.is_dir() {
        let Ok(entries) = fs::read_dir(a) else {
            return Ok(0);
        };
        for e in entries {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_file() || ft.is_dir() || ft.is_symlink() {
                n += compare(&e.path(), &b.join(e.file_name()))?;
            }
        }
    }
    Ok(n)
}
