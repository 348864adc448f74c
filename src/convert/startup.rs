//! Start-up sets: which files of each layer a container reads first, so the conversion can put
//! them first and record them in the TOC. From a recorded profile ([`from_profile`]) or, with no
//! recording, from the image's entrypoint and the libraries it links ([`super::elf`]).

use std::collections::HashSet;

use serde::Serialize;

use crate::profile::Profile;

use super::SourceLayer;

/// Where a layer's start-up set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartupSource {
    /// A recorded start-up profile (`--profile`).
    Profile,
    /// The entrypoint's executable, its loader and libraries (`--startup-elf`).
    Elf,
}

/// What was put first in one converted layer.
#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub source: StartupSource,
    /// Files now leading the layer, in access order (what the TOC records).
    pub files: usize,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// Names asked for that the layer does not hold as a movable file.
    pub skipped: usize,
    /// Why nothing moved, when nothing did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Each source layer's start-up names from `profile`, in first-access order (empty where the
/// profile has nothing for the layer).
///
/// A profile layer matches a source layer with the same blob digest (the profiled image itself),
/// else the same `diff_id` (the same tar in another encoding); when the profile names exactly as
/// many layers as the source has, the layers left unmatched pair up by position. Each profile
/// layer is used once.
pub fn from_profile(profile: &Profile, layers: &[SourceLayer]) -> Vec<Vec<String>> {
    let mut used = vec![false; profile.layers.len()];
    let mut chosen: Vec<Option<usize>> = vec![None; layers.len()];
    let mut claim = |matches: &dyn Fn(usize, usize) -> bool, chosen: &mut Vec<Option<usize>>| {
        for (i, slot) in chosen.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            if let Some(p) = (0..profile.layers.len()).find(|&p| !used[p] && matches(i, p)) {
                used[p] = true;
                *slot = Some(p);
            }
        }
    };
    claim(
        &|i, p| layers[i].digest == Some(profile.layers[p].digest),
        &mut chosen,
    );
    claim(
        &|i, p| profile.layers[p].diff_id == Some(layers[i].diff_id),
        &mut chosen,
    );
    if profile.layers.len() == layers.len() {
        claim(&|i, p| i == p, &mut chosen);
    }
    chosen
        .into_iter()
        .map(|p| {
            let Some(p) = p else { return Vec::new() };
            let mut seen = HashSet::new();
            profile.layers[p]
                .accesses
                .iter()
                .filter(|a| seen.insert(a.name.as_str()))
                .map(|a| a.name.clone())
                .collect()
        })
        .collect()
}
