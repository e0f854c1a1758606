//! Plugin registration. Each plugin crate submits a const descriptor with
//! [`inventory::submit!`]; whatever is linked into the binary is found here
//! by URL scheme.

use std::future::Future;
use std::pin::Pin;

use crate::{BlobStore, BooksStore, MetaStore, StoreError};

/// The version of the plugin contracts. A descriptor built against another
/// version is refused.
pub const PLUGIN_ABI_VERSION: u32 = 1;

/// The future a [`MetaStoreDescriptor`] returns.
pub type MetaStoreFuture =
    Pin<Box<dyn Future<Output = Result<Box<dyn MetaStore>, StoreError>> + Send>>;

/// Announces a catalog store plugin.
#[derive(Debug)]
pub struct MetaStoreDescriptor {
    /// Its name, as config files spell it.
    pub name: &'static str,
    /// URL schemes it opens (`sqlite` opens `sqlite:PATH`).
    pub schemes: &'static [&'static str],
    /// Must equal [`PLUGIN_ABI_VERSION`].
    pub abi_version: u32,
    /// Opens (creating and migrating as needed) the store at a URL.
    pub open: fn(&str) -> MetaStoreFuture,
}

/// Announces a pack store plugin.
#[derive(Debug)]
pub struct BlobStoreDescriptor {
    /// Its name, as config files spell it.
    pub name: &'static str,
    /// URL schemes it opens (`fs` opens `fs:PATH`).
    pub schemes: &'static [&'static str],
    /// Must equal [`PLUGIN_ABI_VERSION`].
    pub abi_version: u32,
    /// Opens (creating as needed) the store at a URL.
    pub open: fn(&str) -> Result<Box<dyn BlobStore>, StoreError>,
}

/// The future a [`BooksStoreDescriptor`] returns.
pub type BooksStoreFuture =
    Pin<Box<dyn Future<Output = Result<Box<dyn BooksStore>, StoreError>> + Send>>;

/// Announces a coordinator books store plugin.
#[derive(Debug)]
pub struct BooksStoreDescriptor {
    /// Its name, as config files spell it.
    pub name: &'static str,
    /// URL schemes it opens (`sqlite:PATH`, `postgres://...`).
    pub schemes: &'static [&'static str],
    /// Must equal [`PLUGIN_ABI_VERSION`].
    pub abi_version: u32,
    /// Opens (creating and migrating as needed) the books at a URL.
    pub open: fn(&str) -> BooksStoreFuture,
}

inventory::collect!(BooksStoreDescriptor);
inventory::collect!(MetaStoreDescriptor);
inventory::collect!(BlobStoreDescriptor);

fn scheme(url: &str) -> &str {
    url.split_once(':').map(|(s, _)| s).unwrap_or("")
}

/// The linked descriptor (of the current ABI) whose schemes include the
/// URL's; otherwise the schemes that are known, for the error message.
pub(crate) fn pick<'a, D: 'static>(
    url: &str,
    all: impl Iterator<Item = &'a D>,
    schemes: fn(&D) -> (&'static [&'static str], u32),
) -> Result<&'a D, String> {
    let wanted = scheme(url);
    let mut known = Vec::new();
    for d in all {
        let (ss, abi) = schemes(d);
        if abi != PLUGIN_ABI_VERSION {
            continue;
        }
        if ss.contains(&wanted) {
            return Ok(d);
        }
        known.extend(ss.iter().copied());
    }
    known.sort_unstable();
    Err(known.join(", "))
}

fn unknown(url: &str) -> impl FnOnce(String) -> StoreError + '_ {
    move |known| StoreError::UnknownScheme(redact_url(url), known)
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|s| s + 3) else {
        return url.to_string();
    };
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |e| start + e);
    let Some(at) = url[start..end].rfind('@').map(|a| start + a) else {
        return url.to_string();
    };
    match url[start..at].find(':') {
        Some(c) => format!("{}:***{}", &url[..start + c], &url[at..]),
        None => url.to_string(),
    }
}

/// Opens a catalog store by URL with whichever linked plugin handles its scheme.
pub async fn open_meta_store(url: &str) -> Result<Box<dyn MetaStore>, StoreError> {
    let d = pick(url, inventory::iter::<MetaStoreDescriptor>(), |d| {
        (d.schemes, d.abi_version)
    })
    .map_err(unknown(url))?;
    (d.open)(url).await
}

/// Opens the coordinator's books by URL with whichever linked plugin handles its scheme.
pub async fn open_books_store(url: &str) -> Result<Box<dyn BooksStore>, StoreError> {
    let d = pick(url, inventory::iter::<BooksStoreDescriptor>(), |d| {
        (d.schemes, d.abi_version)
    })
    .map_err(unknown(url))?;
    (d.open)(url).await
}

/// Opens a pack store by URL with whichever linked plugin handles its scheme.
pub fn open_blob_store(url: &str) -> Result<Box<dyn BlobStore>, StoreError> {
    let d = pick(url, inventory::iter::<BlobStoreDescriptor>(), |d| {
        (d.schemes, d.abi_version)
    })
    .map_err(unknown(url))?;
    (d.open)(url)
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
        assert_eq!(redact_url("sqlite:/tmp/x.db"), "sqlite:/tmp/x.db");
        assert_eq!(redact_url("mqtt://u:p@w@h:1883"), "mqtt://u:***@h:1883");
    }
}
