//! Compiled plugins, kept in memory across manifest loads and, when configured, on disk across
//! restarts.
//!
//! Both caches are keyed by the SHA-256 of the component's bytes; the disk cache's file name also
//! carries a hash of the engine's configuration, so an entry written by a differently configured
//! engine (another wasmtime version, other settings) is never even opened. An entry is a small
//! header, the SHA-256 of the compiled artifact, and the artifact. An entry whose checksum does
//! not match (a truncated write, a flipped bit) is ignored, compiled again and overwritten, and
//! wasmtime itself refuses an artifact made for another engine. The checksum does not defend
//! against someone who can write to the cache folder: such a person can also replace the
//! plugins. Keep the folder as private as the plugins themselves.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The SHA-256 of a plugin's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WasmDigest(pub [u8; 32]);

impl WasmDigest {
    /// Hashes a component's bytes.
    pub fn of(bytes: &[u8]) -> WasmDigest {
        WasmDigest(Sha256::digest(bytes).into())
    }

    /// Lower-case hex, as `sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for WasmDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Where a component came from, for the load report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now.
    Compiled,
    /// Already compiled by an earlier load of this process.
    Memory,
    /// Read from the disk cache.
    Disk,
}

/// How many components one load took from where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Compiled from scratch.
    pub compiled: u32,
    /// Reused from an earlier load.
    pub memory: u32,
    /// Read from the disk cache.
    pub disk: u32,
    /// Disk entries found corrupt or unusable and replaced.
    pub rejected: u32,
}

/// The components one manifest load uses, by digest.
#[derive(Default)]
pub struct LoadSession {
    pub(super) used: HashMap<WasmDigest, Component>,
    pub(super) disk: Option<PathBuf>,
    /// The bytes of every component this load read, for its pre-initialisation jobs; let go
    /// with the session.
    pub(super) sources: HashMap<WasmDigest, Arc<[u8]>>,
    /// Where this load's components came from.
    pub stats: CacheStats,
}

impl LoadSession {
    /// The bytes this load read for `plugin`'s component.
    pub fn source(&self, plugin: &super::LoadedPlugin) -> Option<&Arc<[u8]>> {
        self.sources.get(&plugin.digest)
    }

    /// A load that reads and writes compiled plugins in `dir` when it is given.
    pub fn new(disk: Option<PathBuf>) -> LoadSession {
        LoadSession {
            disk,
            ..LoadSession::default()
        }
    }
}

/// Components compiled by this process, kept for the next load.
#[derive(Default)]
pub(super) struct MemoryCache(Mutex<HashMap<WasmDigest, Component>>);

impl MemoryCache {
    pub(super) fn get(&self, digest: &WasmDigest) -> Option<Component> {
        self.lock().get(digest).cloned()
    }

    /// Keeps exactly the components of the latest successful load, so that the cache never
    /// holds more than one manifest's worth of plugins.
    pub(super) fn replace(&self, session: &LoadSession) {
        let mut cache = self.lock();
        cache.clear();
        cache.extend(session.used.iter().map(|(d, c)| (*d, c.clone())));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WasmDigest, Component>> {
        // The map is always left consistent, so a panic elsewhere does not make it unusable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

const MAGIC: &[u8; 8] = b"WGCWASM1";

/// The disk cache entry for a component compiled by this engine.
fn entry_path(dir: &Path, engine: &Engine, digest: &WasmDigest) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!(
        "{}-{:016x}.cwasm",
        digest.to_hex(),
        hasher.finish()
    ))
}

/// Reads a compiled component from the disk cache. `Ok(None)` when there is no entry;
/// `Err` when there is one that cannot be used (it will be replaced).
pub(super) fn read(
    dir: &Path,
    engine: &Engine,
    digest: &WasmDigest,
) -> Result<Option<Component>, String> {
    let path = entry_path(dir, engine, digest);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("cannot read `{}`: {err}", path.display())),
    };
    let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Err(format!(
            "`{}` is not a wasmgate cache entry",
            path.display()
        ));
    };
    if rest.len() < 32 || Sha256::digest(&rest[32..]).as_slice() != &rest[..32] {
        return Err(format!(
            "`{}` is corrupt (checksum mismatch)",
            path.display()
        ));
    }
    let artifact = &rest[32..];
    // SAFETY: `Component::deserialize` trusts its input to be an artifact this wasmtime wrote.
    // The checksum above shows these are the exact bytes `write` stored, which it took from
    // `Component::serialize` of an engine with the same configuration hash (the file name), and
    // wasmtime checks its own version and configuration header before using any of it. The
    // module docs say what this does not defend against: a hostile writer of the cache folder.
    #[allow(unsafe_code)]
    let component = unsafe { Component::deserialize(engine, artifact) }
        .map_err(|err| format!("`{}` is unusable: {err:#}", path.display()))?;
    Ok(Some(component))
}

/// Writes a compiled component to the disk cache, atomically (a temporary file renamed into
/// place), so that a crash mid-write never leaves a half entry under the real name.
pub(super) fn write(
    dir: &Path,
    engine: &Engine,
    digest: &WasmDigest,
    component: &Component,
) -> Result<(), String> {
    let artifact = component
        .serialize()
        .map_err(|err| format!("cannot serialize: {err:#}"))?;
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create `{}`: {err}", dir.display()))?;
    let path = entry_path(dir, engine, digest);
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    let mut bytes = Vec::with_capacity(MAGIC.len() + 32 + artifact.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&Sha256::digest(&artifact));
    bytes.extend_from_slice(&artifact);
    std::fs::write(&temporary, &bytes)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|err| {
            let _ = std::fs::remove_file(&temporary);
            format!("cannot write `{}`: {err}", path.display())
        })
}
