//! Manifests and indexes (OCI and Docker schema 2), and choosing a platform from an index.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::{
    OciError, Platform, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};

/// Docker schema 1 media types, which this project does not read.
const DOCKER_SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// A manifest or an index, told apart by media type (and by content when the media type is absent).
// Unboxed on purpose: one per image, and callers match on the variants directly.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ImageDocument {
    Manifest(ImageManifest),
    Index(ImageIndex),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Index,
}

/// The kind a media type names: `Ok(None)` for types that say nothing (`application/json`, ...).
fn kind_of(media_type: &str) -> Result<Option<Kind>, OciError> {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => Ok(Some(Kind::Manifest)),
        MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_LIST => Ok(Some(Kind::Index)),
        t if DOCKER_SCHEMA1.contains(&t) => Err(OciError::UnsupportedMediaType {
            media_type: essence.clone(),
            hint: "Docker schema 1 manifests are not supported; re-push the image with a current client".into(),
        }),
        _ => Ok(None),
    }
}

/// Parses a manifest or index (OCI or Docker schema 2) fetched with `media_type`.
pub fn parse_document(media_type: Option<&str>, bytes: &[u8]) -> Result<ImageDocument, OciError> {
    let shown = media_type.unwrap_or("no media type");
    let fail = |reason: String| OciError::Document {
        what: format!("manifest or index ({shown})"),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| fail(format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| fail("not a JSON object".into()))?;

    let from_header = media_type.map(kind_of).transpose()?.flatten();
    let from_body = match object.get("mediaType") {
        Some(serde_json::Value::String(t)) => kind_of(t)?,
        Some(_) => return Err(fail("`mediaType` is not a string".into())),
        None => None,
    };
    let schema_version = object
        .get("schemaVersion")
        .and_then(serde_json::Value::as_u64);
    if schema_version == Some(1) {
        return Err(OciError::UnsupportedMediaType {
            media_type: shown.to_owned(),
            hint: "Docker schema 1 manifests are not supported; re-push the image with a current client".into(),
        });
    }
    if schema_version != Some(2) {
        return Err(fail(format!(
            "schemaVersion is {:?}, expected 2",
            object.get("schemaVersion")
        )));
    }
    let from_content = match (
        object.contains_key("manifests"),
        object.contains_key("layers"),
    ) {
        (true, false) => Some(Kind::Index),
        (false, true) => Some(Kind::Manifest),
        _ => None,
    };
    let kind = match (from_header, from_body) {
        (Some(h), Some(b)) if h != b => {
            return Err(fail(format!(
                "the response's media type says {h:?} but the document says {b:?}"
            )))
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => from_content.ok_or_else(|| {
            fail("no media type, and neither `manifests` nor `layers` to tell it by".into())
        })?,
    };
    match kind {
        Kind::Manifest => serde_json::from_value(value)
            .map(ImageDocument::Manifest)
            .map_err(|e| fail(format!("invalid image manifest: {e}"))),
        Kind::Index => serde_json::from_value(value)
            .map(ImageDocument::Index)
            .map_err(|e| fail(format!("invalid image index: {e}"))),
    }
}

/// Chooses the manifest for `platform` from an index; the error lists the platforms it offers.
pub fn select_platform(index: &ImageIndex, platform: &Platform) -> Result<Descriptor, OciError> {
    let mut offered = Vec::new();
    for descriptor in index.manifests() {
        let Some(p) = descriptor.platform() else {
            continue;
        };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        if platform.matches(&os, &arch, p.variant().as_deref()) {
            return Ok(descriptor.clone());
        }
        let shown = Platform {
            os,
            architecture: arch,
            variant: p.variant().clone(),
        }
        .to_string();
        if !offered.contains(&shown) {
            offered.push(shown);
        }
    }
    let offered = if offered.is_empty() {
        "no platforms".to_owned()
    } else {
        offered.join(", ")
    };
    Err(OciError::NoPlatform {
        wanted: platform.to_string(),
        offered,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest_json(media_type: Option<&str>) -> String {
        let mt = media_type
            .map(|t| format!(r#""mediaType":"{t}","#))
            .unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":7}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":42}}]}}"#
        )
    }

    fn index_json(media_type: Option<&str>) -> String {
        let mt = media_type
            .map(|t| format!(r#""mediaType":"{t}","#))
            .unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,{mt}"manifests":[
              {{"mediaType":"{MEDIA_TYPE_OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{MEDIA_TYPE_OCI_MANIFEST}","digest":"{D2}","size":2,"platform":{{"os":"linux","architecture":"s390x"}}}},
              {{"mediaType":"{MEDIA_TYPE_OCI_MANIFEST}","digest":"{D1}","size":3,"platform":{{"os":"unknown","architecture":"unknown"}}}}
            ]}}"#
        )
    }

    #[test]
    fn tells_documents_apart_by_media_type() {
        for mt in [MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST] {
            let doc = parse_document(Some(mt), manifest_json(Some(mt)).as_bytes()).unwrap();
            let ImageDocument::Manifest(m) = doc else {
                panic!("{mt}: not a manifest")
            };
            assert_eq!(m.layers().len(), 1);
            assert_eq!(m.layers()[0].size(), 42);
        }
        for mt in [MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST] {
            let doc = parse_document(Some(mt), index_json(Some(mt)).as_bytes()).unwrap();
            assert!(
                matches!(doc, ImageDocument::Index(i) if i.manifests().len() == 3),
                "{mt}"
            );
        }
        // Parameters on the content type are ignored.
        let with_params = format!("{MEDIA_TYPE_OCI_MANIFEST}; charset=utf-8");
        assert!(matches!(
            parse_document(Some(&with_params), manifest_json(None).as_bytes()),
            Ok(ImageDocument::Manifest(_))
        ));
    }

    #[test]
    fn tells_documents_apart_by_content_without_media_type() {
        assert!(matches!(
            parse_document(None, manifest_json(None).as_bytes()),
            Ok(ImageDocument::Manifest(_))
        ));
        assert!(matches!(
            parse_document(None, index_json(None).as_bytes()),
            Ok(ImageDocument::Index(_))
        ));
        assert!(matches!(
            parse_document(Some("application/json"), index_json(None).as_bytes()),
            Ok(ImageDocument::Index(_))
        ));
        // The document's own mediaType is enough.
        assert!(matches!(
            parse_document(
                None,
                manifest_json(Some(MEDIA_TYPE_DOCKER_MANIFEST)).as_bytes()
            ),
            Ok(ImageDocument::Manifest(_))
        ));
    }

    #[test]
    fn clear_errors_for_bad_documents() {
        let cases: [(Option<&str>, String, &str); 6] = [
            (None, "not json".into(), "not JSON"),
            (None, "[1]".into(), "not a JSON object"),
            (
                None,
                r#"{"schemaVersion":2}"#.into(),
                "neither `manifests` nor `layers`",
            ),
            (
                None,
                r#"{"schemaVersion":1,"fsLayers":[]}"#.into(),
                "schema 1",
            ),
            (
                Some(MEDIA_TYPE_OCI_INDEX),
                manifest_json(Some(MEDIA_TYPE_OCI_MANIFEST)),
                "media type says",
            ),
            (
                Some(MEDIA_TYPE_OCI_MANIFEST),
                r#"{"schemaVersion":2,"layers":"x"}"#.into(),
                "invalid image manifest",
            ),
        ];
        for (mt, body, expect) in cases {
            let err = parse_document(mt, body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expect), "{body}: {err}");
        }
        let err = parse_document(Some(DOCKER_SCHEMA1[1]), b"{}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema 1"), "{err}");
    }

    #[test]
    fn selects_platform_or_lists_offers() {
        let ImageDocument::Index(index) =
            parse_document(None, index_json(None).as_bytes()).unwrap()
        else {
            panic!("not an index")
        };
        let d = select_platform(&index, &"linux/s390x".parse().unwrap()).unwrap();
        assert_eq!(d.size(), 2);
        let d = select_platform(&index, &"linux/arm64".parse().unwrap()).unwrap();
        assert_eq!(d.size(), 1);
        let d = select_platform(&index, &"linux/aarch64/v8".parse().unwrap()).unwrap();
        assert_eq!(d.size(), 1);
        let err = select_platform(&index, &"linux/amd64".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "no manifest for linux/amd64 in index; it offers linux/arm64/v8, linux/s390x, unknown/unknown"
        );
        let err = select_platform(&index, &"linux/arm64/v9".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/arm64/v9"), "{err}");
    }

    proptest! {
        #[test]
        fn parse_document_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), mt in prop::option::of("[a-z./+;= -]{0,60}")) {
            let _ = parse_document(mt.as_deref(), &bytes);
        }

        #[test]
        fn parse_document_never_panics_on_jsonish(s in "\\{(\"(schemaVersion|mediaType|manifests|layers|config)\":(2|1|\"x\"|\\[\\]|\\{\\}|null),?){0,5}\\}") {
            let _ = parse_document(None, s.as_bytes());
        }
    }
}
