//! Accounts and their access keys, in the cluster store. A request is
//! authenticated by the SigV4 signature of one of its account's keys; a
//! function belongs to one account.

use ember_store::{Expect, Store, StoreError};
use serde::{Deserialize, Serialize};

pub const KEYS_PREFIX: &str = "/ember/accounts/keys/";
/// Account names (what an operator calls them) → 12-digit ids.
pub const NAMES_PREFIX: &str = "/ember/accounts/names/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccessKey {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The 12-digit account the key acts for.
    pub account: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("invalid account {0:?}: want 12 digits")]
    Account(String),
    #[error("invalid account name {0:?}: use 1 to 64 letters, digits, hyphens or underscores")]
    Name(String),
    #[error("access key {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn valid_account(a: &str) -> bool {
    a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit())
}

/// Random, in AWS's shapes: `AKIA` + 16 upper-case characters, and a
/// 40-character secret.
fn random_key(account: &str) -> std::io::Result<AccessKey> {
    use std::io::Read;
    let mut raw = [0u8; 56];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const ANY: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let id: String = raw[..16]
        .iter()
        .map(|b| UPPER[(*b % 32) as usize] as char)
        .collect();
    let secret: String = raw[16..]
        .iter()
        .map(|b| ANY[(*b % 64) as usize] as char)
        .collect();
    Ok(AccessKey {
        access_key_id: format!("AKIA{id}"),
        secret_access_key: secret,
        account: account.to_string(),
    })
}

/// Stores `key`; refuses an id that exists.
pub async fn add_key(store: &Store, key: &AccessKey) -> Result<(), AccountError> {
    if !valid_account(&key.account) {
        return Err(AccountError::Account(key.account.clone()));
    }
    let body = serde_json::to_vec(key).expect("serialisable");
    let k = format!("{KEYS_PREFIX}{}", key.access_key_id);
    match store
        .compare_and_swap(&k, Expect::Absent, &body, None)
        .await?
    {
        Some(_) => Ok(()),
        None => Err(AccountError::Exists(key.access_key_id.clone())),
    }
}

/// A new random key for `account`, stored.
pub async fn new_key(store: &Store, account: &str) -> Result<AccessKey, AccountError> {
    if !valid_account(account) {
        return Err(AccountError::Account(account.into()));
    }
    let key = random_key(account).map_err(StoreError::Io)?;
    add_key(store, &key).await?;
    Ok(key)
}

/// The id of the account called `name`, created (a random 12-digit id)
/// if there is none yet.
pub async fn account_named(store: &Store, name: &str) -> Result<String, AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(AccountError::Name(name.to_string()));
    }
    let k = format!("{NAMES_PREFIX}{name}");
    loop {
        if let Some(v) = store.get(&k).await? {
            return Ok(String::from_utf8_lossy(&v.value).into_owned());
        }
        let id = if valid_account(name) {
            name.to_string()
        } else {
            let raw = random_key(name).map_err(StoreError::Io)?;
            raw.secret_access_key
                .bytes()
                .take(12)
                .map(|b| char::from(b'0' + b % 10))
                .collect()
        };
        if store
            .compare_and_swap(&k, Expect::Absent, id.as_bytes(), None)
            .await?
            .is_some()
        {
            return Ok(id);
        }
    }
}

/// The key with this id, if any (what SigV4 verification looks up).
pub async fn find_key(store: &Store, access_key_id: &str) -> Result<Option<AccessKey>, StoreError> {
    let Some(v) = store.get(&format!("{KEYS_PREFIX}{access_key_id}")).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&v.value).ok())
}

pub async fn delete_key(store: &Store, access_key_id: &str) -> Result<bool, StoreError> {
    let k = format!("{KEYS_PREFIX}{access_key_id}");
    let Some(v) = store.get(&k).await? else {
        return Ok(false);
    };
    store
        .compare_and_delete(&k, Expect::Version(v.version))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&[], dir.path()).await.unwrap();
        let k = new_key(&store, "111122223333").await.unwrap();
        assert!(k.access_key_id.starts_with("AKIA") && k.access_key_id.len() == 20);
        assert_eq!(k.secret_access_key.len(), 40);
        assert_eq!(
            find_key(&store, &k.access_key_id).await.unwrap(),
            Some(k.clone())
        );
        assert!(matches!(
            add_key(&store, &k).await,
            Err(AccountError::Exists(_))
        ));
        assert!(matches!(
            new_key(&store, "12").await,
            Err(AccountError::Account(_))
        ));
        assert!(delete_key(&store, &k.access_key_id).await.unwrap());
        assert_eq!(find_key(&store, &k.access_key_id).await.unwrap(), None);
        assert!(!delete_key(&store, &k.access_key_id).await.unwrap());
    }

    #[tokio::test]
    async fn names_map_to_stable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&[], dir.path()).await.unwrap();
        let a = account_named(&store, "team-a").await.unwrap();
        assert!(valid_account(&a), "{a}");
        assert_eq!(account_named(&store, "team-a").await.unwrap(), a);
        assert_ne!(account_named(&store, "team-b").await.unwrap(), a);
        assert_eq!(
            account_named(&store, "111122223333").await.unwrap(),
            "111122223333"
        );
        assert!(matches!(
            account_named(&store, "a/b").await,
            Err(AccountError::Name(_))
        ));
    }
}
