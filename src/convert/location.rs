//! Where an image is read from or written to: an OCI image layout, a `docker save` archive, or a
//! registry.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::oci::Reference;

use super::ConvertError;

/// An image's location, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// `oci:DIR[:TAG]`: an OCI image layout directory, optionally one tag of it.
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE`: the tarball `docker save` writes (source only).
    DockerArchive { file: PathBuf },
    /// `HOST[:PORT]/REPO[:TAG|@DIGEST]`.
    Registry(Reference),
}

impl FromStr for ImageLocation {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag is what follows the last `:` after the last `/`, so `oci:./a:b/c` is a dir.
            let name_start = rest.rfind('/').map_or(0, |i| i + 1);
            let (dir, tag) = match rest[name_start..].rfind(':') {
                Some(i) => {
                    let split = name_start + i;
                    (&rest[..split], Some(rest[split + 1..].to_owned()))
                }
                None => (rest, None),
            };
            if dir.is_empty() || tag.as_deref() == Some("") {
                return Err(ConvertError::Location(format!(
                    "{s:?}: expected oci:DIR or oci:DIR:TAG"
                )));
            }
            return Ok(Self::OciLayout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(file) = s.strip_prefix("docker-archive:") {
            if file.is_empty() {
                return Err(ConvertError::Location(format!(
                    "{s:?}: expected docker-archive:FILE"
                )));
            }
            return Ok(Self::DockerArchive {
                file: PathBuf::from(file),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(ConvertError::Location(format!(
                "{s:?}: write a registry reference without a scheme ({scheme}:// is not needed), \
                 e.g. 127.0.0.1:5000/app:v1"
            )));
        }
        let reference = s
            .parse::<Reference>()
            .map_err(|e| ConvertError::Location(format!("{s:?}: not an image reference: {e}")))?;
        Ok(Self::Registry(reference))
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OciLayout {
                dir,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", dir.display()),
            Self::OciLayout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            Self::DockerArchive { file } => write!(f, "docker-archive:{}", file.display()),
            Self::Registry(r) => write!(f, "{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_oci_layouts_with_and_without_tag() {
        assert_eq!(
            "oci:/tmp/img:v1".parse::<ImageLocation>().unwrap(),
            ImageLocation::OciLayout {
                dir: "/tmp/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci:rel/dir".parse::<ImageLocation>().unwrap(),
            ImageLocation::OciLayout {
                dir: "rel/dir".into(),
                tag: None
            }
        );
        assert_eq!(
            "oci:./a:b/c".parse::<ImageLocation>().unwrap(),
            ImageLocation::OciLayout {
                dir: "./a:b/c".into(),
                tag: None
            }
        );
        assert!("oci:".parse::<ImageLocation>().is_err());
        assert!("oci:dir:".parse::<ImageLocation>().is_err());
    }

    #[test]
    fn parses_docker_archives() {
        assert_eq!(
            "docker-archive:/x/img.tar"
                .parse::<ImageLocation>()
                .unwrap(),
            ImageLocation::DockerArchive {
                file: "/x/img.tar".into()
            }
        );
    }

    #[test]
    fn rejects_urls_with_a_hint() {
        let err = "http://127.0.0.1:5000/a"
            .parse::<ImageLocation>()
            .unwrap_err();
        assert!(err.to_string().contains("without a scheme"), "{err}");
    }
}
