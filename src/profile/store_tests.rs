use super::*;

fn newest(candidates: Vec<Referrer>) -> Option<Referrer> {
    newest_first(candidates).into_iter().next()
}

fn entry(artifact_type: &str, digest: &Digest, created: Option<&str>) -> Value {
    let mut e = json!({
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "digest": digest.to_string(),
        "size": 512,
        "artifactType": artifact_type,
    });
    if let Some(c) = created {
        e["annotations"] = json!({ CREATED: c, "org.example.other": "x" });
    }
    e
}

fn index(entries: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap()
}

#[test]
fn a_referrers_answer_yields_only_lazysnap_profiles_and_the_newest_wins() {
    let (sig, old, new, later_listed_older) = (
        Digest::of(b"sig"),
        Digest::of(b"old"),
        Digest::of(b"new"),
        Digest::of(b"older"),
    );
    let bytes = index(vec![
        entry(
            "application/vnd.example.signature.v1",
            &sig,
            Some("2030-01-01T00:00:00Z"),
        ),
        entry(MEDIA_TYPE, &old, Some("2026-01-01T00:00:00.000Z")),
        entry(MEDIA_TYPE, &new, Some("2026-06-01T00:00:00.000Z")),
        entry(
            MEDIA_TYPE,
            &later_listed_older,
            Some("2025-01-01T00:00:00.000Z"),
        ),
    ]);
    let found = profiles_in_index(&bytes).unwrap();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found.iter().all(|r| r.digest != sig && r.size == 512));
    assert_eq!(newest(found.clone()).unwrap().digest, new);
    let order: Vec<Digest> = newest_first(found).into_iter().map(|r| r.digest).collect();
    assert_eq!(order, vec![new, old, later_listed_older]);
}

#[test]
fn equal_dates_pick_the_last_listed_and_no_entries_pick_none() {
    let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
    let found = profiles_in_index(&index(vec![
        entry(MEDIA_TYPE, &a, None),
        entry(MEDIA_TYPE, &b, None),
    ]))
    .unwrap();
    assert_eq!(newest(found.clone()).unwrap().digest, b);
    // Listed twice (by the API and the tag): tried once.
    let twice = [found.clone(), found].concat();
    assert_eq!(newest_first(twice).len(), 2);
    assert_eq!(newest(profiles_in_index(&index(vec![])).unwrap()), None);
    // An index without `manifests` (as a registry may send for none) holds no profile.
    assert!(profiles_in_index(br#"{"schemaVersion":2}"#)
        .unwrap()
        .is_empty());
}

#[test]
fn unreadable_indexes_are_errors_and_unreadable_entries_are_passed_over() {
    assert!(profiles_in_index(b"<html>").is_err());
    assert!(profiles_in_index(br#"{"manifests":{}}"#).is_err());
    let good = Digest::of(b"good");
    let mut bad_digest = entry(MEDIA_TYPE, &good, None);
    bad_digest["digest"] = json!("sha256:xyz");
    let mut negative = entry(MEDIA_TYPE, &good, None);
    negative["size"] = json!(-1);
    let mut an_index = entry(MEDIA_TYPE, &good, None);
    an_index["mediaType"] = json!(MEDIA_TYPE_OCI_INDEX);
    let found = profiles_in_index(&index(vec![
        bad_digest,
        negative,
        an_index,
        entry(MEDIA_TYPE, &good, None),
    ]))
    .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].digest, good);
}

#[test]
fn embedded_data_is_used_only_when_it_is_what_its_descriptor_names() {
    let bytes = b"the profile document".to_vec();
    let (digest, size) = (Digest::of(&bytes), bytes.len() as u64);
    let data = embed(&bytes, 1024).unwrap();
    assert_eq!(
        embedded(Some(&data), &digest, size, 1024),
        Some(bytes.clone())
    );
    // Other bytes under the same digest, a wrong size, past the bound, not base64, none at all.
    let other = embed(b"another document!!!!", 1024).unwrap();
    assert_eq!(embedded(Some(&other), &digest, size, 1024), None);
    assert_eq!(embedded(Some(&data), &digest, size + 1, 1024), None);
    assert_eq!(embedded(Some(&data), &digest, size, size - 1), None);
    assert_eq!(embedded(Some("not base64!"), &digest, size, 1024), None);
    assert_eq!(embedded(None, &digest, size, 1024), None);
    // A long text is refused before it is decoded, whatever size the descriptor claims.
    let long = "A".repeat(4096);
    assert_eq!(embedded(Some(&long), &digest, 10, 1024), None);
    assert_eq!(embed(&bytes, size - 1), None);
}

#[test]
fn the_tag_index_keeps_other_artifacts_and_replaces_an_older_profile() {
    let manifest = br#"{"artifact":1}"#.repeat(50);
    let (sig, old, new) = (
        Digest::of(b"sig"),
        Digest::of(b"old"),
        Digest::of(&manifest),
    );
    let sig_entry = entry("application/vnd.example.signature.v1", &sig, Some("x"));
    let existing = index(vec![sig_entry.clone(), entry(MEDIA_TYPE, &old, None)]);
    let descriptor = referrer_descriptor(&new, &manifest, "2026-12-03T01:00:00.000Z");
    let updated = updated_index(Some(&existing), descriptor.clone()).unwrap();
    let parsed: Value = serde_json::from_slice(&updated).unwrap();
    assert_eq!(parsed["mediaType"], MEDIA_TYPE_OCI_INDEX);
    assert_eq!(parsed["schemaVersion"], 2);
    assert_eq!(parsed["manifests"], json!([sig_entry, descriptor]));
    let found = profiles_in_index(&updated).unwrap();
    assert_eq!(
        found,
        vec![Referrer {
            digest: new,
            size: 700,
            created: "2026-12-03T01:00:00.000Z".into(),
            manifest: Some(manifest),
        }]
    );
    // No tag yet: a new index with the one entry.
    let fresh = updated_index(None, descriptor.clone()).unwrap();
    let parsed: Value = serde_json::from_slice(&fresh).unwrap();
    assert_eq!(parsed["manifests"], json!([descriptor]));
    assert!(updated_index(Some(b"[1]"), descriptor).is_err());
}

#[test]
fn the_artifact_manifest_has_the_referrers_layout() {
    let image = FetchedManifest {
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
        digest: Digest::of(b"image"),
        bytes: Bytes::from_static(b"image"),
    };
    let doc = Digest::of(b"doc");
    let bytes = artifact_manifest(MEDIA_TYPE_OCI_MANIFEST, &image, &doc, b"doc", "2026");
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(m["artifactType"], MEDIA_TYPE);
    assert_eq!(m["config"]["mediaType"], EMPTY_MEDIA_TYPE);
    assert_eq!(m["config"]["size"], 2);
    assert_eq!(
        m["config"]["digest"],
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    assert_eq!(m["layers"][0]["digest"], doc.to_string());
    assert_eq!(m["subject"]["digest"], image.digest.to_string());
    assert_eq!(m["subject"]["size"], 5);
    // The document rides along (base64 of "doc"), up to the embedding bound.
    assert_eq!(m["layers"][0]["data"], "ZG9j");
    let parsed: ArtifactManifest = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(parsed.subject.unwrap().digest, image.digest);
    let big = vec![b'x'; MAX_EMBEDDED as usize + 1];
    let bytes = artifact_manifest(
        MEDIA_TYPE_OCI_MANIFEST,
        &image,
        &Digest::of(&big),
        &big,
        "t",
    );
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(m["layers"][0].get("data").is_none());
    let fits = vec![b'x'; MAX_EMBEDDED as usize];
    let bytes = artifact_manifest(
        MEDIA_TYPE_OCI_MANIFEST,
        &image,
        &Digest::of(&fits),
        &fits,
        "t",
    );
    assert!(bytes.len() as u64 <= MAX_MANIFEST_BYTES, "{}", bytes.len());
}

#[test]
fn dates_are_rfc3339_utc_and_sort_as_strings() {
    let at = |secs: u64, millis: u64| {
        rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(secs * 1000 + millis))
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
    assert_eq!(at(1_709_164_799, 999), "2024-02-28T23:59:59.999Z");
    assert_eq!(at(1_735_689_600, 0), "2025-01-01T00:00:00.000Z");
    assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
    assert!(at(1_709_164_799, 999) < at(1_709_164_800, 0));
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn arbitrary_entry() -> impl Strategy<Value = Value> {
        (
            prop::sample::select(vec![MEDIA_TYPE, "application/vnd.example.sbom.v1", ""]),
            any::<[u8; 4]>(),
            prop::option::of("[0-9:TZ.-]{0,24}"),
            any::<bool>(),
        )
            .prop_map(|(artifact_type, seed, created, well_formed)| {
                let mut e = entry(artifact_type, &Digest::of(&seed), created.as_deref());
                if !well_formed {
                    e["size"] = json!("large");
                }
                e
            })
    }

    proptest! {
        /// Any bytes: an error or a list, never a panic.
        #[test]
        fn indexes_of_any_bytes_are_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = profiles_in_index(&bytes);
            let _ = updated_index(Some(&bytes), referrer_descriptor(&Digest::of(b"x"), b"x", "t"));
        }

        /// An update lists the new profile as the only lazysnap one and keeps every other entry,
        /// in order.
        #[test]
        fn an_update_keeps_others_and_lists_one_profile(entries in prop::collection::vec(arbitrary_entry(), 0..12)) {
            let others: Vec<Value> = entries
                .iter()
                .filter(|e| e["artifactType"] != MEDIA_TYPE)
                .cloned()
                .collect();
            let new = Digest::of(b"new");
            let descriptor = referrer_descriptor(&new, b"not new", "2026-12-03T00:00:00.000Z");
            let updated = updated_index(Some(&index(entries)), descriptor.clone()).unwrap();
            let parsed: Value = serde_json::from_slice(&updated).unwrap();
            let mut expected = others;
            expected.push(descriptor);
            prop_assert_eq!(&parsed["manifests"], &json!(expected));
            let found = profiles_in_index(&updated).unwrap();
            prop_assert_eq!(found.len(), 1);
            prop_assert_eq!(newest(found).unwrap().digest, new);
        }
    }
}
