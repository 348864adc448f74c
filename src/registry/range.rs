//! Range reads of a blob: the one request every lazy read becomes.
//!
//! [`Client::blob_range`] checks the answer's status and headers and hands back its body to read
//! piece by piece ([`RangeBody`]), so that a caller can use the first bytes of a span (the chunk a
//! reader waits for) while the rest (the read-ahead riding along) is still on the wire.
//! [`Client::get_blob_range`] reads it whole. Either way no more than the bytes asked for is
//! ever read.

use std::ops::Range;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};

use super::client::Target;
use super::{Client, RegistryError};
use crate::oci::{Digest, Reference};

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) → `(FIRST, LAST)`, when well formed.
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    let total = total.trim();
    if first > last || (total != "*" && total.parse::<u64>().ok()? <= last) {
        return None;
    }
    Some((first, last))
}

/// The body of a range answer whose headers passed: read it with [`Self::next`].
#[derive(Debug)]
pub struct RangeBody {
    response: Response,
    reference: Reference,
    digest: Digest,
    range: Range<u64>,
    /// Bytes read so far.
    read: u64,
}

impl RangeBody {
    /// The next piece of the body, `None` once all the bytes asked for have come. Fails if the
    /// connection breaks, if the body ends short, or as soon as a piece would take it past the
    /// range (the rest is never read: at most one read of the connection's buffer beyond it).
    pub async fn next(&mut self) -> Result<Option<Bytes>, RegistryError> {
        let wanted = self.range.end - self.range.start;
        let piece = self
            .response
            .chunk()
            .await
            .map_err(|error| RegistryError::Transport {
                reference: self.reference.to_string(),
                context: format!(
                    "reading bytes {}..{} of blob {}",
                    self.range.start, self.range.end, self.digest
                ),
                error,
            })?;
        match piece {
            Some(piece) if self.read + piece.len() as u64 > wanted => Err(self.fail(format!(
                "the registry sent more than the {wanted} bytes asked for; the read was stopped"
            ))),
            Some(piece) => {
                self.read += piece.len() as u64;
                Ok(Some(piece))
            }
            None if self.read == wanted => Ok(None),
            None => Err(self.fail(format!(
                "got {} bytes instead of {wanted} (the range runs past the end of the blob?)",
                self.read
            ))),
        }
    }

    fn fail(&self, detail: String) -> RegistryError {
        RegistryError::Range {
            reference: self.reference.to_string(),
            digest: self.digest,
            start: self.range.start,
            end: self.range.end,
            detail,
        }
    }
}

impl Client {
    /// GET `range` of a blob with one `Range` request, read whole.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest, start = range.start, end = range.end))]
    pub async fn get_blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let mut body = self.blob_range(reference, digest, range.clone()).await?;
        let wanted = usize::try_from(range.end - range.start).map_err(|_| {
            body.fail(format!(
                "{} bytes is too large to hold in memory",
                range.end - range.start
            ))
        })?;
        let mut out = Vec::with_capacity(wanted.min(16 << 20));
        while let Some(piece) = body.next().await? {
            out.extend_from_slice(&piece);
        }
        Ok(Bytes::from(out))
    }

    /// Sends the GET of `range` of a blob and checks the answer's status and headers (206 with
    /// the very range asked for, or 200 with the whole blob when the range is all of it); the
    /// body is the caller's to read.
    pub async fn blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<RangeBody, RegistryError> {
        let fail = |detail: String| RegistryError::Range {
            reference: reference.to_string(),
            digest: *digest,
            start: range.start,
            end: range.end,
            detail,
        };
        if range.start >= range.end {
            return Err(fail("empty range".to_owned()));
        }
        let mut headers = HeaderMap::new();
        let value = format!("bytes={}-{}", range.start, range.end - 1);
        headers.insert(
            RANGE,
            HeaderValue::from_str(&value).map_err(|e| fail(e.to_string()))?,
        );
        let response = self.blob_response(reference, digest, headers).await?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let total = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('/').next())
                    .map(str::to_owned);
                let size = total.map_or_else(String::new, |t| format!(" of {t} bytes"));
                return Err(fail(format!(
                    "range not satisfiable (HTTP 416): beyond the end of the blob{size}"
                )));
            }
            // A range covering the whole blob may be answered with the whole blob.
            StatusCode::OK if range.start == 0 && response.content_length() == Some(range.end) => {}
            StatusCode::OK => {
                return Err(fail(
                    "the registry ignored the Range header and sent the whole blob".to_owned(),
                ));
            }
            _ => {
                return Err(self
                    .error_for(response, reference, Target::Blob, &format!("blob {digest}"))
                    .await)
            }
        }
        let wanted = range.end - range.start;
        if response.status() == StatusCode::PARTIAL_CONTENT {
            let content_range = response
                .headers()
                .get(CONTENT_RANGE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            match content_range.as_deref().map(parse_content_range) {
                Some(Some((first, last))) if first == range.start && last == range.end - 1 => {}
                Some(Some((first, last))) if first == range.start && last < range.end - 1 => {
                    return Err(fail(format!(
                        "the registry sent bytes {first}-{last} only (the range runs past the end \
                         of the blob?)"
                    )));
                }
                Some(_) => {
                    let shown: String =
                        content_range.unwrap_or_default().chars().take(80).collect();
                    return Err(fail(format!(
                        "the registry answered with Content-Range {shown:?}, not the range asked for"
                    )));
                }
                None => {
                    return Err(fail(
                        "the registry answered 206 without a Content-Range header".to_owned(),
                    ))
                }
            }
        }
        if let Some(len) = response.content_length().filter(|&len| len != wanted) {
            return Err(fail(format!(
                "the registry announces a body of {len} bytes for a range of {wanted}"
            )));
        }
        Ok(RangeBody {
            response,
            reference: reference.clone(),
            digest: *digest,
            range,
            read: 0,
        })
    }
}
