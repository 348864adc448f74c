//! The store's rules, checked against what containerd's overlayfs snapshotter does.

use std::collections::HashMap;

use super::*;
use crate::snapshot::LABEL_TARGET;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// Prepares `key` over `parent`, writes `file`, and commits it as `name`.
fn layer(store: &Store, name: &str, parent: &str, file: &str) {
    let key = format!("{name}-active");
    store
        .prepare(&key, parent, HashMap::new(), Kind::Active)
        .unwrap();
    let id = store.record(&key).unwrap().id;
    std::fs::write(store.fs_dir(id).join(file), file).unwrap();
    store.commit(name, &key, labels(&[("l", name)])).unwrap();
}

#[test]
fn an_active_snapshot_without_parent_is_a_writable_bind_mount_of_its_fs() {
    let (_dir, store) = open();
    let mounts = store
        .prepare("k", "", HashMap::new(), Kind::Active)
        .unwrap();
    let id = store.record("k").unwrap().id;
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(mounts[0].source, store.fs_dir(id).to_string_lossy());
    assert_eq!(mounts[0].options, ["rw", "rbind"]);
    assert!(store.fs_dir(id).is_dir());
    assert!(store.snapshot_dir(id).join("work").is_dir());
    assert_eq!(store.mounts("k").unwrap(), mounts);
}

#[test]
fn a_chain_mounts_as_overlay_with_the_nearest_parent_first() {
    let (_dir, store) = open();
    layer(&store, "base", "", "a");
    layer(&store, "mid", "base", "b");
    let mounts = store
        .prepare("top", "mid", HashMap::new(), Kind::Active)
        .unwrap();
    let fs = |name: &str| store.fs_dir(store.record(name).unwrap().id);
    let top = store.record("top").unwrap().id;
    assert_eq!(mounts[0].kind, "overlay");
    assert_eq!(mounts[0].source, "overlay");
    let options = &mounts[0].options;
    assert!(options.contains(&format!("upperdir={}", store.fs_dir(top).display())));
    assert!(options.contains(&format!(
        "workdir={}",
        store.snapshot_dir(top).join("work").display()
    )));
    assert!(options.contains(&format!(
        "lowerdir={}:{}",
        fs("mid").display(),
        fs("base").display()
    )));
    assert!(!options.iter().any(|o| o == "xino=on"), "no lazy lower");
}

#[test]
fn views_are_read_only_binds_of_one_parent_and_overlays_of_a_chain() {
    let (_dir, store) = open();
    layer(&store, "base", "", "a");
    let one = store
        .prepare("v1", "base", HashMap::new(), Kind::View)
        .unwrap();
    let base = store.fs_dir(store.record("base").unwrap().id);
    assert_eq!(one[0].kind, "bind");
    assert_eq!(one[0].source, base.to_string_lossy());
    assert_eq!(one[0].options, ["ro", "rbind"]);
    layer(&store, "mid", "base", "b");
    let two = store
        .prepare("v2", "mid", HashMap::new(), Kind::View)
        .unwrap();
    assert_eq!(two[0].kind, "overlay");
    assert!(!two[0].options.iter().any(|o| o.starts_with("upperdir=")));
    let empty = store.prepare("v0", "", HashMap::new(), Kind::View).unwrap();
    assert_eq!(empty[0].options, ["ro", "rbind"]);
    let err = store.commit("x", "v1", HashMap::new()).unwrap_err();
    assert!(matches!(err, SnapshotError::FailedPrecondition(_)), "{err}");
}

#[test]
fn commit_replaces_the_active_snapshot_keeping_its_directory_and_measuring_it() {
    let (_dir, store) = open();
    store
        .prepare("k", "", labels(&[("old", "1")]), Kind::Active)
        .unwrap();
    let id = store.record("k").unwrap().id;
    std::fs::write(store.fs_dir(id).join("f"), vec![1u8; 10_000]).unwrap();
    store.commit("c", "k", labels(&[("new", "2")])).unwrap();
    assert!(matches!(store.stat("k"), Err(SnapshotError::NotFound(_))));
    let info = store.stat("c").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels, labels(&[("new", "2")]));
    assert_eq!(store.record("c").unwrap().id, id);
    assert!(store.fs_dir(id).join("f").is_file());
    let usage = store.usage("c").unwrap();
    assert_eq!(usage.inodes, 2, "the fs dir and the file");
    assert!(usage.size >= 10_000, "{usage:?}");
    let err = store.mounts("c").unwrap_err();
    assert!(matches!(err, SnapshotError::FailedPrecondition(_)), "{err}");
}

#[test]
fn keys_are_unique_and_parents_must_exist_and_be_committed() {
    let (_dir, store) = open();
    store
        .prepare("k", "", HashMap::new(), Kind::Active)
        .unwrap();
    let err = store
        .prepare("k", "", HashMap::new(), Kind::Active)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::AlreadyExists(_)), "{err}");
    let err = store
        .prepare("x", "missing", HashMap::new(), Kind::Active)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::NotFound(_)), "{err}");
    let err = store
        .prepare("x", "k", HashMap::new(), Kind::Active)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::InvalidArgument(_)), "{err}");
    store
        .prepare("c-active", "", HashMap::new(), Kind::Active)
        .unwrap();
    let err = store.commit("k", "c-active", HashMap::new()).unwrap_err();
    assert!(matches!(err, SnapshotError::AlreadyExists(_)), "{err}");
    // Failed prepares leave no directory behind.
    let dirs = std::fs::read_dir(store.snapshot_dir(0).parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .parse::<u64>()
                .is_ok()
        })
        .count();
    assert_eq!(dirs, 2);
}

#[test]
fn a_parent_cannot_be_removed_before_its_children_and_remove_deletes_the_directory() {
    let (_dir, store) = open();
    layer(&store, "base", "", "a");
    store
        .prepare("child", "base", HashMap::new(), Kind::Active)
        .unwrap();
    let err = store.remove("base").unwrap_err();
    assert!(matches!(err, SnapshotError::FailedPrecondition(_)), "{err}");
    let child = store.remove("child").unwrap();
    store.remove_dir(child.id);
    assert!(!store.snapshot_dir(child.id).exists());
    let base = store.remove("base").unwrap();
    store.remove_dir(base.id);
    assert!(!store.snapshot_dir(base.id).exists());
    assert!(matches!(
        store.remove("base"),
        Err(SnapshotError::NotFound(_))
    ));
}

#[test]
fn update_changes_only_labels_as_the_field_paths_say() {
    let (_dir, store) = open();
    layer(&store, "c", "", "a");
    let mut info = store.stat("c").unwrap();
    info.labels = labels(&[("a", "1"), ("b", "2")]);
    let all = store.update(info.clone(), &[]).unwrap();
    assert_eq!(all.labels, labels(&[("a", "1"), ("b", "2")]));
    info.labels = labels(&[("a", "9"), ("b", "ignored")]);
    let one = store.update(info.clone(), &["labels.a".into()]).unwrap();
    assert_eq!(one.labels, labels(&[("a", "9"), ("b", "2")]));
    info.labels = HashMap::new();
    let removed = store.update(info.clone(), &["labels.b".into()]).unwrap();
    assert_eq!(removed.labels, labels(&[("a", "9")]));
    assert!(removed.updated >= removed.created);
    let err = store.update(info, &["parent".into()]).unwrap_err();
    assert!(matches!(err, SnapshotError::InvalidArgument(_)), "{err}");
}

#[test]
fn walk_filters_like_containerd_after_a_remote_commit() {
    let (_dir, store) = open();
    layer(&store, "base", "", "a");
    store
        .prepare("active", "base", HashMap::new(), Kind::Active)
        .unwrap();
    let id = store.reserve(false).unwrap();
    store
        .insert_committed(
            "sha256:target",
            "base",
            labels(&[(LABEL_TARGET, "sha256:target")]),
            id,
            Usage::default(),
            None,
        )
        .unwrap();
    let all = store.walk(&[]).unwrap();
    assert_eq!(all.len(), 3);
    let found = store
        .walk(&[format!(
            r#"labels."{LABEL_TARGET}"==sha256:target,parent=="base""#
        )])
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "sha256:target");
    assert_eq!(found[0].kind, Kind::Committed);
    let active = store.walk(&["kind==active".into()]).unwrap();
    assert_eq!(active.len(), 1);
    assert!(store.walk(&["bad filter".into()]).is_err());
}

#[test]
fn state_survives_reopening_and_ids_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let first_id;
    {
        let store = Store::open(dir.path()).unwrap();
        layer(&store, "base", "", "a");
        store
            .prepare("k", "base", labels(&[("x", "y")]), Kind::Active)
            .unwrap();
        first_id = store.record("k").unwrap().id;
        let removed = store.remove("k").unwrap();
        store.remove_dir(removed.id);
        store
            .prepare("k2", "base", labels(&[("x", "y")]), Kind::Active)
            .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let info = store.stat("k2").unwrap();
    assert_eq!(info.parent, "base");
    assert_eq!(info.labels, labels(&[("x", "y")]));
    assert_eq!(store.stat("base").unwrap().kind, Kind::Committed);
    store
        .prepare("k3", "", HashMap::new(), Kind::Active)
        .unwrap();
    assert!(store.record("k3").unwrap().id > first_id + 1);
}

#[test]
fn cleanup_removes_only_directories_no_snapshot_owns() {
    let (_dir, store) = open();
    layer(&store, "base", "", "a");
    let orphan = store.reserve(true).unwrap();
    assert!(store.snapshot_dir(orphan).is_dir());
    assert_eq!(store.cleanup().unwrap(), 1);
    assert!(!store.snapshot_dir(orphan).exists());
    assert!(store
        .fs_dir(store.record("base").unwrap().id)
        .join("a")
        .is_file());
}

#[test]
fn a_verdict_is_recorded_once_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let id = store.reserve(false).unwrap();
    let remote = RemoteLayer {
        image: "127.0.0.1:1/app:v1".into(),
        manifest: String::new(),
        layer: "sha256:00".into(),
        compressed_chain: "sha256:11".into(),
        expected: None,
        toc_hint: None,
    };
    store
        .insert_committed(
            "sha256:chain",
            "",
            HashMap::new(),
            id,
            Usage::default(),
            Some(remote),
        )
        .unwrap();
    assert_eq!(store.pending_lazy(), ["sha256:chain"]);
    let bad = Verification::Mismatch {
        message: "no".into(),
    };
    let (_, changed) = store
        .set_verification("sha256:chain", id, bad.clone())
        .unwrap();
    assert!(changed);
    // A second verdict (another reader of the same file) changes nothing.
    let (record, changed) = store
        .set_verification(
            "sha256:chain",
            id,
            Verification::Verified {
                diff_id: "x".into(),
            },
        )
        .unwrap();
    assert!(!changed);
    assert_eq!(record.verification, bad);
    assert!(store.pending_lazy().is_empty());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.record("sha256:chain").unwrap().verification, bad);
    assert_eq!(
        store
            .record("sha256:chain")
            .unwrap()
            .remote
            .unwrap()
            .compressed_chain,
        "sha256:11"
    );
}
