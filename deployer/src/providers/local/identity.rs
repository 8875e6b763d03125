//! Which processes in `/proc` are a stage's own.
//!
//! A supervised process carries its name in its environment
//! ([`MARKER`](super::process::MARKER)), but anyone can set an environment
//! variable: a tenant in a box (`box exec -e BOXCTL_RESOURCE=…`), or another
//! stage on the same host with the same stack and stage names under another
//! state directory. The marker only says which process to look at; what
//! decides is what the kernel says about it, gathered once into [`Facts`]
//! and judged by [`check`], a pure function:
//!
//! - the marker names this stage directory (its [`StageId::digest`]), or
//!   carries no digest at all (started by a boxctl from before digests:
//!   then the working directory alone decides, so an upgrade of boxctl
//!   neither orphans nor duplicates a running stage);
//! - every uid of the process (real, effective, saved, filesystem) is the
//!   operator's, boxctl's own effective uid. Boxes run as unprivileged uids
//!   of their own user namespaces and cannot take it;
//! - its working directory is the stage directory: the same directory by
//!   device and inode, so neither another state directory nor a look-alike
//!   path in another mount namespace passes;
//! - it runs the program boxctl starts for the resource (see [`Expect`]).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::process::ProcId;

/// Hex digits of the stage directory's digest in a marker.
const DIGEST_LEN: usize = 12;

/// What `/proc/<pid>/exe` ends with once the binary was removed or replaced.
const DELETED: &str = " (deleted)";

/// Where a program that upgrades itself keeps its releases: an executable
/// `releases/<release>/<name>` (the runner's layout, `runner-image/src/upgrade.rs`).
const RELEASES: &str = "releases";

/// A file's identity: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

impl FileId {
    /// The identity of what `path` names (symlinks followed, `/proc` magic links too).
    pub fn of(path: &Path) -> Option<FileId> {
        fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// The stage directory a process must belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageId {
    /// Canonical path.
    pub dir: PathBuf,
    /// Device and inode.
    pub file: FileId,
    /// The first 12 hex digits of the SHA-256 of the canonical path.
    pub digest: String,
}

impl StageId {
    /// The identity of `dir`, or `None` while it does not exist (then no
    /// process can be working in it).
    pub fn of(dir: &Path) -> Option<StageId> {
        let dir = fs::canonicalize(dir).ok()?;
        let file = FileId::of(&dir)?;
        let digest =
            hex::encode(Sha256::digest(dir.as_os_str().as_bytes()))[..DIGEST_LEN].to_string();
        Some(StageId { dir, file, digest })
    }
}

/// A marker value, parsed.
///
/// Written as `<stack>/<stage>/<id>@<digest>`: one value compared whole, so
/// the stage directory is part of a process's name and no lookup by name can
/// forget it (a second variable could be). `@` never occurs in stack, stage
/// or resource names. A value without `@<digest>` was written by an older
/// boxctl.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// `<stack>/<stage>/<id>`.
    pub name: String,
    /// Digest of the stage directory; `None` from an older boxctl.
    pub stage: Option<String>,
}

impl Marker {
    /// The marker value of `name` in `stage`.
    pub fn value(name: &str, stage: &StageId) -> String {
        format!("{name}@{}", stage.digest)
    }

    /// Parse a marker value.
    pub fn parse(value: &str) -> Marker {
        match value.rsplit_once('@') {
            Some((name, digest))
                if digest.len() == DIGEST_LEN && digest.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Marker {
                    name: name.to_string(),
                    stage: Some(digest.to_string()),
                }
            }
            _ => Marker {
                name: value.to_string(),
                stage: None,
            },
        }
    }
}

/// What the kernel says about a process, for [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// Real, effective, saved and filesystem uid (`Uid:` of `status`).
    pub uids: [u32; 4],
    /// Target of the `exe` link as the kernel reports it (with
    /// `" (deleted)"` when the binary was removed or replaced since).
    pub exe: PathBuf,
    /// What the `cwd` link names.
    pub cwd: FileId,
}

impl Facts {
    /// Read them from a `/proc/<pid>` directory; `None` when any is
    /// unreadable (the process exited, or boxctl may not look at it).
    pub fn read(proc_dir: &Path) -> Option<Facts> {
        let status = fs::read_to_string(proc_dir.join("status")).ok()?;
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(Facts {
            uids: uids.try_into().ok()?,
            exe: fs::read_link(proc_dir.join("exe")).ok()?,
            cwd: FileId::of(&proc_dir.join("cwd"))?,
        })
    }
}

/// A process carrying a marker of the stack and stage, as found in `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its marker.
    pub marker: Marker,
    /// Its identity.
    pub process: ProcId,
    /// What the kernel says about it.
    pub facts: Facts,
}

/// What a process of one resource must be to count as it.
///
/// "The program boxctl starts" is, for a process:
/// - one of `programs`: the resolved program (its path and its canonical
///   path), also after the file was replaced by a new build (the process
///   then still runs the old one; the changed digest restarts it);
/// - a release of that program inside the stage directory, an executable of
///   the same name in `releases/<release>/`: the runner installs itself
///   there at start and each upgrade there, and re-executes into it
///   (keeping its pid, or, when a failed upgrade is rolled back, as a new
///   process started from the old release);
/// - whatever a process in `known` runs now: boxctl recorded it starting
///   (pid, start time and boot id, which no other process can have), and
///   only the process itself can change what it runs, by `exec` — a script
///   that execs its interpreter, `sh -c 'exec …'`.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// The operator: boxctl's effective uid.
    pub uid: u32,
    /// The stage directory.
    pub stage: &'a StageId,
    /// Executables boxctl starts for the resource.
    pub programs: &'a [PathBuf],
    /// Processes boxctl recorded starting for the resource.
    pub known: &'a [ProcId],
}

/// Why a process carrying a resource's marker is not that resource.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its marker names another stage directory.
    #[error("its marker names another stage directory")]
    OtherStage,
    /// It runs as another user.
    #[error("it runs as uid {0}, not as the operator (uid {1})")]
    Uid(u32, u32),
    /// It works in another directory.
    #[error("its working directory is not the stage directory")]
    Cwd,
    /// It runs another program.
    #[error("it runs {}, not the program boxctl starts", .0.display())]
    Exe(PathBuf),
}

/// Whether the process `found` is one of the resource `expect` describes.
/// The caller has matched the marker's name to the resource.
pub fn check(expect: &Expect<'_>, found: &Found) -> Result<(), Refused> {
    if found
        .marker
        .stage
        .as_ref()
        .is_some_and(|d| *d != expect.stage.digest)
    {
        return Err(Refused::OtherStage);
    }
    if let Some(uid) = found.facts.uids.iter().find(|u| **u != expect.uid) {
        return Err(Refused::Uid(*uid, expect.uid));
    }
    if found.facts.cwd != expect.stage.file {
        return Err(Refused::Cwd);
    }
    if expect.known.contains(&found.process) {
        return Ok(());
    }
    let exe = without_deleted(&found.facts.exe);
    if expect.programs.iter().any(|p| p == exe) || is_release(expect, exe) {
        Ok(())
    } else {
        Err(Refused::Exe(exe.to_path_buf()))
    }
}

/// The executable's path without the kernel's `" (deleted)"`.
fn without_deleted(exe: &Path) -> &Path {
    exe.as_os_str()
        .as_bytes()
        .strip_suffix(DELETED.as_bytes())
        .map_or(exe, |b| Path::new(OsStr::from_bytes(b)))
}

/// `<stage dir>/…/releases/<release>/<name of a program>`.
fn is_release(expect: &Expect<'_>, exe: &Path) -> bool {
    let in_releases = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|n| n == RELEASES);
    in_releases
        && exe.starts_with(&expect.stage.dir)
        && expect
            .programs
            .iter()
            .any(|p| p.file_name().is_some() && p.file_name() == exe.file_name())
}

/// The paths a resolved program may show as a process's `exe`: as given and canonical.
pub fn program_paths<'a>(programs: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in programs {
        let canonical = fs::canonicalize(p).ok();
        for q in std::iter::once(p.to_path_buf()).chain(canonical) {
            if !out.contains(&q) {
                out.push(q);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage directory and the facts of a process that is exactly one of its own.
    struct World {
        _dir: tempfile::TempDir,
        stage: StageId,
        program: PathBuf,
    }

    const OPERATOR: u32 = 1000;

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let stage_dir = dir.path().join("state/boxlite/dev");
        fs::create_dir_all(&stage_dir).unwrap();
        let program = dir.path().join("bin/boxlite-runner");
        fs::create_dir_all(program.parent().unwrap()).unwrap();
        fs::write(&program, "").unwrap();
        World {
            stage: StageId::of(&stage_dir).unwrap(),
            program: fs::canonicalize(&program).unwrap(),
            _dir: dir,
        }
    }

    fn me() -> ProcId {
        ProcId {
            pid: 4242,
            start_time: 77,
            boot_id: "boot".into(),
        }
    }

    impl World {
        fn found(&self, exe: &Path) -> Found {
            Found {
                marker: Marker::parse(&Marker::value("boxlite/dev/runner/runner-1", &self.stage)),
                process: me(),
                facts: Facts {
                    uids: [OPERATOR; 4],
                    exe: exe.to_path_buf(),
                    cwd: self.stage.file,
                },
            }
        }

        fn check(&self, found: &Found, known: &[ProcId]) -> Result<(), Refused> {
            let programs = program_paths([self.program.as_path()]);
            check(
                &Expect {
                    uid: OPERATOR,
                    stage: &self.stage,
                    programs: &programs,
                    known,
                },
                found,
            )
        }
    }

    #[test]
    fn markers_carry_the_stage_digest_and_old_ones_parse_without() {
        let w = world();
        let value = Marker::value("boxlite/dev/runner/runner-1", &w.stage);
        assert_eq!(
            Marker::parse(&value),
            Marker {
                name: "boxlite/dev/runner/runner-1".into(),
                stage: Some(w.stage.digest.clone()),
            }
        );
        assert_eq!(w.stage.digest.len(), 12);
        assert_eq!(
            Marker::parse("boxlite/dev/runner/runner-1"),
            Marker {
                name: "boxlite/dev/runner/runner-1".into(),
                stage: None,
            }
        );
        // Another directory, another digest, even with the same stack and stage names.
        let other = tempfile::tempdir().unwrap();
        let other_stage = other.path().join("state/boxlite/dev");
        fs::create_dir_all(&other_stage).unwrap();
        assert_ne!(StageId::of(&other_stage).unwrap().digest, w.stage.digest);
    }

    #[test]
    fn the_stages_own_process_counts() {
        let w = world();
        assert_eq!(w.check(&w.found(&w.program), &[]), Ok(()));
        // Its binary replaced by a new build since it started: still the program.
        let replaced = PathBuf::from(format!("{} (deleted)", w.program.display()));
        assert_eq!(w.check(&w.found(&replaced), &[]), Ok(()));
    }

    #[test]
    fn another_stage_directorys_process_does_not_count() {
        let w = world();
        let mut f = w.found(&w.program);
        f.marker.stage = Some("0123456789ab".into());
        assert_eq!(w.check(&f, &[]), Err(Refused::OtherStage));
        // A process from before digests counts only where it works.
        f.marker.stage = None;
        assert_eq!(w.check(&f, &[]), Ok(()));
        f.facts.cwd = FileId { dev: 1, ino: 2 };
        assert_eq!(w.check(&f, &[]), Err(Refused::Cwd));
    }

    #[test]
    fn a_process_of_another_uid_does_not_count_even_when_boxctl_started_it() {
        let w = world();
        for i in 0..4 {
            let mut f = w.found(&w.program);
            f.facts.uids[i] = 0x7000_0000;
            assert_eq!(
                w.check(&f, &[me()]),
                Err(Refused::Uid(0x7000_0000, OPERATOR)),
                "uid field {i}"
            );
        }
    }

    #[test]
    fn a_process_in_another_directory_does_not_count() {
        let w = world();
        let mut f = w.found(&w.program);
        f.facts.cwd = FileId {
            dev: w.stage.file.dev,
            ino: w.stage.file.ino + 1,
        };
        assert_eq!(w.check(&f, &[me()]), Err(Refused::Cwd));
    }

    #[test]
    fn a_process_running_another_program_counts_only_when_boxctl_recorded_starting_it() {
        let w = world();
        let f = w.found(Path::new("/usr/bin/python3"));
        assert_eq!(
            w.check(&f, &[]),
            Err(Refused::Exe("/usr/bin/python3".into()))
        );
        // The process boxctl started, which exec'd its interpreter.
        assert_eq!(w.check(&f, &[me()]), Ok(()));
        let other = ProcId {
            start_time: 78,
            ..me()
        };
        assert!(w.check(&f, &[other]).is_err(), "same pid, another process");
    }

    #[test]
    fn releases_of_the_program_inside_the_stage_directory_count() {
        let w = world();
        let release = w
            .stage
            .dir
            .join("data/runners/runner-1/releases/0.1.0-0123456789ab/boxlite-runner");
        assert_eq!(w.check(&w.found(&release), &[]), Ok(()));
        let pruned = PathBuf::from(format!("{} (deleted)", release.display()));
        assert_eq!(w.check(&w.found(&pruned), &[]), Ok(()));
        for not in [
            // Outside the stage directory.
            PathBuf::from("/tmp/x/releases/0.1.0/boxlite-runner"),
            // Another program's name.
            w.stage.dir.join("data/runners/runner-1/releases/0.1.0/sh"),
            // Not in a release directory.
            w.stage.dir.join("data/runners/runner-1/boxlite-runner"),
        ] {
            assert_eq!(
                w.check(&w.found(&not), &[]),
                Err(Refused::Exe(not.clone())),
                "{}",
                not.display()
            );
        }
    }

    #[test]
    fn facts_are_read_from_a_proc_directory() {
        // A fake /proc/<pid>: no root and no real process needed.
        let w = world();
        let proc_dir = tempfile::tempdir().unwrap();
        fs::write(
            proc_dir.path().join("status"),
            "Name:\tboxlite-runner\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1001\nGid:\t1000\t1000\t1000\t1000\n",
        )
        .unwrap();
        let deleted = format!("{} (deleted)", w.program.display());
        std::os::unix::fs::symlink(&deleted, proc_dir.path().join("exe")).unwrap();
        std::os::unix::fs::symlink(&w.stage.dir, proc_dir.path().join("cwd")).unwrap();
        assert_eq!(
            Facts::read(proc_dir.path()),
            Some(Facts {
                uids: [1000, 1000, 1000, 1001],
                exe: PathBuf::from(deleted),
                cwd: w.stage.file,
            })
        );
        fs::remove_file(proc_dir.path().join("cwd")).unwrap();
        assert_eq!(Facts::read(proc_dir.path()), None, "unreadable: no facts");
    }

    #[test]
    fn this_process_facts_are_its_own() {
        let f = Facts::read(Path::new("/proc/self")).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(f.uids[0], uid);
        assert_eq!(f.exe, std::env::current_exe().unwrap());
        assert_eq!(
            f.cwd,
            FileId::of(&std::env::current_dir().unwrap()).unwrap()
        );
    }
}
