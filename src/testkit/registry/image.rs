//! The content a fake or real registry serves in the tests: a two-platform OCI image
//! whose digests are computed, not made up, so a client can check what it received.

use bytes::Bytes;
use serde_json::json;

/// Media types a preheat meets.
pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
}

/// Content addressed by its digest.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub media_type: &'static str,
    pub bytes: Bytes,
}

impl Blob {
    pub(super) fn new(media_type: &'static str, bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob {
            digest: digest(&bytes),
            media_type,
            bytes,
        }
    }

    fn json(media_type: &'static str, value: serde_json::Value) -> Blob {
        Blob::new(
            media_type,
            serde_json::to_vec(&value).expect("JSON serialises"),
        )
    }

    /// The OCI descriptor of this blob.
    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A multi-platform image: an index over one manifest per platform, each with a config
/// and one layer.
#[derive(Debug, Clone)]
pub struct Image {
    pub index: Blob,
    /// Platform manifests, in index order.
    pub manifests: Vec<Blob>,
    /// Configs and layers, in upload order.
    pub blobs: Vec<Blob>,
}

impl Image {
    /// linux/amd64 and linux/arm64; `seed` varies the content (and so every digest).
    pub fn sample(seed: &str) -> Image {
        let mut manifests = Vec::new();
        let mut blobs = Vec::new();
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let layer = Blob::new(
                media::OCI_LAYER,
                format!("tether test layer {seed} linux/{arch}\n").into_bytes(),
            );
            let config = Blob::json(
                media::OCI_CONFIG,
                json!({
                    "architecture": arch,
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
                }),
            );
            let manifest = Blob::json(
                media::OCI_MANIFEST,
                json!({
                    "schemaVersion": 2,
                    "mediaType": media::OCI_MANIFEST,
                    "config": config.descriptor(),
                    "layers": [layer.descriptor()],
                }),
            );
            let mut entry = manifest.descriptor();
            entry["platform"] = json!({"architecture": arch, "os": "linux"});
            entries.push(entry);
            blobs.push(config);
            blobs.push(layer);
            manifests.push(manifest);
        }
        let index = Blob::json(
            media::OCI_INDEX,
            json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": entries}),
        );
        Image {
            index,
            manifests,
            blobs,
        }
    }

    pub(super) fn manifest(&self, digest: &str) -> Option<&Blob> {
        std::iter::once(&self.index)
            .chain(&self.manifests)
            .find(|m| m.digest == digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_index_lists_its_platform_manifests_by_digest() {
        let image = Image::sample("x");
        let index: serde_json::Value = serde_json::from_slice(&image.index.bytes).unwrap();
        let listed: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = image.manifests.iter().map(|m| m.digest.as_str()).collect();
        assert_eq!(listed, expected);
        assert_eq!(image.blobs.len(), 4);
        assert_ne!(Image::sample("y").index.digest, image.index.digest);
    }

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
