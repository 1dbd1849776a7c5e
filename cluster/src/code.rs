//! Function code (the zips) in the cluster store. etcd refuses values
//! beyond about 1.5 MiB and a zip may be 50 MB, so a zip is kept as
//! chunks of [`CHUNK`] bytes under its SHA-256, with a manifest written
//! last: a manifest that exists names chunks that all exist. Content
//! addressed, so a zip is written once however many versions use it.

use ember_store::{Expect, Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const CODE_PREFIX: &str = "/ember/code/";
/// Well under etcd's default request limit (1.5 MiB).
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Manifest {
    size: u64,
    chunks: u32,
}

fn chunk_key(sha: &str, i: u32) -> String {
    format!("{CODE_PREFIX}{sha}/{i:05}")
}

fn manifest_key(sha: &str) -> String {
    format!("{CODE_PREFIX}{sha}/manifest")
}

/// Stores `zip`; returns its SHA-256 in hex.
pub async fn put(store: &Store, zip: &[u8]) -> Result<String, StoreError> {
    let sha = hex::encode(Sha256::digest(zip));
    if store.get(&manifest_key(&sha)).await?.is_some() {
        return Ok(sha);
    }
    let mut n = 0u32;
    for (i, c) in zip.chunks(CHUNK).enumerate() {
        // Same content under the same key: an existing chunk is fine.
        store
            .compare_and_swap(&chunk_key(&sha, i as u32), Expect::Absent, c, None)
            .await?;
        n += 1;
    }
    let m = Manifest {
        size: zip.len() as u64,
        chunks: n,
    };
    store
        .compare_and_swap(
            &manifest_key(&sha),
            Expect::Absent,
            &serde_json::to_vec(&m).expect("serialisable"),
            None,
        )
        .await?;
    Ok(sha)
}

/// The zip with this SHA-256, if stored whole.
pub async fn get(store: &Store, sha: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(m) = store.get(&manifest_key(sha)).await? else {
        return Ok(None);
    };
    let Ok(m) = serde_json::from_slice::<Manifest>(&m.value) else {
        return Ok(None);
    };
    let mut zip = Vec::with_capacity(m.size as usize);
    for i in 0..m.chunks {
        match store.get(&chunk_key(sha, i)).await? {
            Some(c) => zip.extend_from_slice(&c.value),
            None => return Ok(None),
        }
    }
    // Corruption shows here rather than as a broken function on a host.
    if zip.len() as u64 != m.size || hex::encode(Sha256::digest(&zip)) != sha {
        return Ok(None);
    }
    Ok(Some(zip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn zips_larger_than_a_chunk_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&[], dir.path()).await.unwrap();
        let zip: Vec<u8> = (0..(2 * CHUNK + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let sha = put(&store, &zip).await.unwrap();
        assert_eq!(
            store
                .list(&format!("{CODE_PREFIX}{sha}/"))
                .await
                .unwrap()
                .len(),
            4
        );
        assert_eq!(get(&store, &sha).await.unwrap().as_deref(), Some(&zip[..]));
        // Stored once.
        assert_eq!(put(&store, &zip).await.unwrap(), sha);
        assert_eq!(get(&store, &"0".repeat(64)).await.unwrap(), None);
    }
}
