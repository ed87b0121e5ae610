//! A reference-model test (as mountpoint-s3 does): proptest generates sequences of file
//! operations, runs each on the mount and on an in-memory model, and compares the outcomes
//! (content or error kind) after every step and the whole tree at the end.

use homefs_tests::mount::mounted_alice;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind, Seek, SeekFrom, Write};
use std::path::Path;

/// The names operations use: two in the root, two in a directory that may not exist.
const FILES: [&str; 4] = ["a", "b", "d/c", "d/e"];
const DIR: &str = "d";

#[derive(Debug, Clone)]
enum Op {
    Write { f: usize, offset: u32, len: u32, byte: u8 },
    Truncate { f: usize, len: u32 },
    Read { f: usize },
    Rename { from: usize, to: usize },
    Unlink { f: usize },
    Mkdir,
    Rmdir,
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..FILES.len();
    prop_oneof![
        4 => (f.clone(), 0..300_000u32, 0..200_000u32, any::<u8>())
            .prop_map(|(f, offset, len, byte)| Op::Write { f, offset, len, byte }),
        2 => (f.clone(), 0..400_000u32).prop_map(|(f, len)| Op::Truncate { f, len }),
        3 => f.clone().prop_map(|f| Op::Read { f }),
        2 => (f.clone(), f.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => f.prop_map(|f| Op::Unlink { f }),
        1 => Just(Op::Mkdir),
        1 => Just(Op::Rmdir),
    ]
}

/// What the files should hold: regular files by path, and whether the directory exists.
#[derive(Debug, Default)]
struct Model {
    files: BTreeMap<&'static str, Vec<u8>>,
    dir: bool,
}

type Outcome = Result<Option<Vec<u8>>, ErrorKind>;

impl Model {
    fn parent_exists(&self, path: &str) -> bool {
        !path.starts_with("d/") || self.dir
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::Write { f, offset, len, byte } => {
                let p = FILES[f];
                if !self.parent_exists(p) {
                    return Err(ErrorKind::NotFound);
                }
                let data = self.files.entry(p).or_default();
                let (start, end) = (offset as usize, offset as usize + len as usize);
                // A write of nothing changes nothing (not even the size).
                if len > 0 {
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[start..end].fill(byte);
                }
                Ok(None)
            }
            Op::Truncate { f, len } => {
                let data = self.files.get_mut(FILES[f]).ok_or(ErrorKind::NotFound)?;
                data.resize(len as usize, 0);
                Ok(None)
            }
            Op::Read { f } => self.files.get(FILES[f]).cloned().map(Some).ok_or(ErrorKind::NotFound),
            Op::Rename { from, to } => {
                let (from, to) = (FILES[from], FILES[to]);
                if !self.files.contains_key(from) || !self.parent_exists(to) {
                    return Err(ErrorKind::NotFound);
                }
                let data = self.files.remove(from).expect("checked above");
                self.files.insert(to, data);
                Ok(None)
            }
            Op::Unlink { f } => self.files.remove(FILES[f]).map(|_| None).ok_or(ErrorKind::NotFound),
            Op::Mkdir => {
                if self.dir {
                    return Err(ErrorKind::AlreadyExists);
                }
                self.dir = true;
                Ok(None)
            }
            Op::Rmdir => {
                if !self.dir {
                    return Err(ErrorKind::NotFound);
                }
                if self.files.keys().any(|p| p.starts_with("d/")) {
                    return Err(ErrorKind::DirectoryNotEmpty);
                }
                self.dir = false;
                Ok(None)
            }
        }
    }

    fn tree(&self) -> BTreeSet<String> {
        let mut t: BTreeSet<String> = self.files.keys().map(|p| p.to_string()).collect();
        if self.dir {
            t.insert(DIR.to_string());
        }
        t
    }
}

/// The same operation on the mount, under `root`.
fn run(root: &Path, op: &Op) -> Outcome {
    let kind = |e: io::Error| e.kind();
    match *op {
        Op::Write { f, offset, len, byte } => {
            let mut file =
                OpenOptions::new().write(true).create(true).truncate(false).open(root.join(FILES[f])).map_err(kind)?;
            file.seek(SeekFrom::Start(u64::from(offset))).map_err(kind)?;
            file.write_all(&vec![byte; len as usize]).map_err(kind)?;
            Ok(None)
        }
        Op::Truncate { f, len } => {
            let file = OpenOptions::new().write(true).open(root.join(FILES[f])).map_err(kind)?;
            file.set_len(u64::from(len)).map_err(kind)?;
            Ok(None)
        }
        Op::Read { f } => fs::read(root.join(FILES[f])).map(Some).map_err(kind),
        Op::Rename { from, to } => fs::rename(root.join(FILES[from]), root.join(FILES[to])).map(|_| None).map_err(kind),
        Op::Unlink { f } => fs::remove_file(root.join(FILES[f])).map(|_| None).map_err(kind),
        Op::Mkdir => fs::create_dir(root.join(DIR)).map(|_| None).map_err(kind),
        Op::Rmdir => fs::remove_dir(root.join(DIR)).map(|_| None).map_err(kind),
    }
}

fn tree(root: &Path) -> BTreeSet<String> {
    let mut t = BTreeSet::new();
    for e in fs::read_dir(root).expect("list the case's directory") {
        let name = e.expect("a directory entry").file_name().to_string_lossy().into_owned();
        if name == DIR {
            for c in fs::read_dir(root.join(DIR)).expect("list d") {
                t.insert(format!("{DIR}/{}", c.expect("an entry of d").file_name().to_string_lossy()));
            }
        }
        t.insert(name);
    }
    t
}

#[test]
fn mount_matches_reference_model() {
    let Some((_server, m)) = mounted_alice("mount_matches_reference_model", None) else { return };
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    let case = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        // Each case (and each shrinking step) in a fresh directory of the mount.
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = m.join(&format!("case{n}"));
        fs::create_dir(&root).expect("create the case's directory");
        let mut model = Model::default();
        for (i, op) in ops.iter().enumerate() {
            let (want, got) = (model.apply(op), run(&root, op));
            prop_assert_eq!(
                want.as_ref().map(|o| o.as_ref().map(|d| blake3::hash(d))),
                got.as_ref().map(|o| o.as_ref().map(|d| blake3::hash(d))),
                "step {} {:?}",
                i,
                op
            );
        }
        prop_assert_eq!(model.tree(), tree(&root));
        Ok(())
    });
    if let Err(e) = result {
        panic!("the mount differs from the model: {e}");
    }
}
