//! Where data lives: a local path or an `s3://bucket/key` URL, normalised so paths compare.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// A normalised input or output location.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// An absolute, lexically normalised local path.
    Local(PathBuf),
    /// An object (or, with `dir`, a prefix) in an S3 bucket.
    S3 { bucket: String, key: String },
}

/// A location as a stage declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub location: Location,
    /// Written with a trailing `/`: a directory (or S3 prefix) output.
    pub dir: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LocationError {
    Empty,
    BadS3(&'static str),
    UnknownScheme(String),
}

impl fmt::Display for LocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocationError::Empty => f.write_str("a path cannot be empty"),
            LocationError::BadS3(why) => write!(f, "invalid S3 URL: {why}"),
            LocationError::UnknownScheme(scheme) => {
                write!(
                    f,
                    "unsupported URL scheme `{scheme}://` (imba reads local paths and s3:// URLs)"
                )
            }
        }
    }
}

impl Declared {
    /// Parses `text`, resolving a relative local path against `workdir`.
    pub fn parse(text: &str, workdir: &Path) -> Result<Declared, LocationError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(LocationError::Empty);
        }
        let dir = trimmed.ends_with('/');
        if let Some(rest) = trimmed.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(LocationError::BadS3("no bucket name"));
            }
            let key = key.trim_end_matches('/');
            if key.is_empty() {
                return Err(LocationError::BadS3("no key after the bucket"));
            }
            let key = key
                .split('/')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("/");
            return Ok(Declared {
                location: Location::S3 {
                    bucket: bucket.to_owned(),
                    key,
                },
                dir,
            });
        }
        if let Some((scheme, _)) = trimmed.split_once("://") {
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+')
            {
                return Err(LocationError::UnknownScheme(scheme.to_owned()));
            }
        }
        Ok(Declared {
            location: Location::Local(normalize(&workdir.join(trimmed))),
            dir,
        })
    }
}

/// Lexical normalisation: drops `.`, folds `..`; never touches the file system.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

impl Location {
    /// Whether `self` is `other` or lies inside it (component-wise, never by string prefix).
    pub fn is_within(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Local(a), Location::Local(b)) => a.starts_with(b),
            (
                Location::S3 {
                    bucket: ba,
                    key: ka,
                },
                Location::S3 {
                    bucket: bb,
                    key: kb,
                },
            ) => {
                ba == bb
                    && (ka == kb
                        || ka
                            .strip_prefix(kb.as_str())
                            .is_some_and(|rest| rest.starts_with('/')))
            }
            _ => false,
        }
    }

    /// How to show this location to a person: relative to `workdir` when inside it.
    pub fn display(&self, workdir: &Path) -> String {
        match self {
            Location::Local(path) => match path.strip_prefix(workdir) {
                Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
                Ok(rel) => rel.to_string_lossy().into_owned(),
                Err(_) => path.to_string_lossy().into_owned(),
            },
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }

    /// The location as path components (`s3:`, the bucket, then the key's parts), so that one
    /// inside another shares its components as a prefix.
    pub fn components(&self) -> Vec<std::ffi::OsString> {
        use std::ffi::OsString;
        match self {
            Location::Local(path) => path.iter().map(OsString::from).collect(),
            Location::S3 { bucket, key } => std::iter::once(OsString::from("s3:"))
                .chain(std::iter::once(OsString::from(bucket)))
                .chain(key.split('/').map(OsString::from))
                .collect(),
        }
    }

    /// The path of a local location; `None` for one in S3.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::S3 { .. } => None,
        }
    }

    /// Whether reading it needs a download (and deciding on it, a request).
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::S3 { .. })
    }

    /// A relative path standing for this location under another folder (quarantine, a cache):
    /// a local one relative to `workdir` (`None` outside it, or for the workdir itself), an S3
    /// one as `s3/BUCKET/KEY`.
    pub fn relative_path(&self, workdir: &Path) -> Option<PathBuf> {
        match self {
            Location::Local(target) => target
                .strip_prefix(workdir)
                .ok()
                .filter(|r| !r.as_os_str().is_empty())
                .map(Path::to_path_buf),
            Location::S3 { bucket, key } => Some(Path::new("s3").join(bucket).join(key)),
        }
    }

    /// A key that sorts every location inside a directory right after the directory itself.
    pub fn sort_key(&self) -> String {
        match self {
            Location::Local(path) => format!("file:{}", path.to_string_lossy()),
            Location::S3 { bucket, key } => format!("s3:{bucket}/{key}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(text: &str) -> Declared {
        Declared::parse(text, Path::new("/w")).expect("valid")
    }

    #[test]
    fn relative_paths_resolve_against_the_workdir() {
        assert_eq!(
            local("data/x.csv").location,
            Location::Local("/w/data/x.csv".into())
        );
        assert_eq!(local("./a/../b/").location, Location::Local("/w/b".into()));
        assert!(local("out/").dir);
        assert_eq!(local("/abs/p").location, Location::Local("/abs/p".into()));
    }

    #[test]
    fn s3_urls() {
        let d = local("s3://bucket/raw//orders.csv");
        assert_eq!(
            d.location,
            Location::S3 {
                bucket: "bucket".into(),
                key: "raw/orders.csv".into()
            }
        );
        assert_eq!(
            Declared::parse("s3:///x", Path::new("/")),
            Err(LocationError::BadS3("no bucket name"))
        );
        assert_eq!(
            Declared::parse("s3://b", Path::new("/")),
            Err(LocationError::BadS3("no key after the bucket"))
        );
        assert_eq!(
            Declared::parse("gs://b/k", Path::new("/")),
            Err(LocationError::UnknownScheme("gs".into()))
        );
    }

    #[test]
    fn within_is_component_wise() {
        assert!(local("out/a/b")
            .location
            .is_within(&local("out/a").location));
        assert!(!local("out/ab").location.is_within(&local("out/a").location));
        assert!(local("s3://b/p/x")
            .location
            .is_within(&local("s3://b/p/").location));
        assert!(!local("s3://b/px")
            .location
            .is_within(&local("s3://b/p/").location));
    }
}
