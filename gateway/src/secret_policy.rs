//! Which secret references a configuration snapshot may name.
//!
//! A snapshot comes from whoever holds the gateway's admin token or is an Admin of the portal,
//! and it decides where the gateway sends each member's credential: a member at a URL of their
//! own whose `api-key` is `env:` or `file:` one of the gateway's own secrets would receive that
//! secret on the first call. So a snapshot never names
//!
//! - a reference the server settings use: the admin token, the gateway's own Entra credential
//!   (which also reads Key Vault and Microsoft Graph), the Redis URLs, the Azure Monitor secret;
//! - a file of the gateway's own: its configuration file, its TLS certificate and key, the files
//!   its server settings' `file:` references name, anything in its state directory (compared
//!   after symbolic links, `.` and `..` are resolved), and anything under `/proc`, `/sys` or
//!   `/dev` (`/proc/self/environ` holds every `env:` secret of the process);
//! - a Key Vault secret of the server settings under another spelling (compared by vault and
//!   secret name, ignoring case, dot segments and the version);
//!
//! and, when the operator lists prefixes (`server.snapshot_secret_refs`), only references
//! under one of them: `env:NAME_PREFIX`, `file:/directory/`, or the start of a Key Vault secret
//! URL (`https://{vault}.vault.azure.net/secrets/aoai-`).

use std::path::{Path, PathBuf};

use gatehouse_schema::config::{SecretRef, SecretSource};

/// The references a snapshot may not name, and the prefixes it must name them under.
#[derive(Debug, Clone, Default)]
pub struct SecretRefPolicy {
    /// References of the server settings, as written.
    reserved: Vec<SecretRef>,
    /// The Key Vault secrets among them, by vault and name.
    reserved_vault_secrets: Vec<VaultSecret>,
    /// Files of the gateway's own.
    reserved_files: Vec<OwnPath>,
    /// Directories of the gateway's own.
    reserved_dirs: Vec<OwnPath>,
    /// When set, the only prefixes allowed.
    allowed: Option<Vec<Prefix>>,
}

/// A file or directory of the gateway's own: as the settings name it, and resolved when the
/// policy was made. A reference is compared with both that and the path resolved again when it
/// is judged: a symbolic link re-pointed since (a Kubernetes Secret volume's `..data` after the
/// Secret changed, a certificate renewal's `live/` link) leads elsewhere than at start.
#[derive(Debug, Clone)]
struct OwnPath {
    named: PathBuf,
    at_start: PathBuf,
}

impl OwnPath {
    fn new(named: &Path) -> OwnPath {
        OwnPath {
            named: named.to_path_buf(),
            at_start: resolved(named),
        }
    }

    /// Whether `file` (resolved) is this file.
    fn is(&self, file: &Path) -> bool {
        self.at_start == file || resolved(&self.named) == file
    }

    /// Whether `file` (resolved) lies under this directory.
    fn holds(&self, file: &Path) -> bool {
        file.starts_with(&self.at_start) || file.starts_with(resolved(&self.named))
    }
}

#[derive(Debug, Clone)]
enum Prefix {
    Env(String),
    /// A resolved directory.
    Dir(PathBuf),
    /// A vault and the start of its secrets' names (lower case).
    KeyVault(VaultSecret),
}

/// Where a Key Vault secret URL points, as the gateway fetches it: the vault (scheme and host in
/// lower case) and the secret's name in lower case (Key Vault names ignore case), dot segments
/// resolved; the version aside.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VaultSecret {
    vault: String,
    name: String,
}

impl VaultSecret {
    /// The secret a Key Vault URL (or the start of one, `…/secrets/aoai-`) names.
    fn of(text: &str) -> Option<VaultSecret> {
        let url = url::Url::parse(text).ok()?;
        let mut segments = url.path_segments()?;
        if segments.next()? != "secrets" {
            return None;
        }
        let name = segments.next()?.to_ascii_lowercase();
        Some(VaultSecret {
            vault: format!(
                "{}://{}",
                url.scheme(),
                url.host_str()?.to_ascii_lowercase()
            ) + &url
                .port()
                .map(|port| format!(":{port}"))
                .unwrap_or_default(),
            name,
        })
    }
}

/// Directories no snapshot may name a file under, whatever the operator allows: the kernel's
/// views of the process (its environment, memory and open files) and devices.
const SYSTEM_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

impl SecretRefPolicy {
    /// A policy that refuses `reserved` references, the `files` and whatever lies under `dirs`,
    /// and, when `allowed` is given, everything not under one of its prefixes (see the module
    /// documentation for their forms).
    pub fn new(
        reserved: Vec<SecretRef>,
        files: &[&Path],
        dirs: &[&Path],
        allowed: Option<&[String]>,
    ) -> Result<SecretRefPolicy, String> {
        let allowed = match allowed {
            None => None,
            Some(prefixes) => Some(
                prefixes
                    .iter()
                    .map(|prefix| parse_prefix(prefix))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let mut reserved_files: Vec<OwnPath> =
            files.iter().map(|path| OwnPath::new(path)).collect();
        let mut reserved_vault_secrets = Vec::new();
        for reference in &reserved {
            match reference.source() {
                SecretSource::File(path) => reserved_files.push(OwnPath::new(Path::new(path))),
                SecretSource::KeyVault(url) => {
                    reserved_vault_secrets.extend(VaultSecret::of(url));
                }
                SecretSource::Env(_) => {}
            }
        }
        Ok(SecretRefPolicy {
            reserved,
            reserved_vault_secrets,
            reserved_files,
            reserved_dirs: dirs.iter().map(|path| OwnPath::new(path)).collect(),
            allowed,
        })
    }

    /// Why a snapshot may not name `reference`, or `None` when it may.
    pub fn refusal(&self, reference: &SecretRef) -> Option<String> {
        let vault_secret = match reference.source() {
            SecretSource::KeyVault(url) => VaultSecret::of(url),
            SecretSource::Env(_) | SecretSource::File(_) => None,
        };
        if self.reserved.contains(reference)
            || vault_secret
                .as_ref()
                .is_some_and(|secret| self.reserved_vault_secrets.contains(secret))
        {
            return Some(format!(
                "`{}` is one of the gateway's own secrets (its server settings use it); a snapshot may not name it",
                reference.as_str()
            ));
        }
        let file = match reference.source() {
            SecretSource::File(path) => Some((Path::new(path), resolved(Path::new(path)))),
            SecretSource::Env(_) | SecretSource::KeyVault(_) => None,
        };
        if let Some((written, file)) = &file
            && SYSTEM_DIRS
                .iter()
                .any(|dir| written.starts_with(dir) || file.starts_with(dir))
        {
            return Some(format!(
                "`{}` is under /proc, /sys or /dev, which hold the process's own environment and memory; a snapshot may not name it",
                reference.as_str()
            ));
        }
        let file = file.map(|(_, file)| file);
        if let Some(file) = &file
            && self.is_own(file)
        {
            return Some(format!(
                "`{}` is a file of the gateway's own (its configuration, TLS key or state); a snapshot may not name it",
                reference.as_str()
            ));
        }
        self.allowed_prefix_refusal(reference, file.as_ref(), vault_secret.as_ref())
    }

    /// Why a snapshot may not name `path` as a member's TLS file (its CA or client identity):
    /// the gateway's own files and `/proc`, `/sys`, `/dev` are refused as they are for a `file:`
    /// secret; the operator's prefixes (`server.snapshot_secret_refs`) are for secrets only.
    pub fn tls_file_refusal(&self, path: &str) -> Option<String> {
        let written = Path::new(path);
        let file = resolved(written);
        if SYSTEM_DIRS
            .iter()
            .any(|dir| written.starts_with(dir) || file.starts_with(dir))
        {
            return Some(format!(
                "`{path}` is under /proc, /sys or /dev; a snapshot may not name it"
            ));
        }
        if self.is_own(&file) {
            return Some(format!(
                "`{path}` is a file of the gateway's own (its configuration, TLS key or state); a snapshot may not name it"
            ));
        }
        None
    }

    /// Whether `file` (resolved) is one of the gateway's own files or lies in one of its
    /// directories.
    fn is_own(&self, file: &Path) -> bool {
        self.reserved_files.iter().any(|own| own.is(file))
            || self.reserved_dirs.iter().any(|dir| dir.holds(file))
    }

    /// Why `reference` is refused by the operator's prefixes, when they are set.
    fn allowed_prefix_refusal(
        &self,
        reference: &SecretRef,
        file: Option<&PathBuf>,
        vault_secret: Option<&VaultSecret>,
    ) -> Option<String> {
        let allowed = self.allowed.as_ref()?;
        let under = allowed
            .iter()
            .any(|prefix| match (prefix, reference.source()) {
                (Prefix::Env(prefix), SecretSource::Env(name)) => name.starts_with(prefix.as_str()),
                (Prefix::Dir(dir), SecretSource::File(_)) => {
                    file.is_some_and(|file| file.starts_with(dir))
                }
                (Prefix::KeyVault(prefix), SecretSource::KeyVault(_)) => {
                    vault_secret.is_some_and(|secret| {
                        secret.vault == prefix.vault && secret.name.starts_with(&prefix.name)
                    })
                }
                _ => false,
            });
        (!under).then(|| {
            format!(
                "`{}` is not under a prefix of server.snapshot_secret_refs",
                reference.as_str()
            )
        })
    }
}

/// `path` with symbolic links and `..` resolved when it exists (a reference to a file that does
/// not exist reads nothing), else as written.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn parse_prefix(text: &str) -> Result<Prefix, String> {
    let problem = || {
        format!(
            "server.snapshot_secret_refs: `{text}` is not a prefix; use env:NAME_PREFIX, file:/absolute/directory/ or https://{{vault}}.vault.azure.net/secrets/NAME_PREFIX"
        )
    };
    if let Some(name) = text.strip_prefix("env:") {
        return if name.is_empty() {
            Err(problem())
        } else {
            Ok(Prefix::Env(name.to_owned()))
        };
    }
    if let Some(dir) = text.strip_prefix("file:") {
        return if dir.starts_with('/') && dir.ends_with('/') {
            Ok(Prefix::Dir(resolved(Path::new(dir))))
        } else {
            Err(problem())
        };
    }
    match url::Url::parse(text) {
        Ok(url)
            if url.scheme() == "https"
                && url.host_str().is_some_and(|host| host.contains(".vault."))
                && url.path().starts_with("/secrets/") =>
        {
            VaultSecret::of(text)
                .map(Prefix::KeyVault)
                .ok_or_else(problem)
        }
        _ => Err(problem()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> SecretRef {
        SecretRef::try_from(text.to_owned()).unwrap()
    }

    #[test]
    fn the_gateways_own_secrets_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("sub")).unwrap();
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, "server: {}").unwrap();
        std::fs::write(state.join("sub/instance-id"), "x").unwrap();
        let policy = SecretRefPolicy::new(
            vec![reference("env:GATEHOUSE_ADMIN_TOKEN")],
            &[&config],
            &[&state],
            None,
        )
        .unwrap();
        assert!(
            policy
                .refusal(&reference("env:GATEHOUSE_ADMIN_TOKEN"))
                .is_some()
        );
        assert!(policy.refusal(&reference("env:AOAI_KEY")).is_none());
        let config_ref = format!("file:{}", config.display());
        assert!(policy.refusal(&reference(&config_ref)).is_some());
        // Reached through `..`, still the same file.
        let around = format!("file:{}/state/../gateway.yaml", dir.path().display());
        assert!(policy.refusal(&reference(&around)).is_some());
        let in_state = format!("file:{}/sub/instance-id", state.display());
        assert!(policy.refusal(&reference(&in_state)).is_some());
    }

    /// The files and Key Vault secrets the server settings name are refused under any other
    /// spelling, and the process's own views (`/proc/self/environ` holds every `env:` secret)
    /// always.
    #[test]
    fn other_spellings_of_the_gateways_own_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("admin-token");
        std::fs::write(&token, "secret").unwrap();
        std::os::unix::fs::symlink(&token, dir.path().join("link")).unwrap();
        let policy = SecretRefPolicy::new(
            vec![
                reference(&format!("file:{}", token.display())),
                reference("https://ops.vault.azure.net/secrets/gateway-client-secret"),
            ],
            &[],
            &[],
            None,
        )
        .unwrap();
        let dir = dir.path().display();
        for refused in [
            format!("file:{dir}/./admin-token"),
            format!("file:{dir}//admin-token"),
            format!("file:{dir}/link"),
            "file:/proc/self/environ".to_owned(),
            "file:/proc/1/environ".to_owned(),
            "file:/etc/../proc/self/environ".to_owned(),
            "file:/dev/stdin".to_owned(),
            "file:/sys/kernel/notes".to_owned(),
            "https://OPS.vault.azure.net/secrets/Gateway-Client-Secret".to_owned(),
            "https://ops.vault.azure.net/secrets/gateway-client-secret/0123456789abcdef0123456789abcdef".to_owned(),
            "https://ops.vault.azure.net/secrets/x/../gateway-client-secret".to_owned(),
        ] {
            assert!(
                policy.refusal(&reference(&refused)).is_some(),
                "{refused}"
            );
        }
        assert!(
            policy
                .refusal(&reference("https://ops.vault.azure.net/secrets/aoai-east"))
                .is_none()
        );
    }

    /// A Kubernetes Secret volume: the secret's path goes through `..data`, a link the kubelet
    /// re-points at a new directory when the Secret changes. The file the link leads to after
    /// that is still the gateway's own, and so is a directory of its own re-pointed likewise.
    #[test]
    fn an_own_file_behind_a_link_re_pointed_since_start_is_still_refused() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path();
        for version in ["..2026_12_01", "..2026_12_07"] {
            std::fs::create_dir_all(volume.join(version).join("state")).unwrap();
            std::fs::write(volume.join(version).join("client-secret"), version).unwrap();
        }
        std::os::unix::fs::symlink("..2026_12_01", volume.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/client-secret", volume.join("client-secret")).unwrap();
        std::os::unix::fs::symlink("..data/state", volume.join("state")).unwrap();
        let policy = SecretRefPolicy::new(
            vec![reference(&format!(
                "file:{}",
                volume.join("client-secret").display()
            ))],
            &[],
            &[&volume.join("state")],
            None,
        )
        .unwrap();
        // The Secret changes: `..data` now leads to the new directory.
        std::fs::remove_file(volume.join("..data")).unwrap();
        std::os::unix::fs::symlink("..2026_12_07", volume.join("..data")).unwrap();
        let volume = volume.display();
        for refused in [
            format!("file:{volume}/./client-secret"),
            format!("file:{volume}/..2026_12_07/client-secret"),
            format!("file:{volume}/..2026_12_01/client-secret"),
            format!("file:{volume}/..2026_12_07/state/instance-id"),
        ] {
            assert!(policy.refusal(&reference(&refused)).is_some(), "{refused}");
            assert!(
                policy
                    .tls_file_refusal(refused.trim_start_matches("file:"))
                    .is_some(),
                "{refused}"
            );
        }
    }

    #[test]
    fn listed_prefixes_are_the_only_ones_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let backends = dir.path().join("backends");
        std::fs::create_dir_all(&backends).unwrap();
        std::fs::write(backends.join("east"), "k").unwrap();
        std::fs::write(dir.path().join("other"), "k").unwrap();
        let allowed = [
            "env:AOAI_".to_owned(),
            format!("file:{}/", backends.display()),
            "https://kv1.vault.azure.net/secrets/aoai-".to_owned(),
        ];
        let policy = SecretRefPolicy::new(Vec::new(), &[], &[], Some(&allowed)).unwrap();
        for allowed in [
            "env:AOAI_EAST".to_owned(),
            format!("file:{}/east", backends.display()),
            "https://kv1.vault.azure.net/secrets/aoai-east".to_owned(),
            "https://KV1.vault.azure.net/secrets/AOAI-West".to_owned(),
        ] {
            assert!(policy.refusal(&reference(&allowed)).is_none(), "{allowed}");
        }
        for refused in [
            "env:PGPASSWORD".to_owned(),
            format!("file:{}/other", dir.path().display()),
            format!("file:{}/../other", backends.display()),
            "https://kv1.vault.azure.net/secrets/db-password".to_owned(),
            // Fetched as `/secrets/db-password`: dot segments are resolved before comparing.
            "https://kv1.vault.azure.net/secrets/aoai-x/../db-password".to_owned(),
            "https://kv2.vault.azure.net/secrets/aoai-east".to_owned(),
        ] {
            let why = policy.refusal(&reference(&refused)).unwrap();
            assert!(why.contains("server.snapshot_secret_refs"), "{why}");
        }
        for wrong in [
            "env:",
            "file:relative/",
            "file:/no/slash",
            "https://example.com/x",
        ] {
            assert!(
                SecretRefPolicy::new(Vec::new(), &[], &[], Some(&[wrong.to_owned()])).is_err(),
                "{wrong}"
            );
        }
    }
}
