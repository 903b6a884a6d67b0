//! Who may read a secret file. The gateway refuses, at start and at reload, a secret file that
//! other users can read: the users file, the key ring's files and every `*_file` secret of the
//! configuration (master passwords, the admin token, introspection client secrets, the Redis
//! URL). A file its *group* can read is refused too, unless `auth.allow_group_readable_secrets`
//! says a group must read it (a Kubernetes Secret mounted with `fsGroup` and `defaultMode:
//! 0440`, or a systemd setup with a secrets group): then it is a warning. The mode is that of
//! the file a symlink points to (Kubernetes mounts Secrets through symlinks).

use std::path::Path;

/// `Ok(None)`: private. `Ok(Some(warning))`: group-readable and allowed. `Err(problem)`: refused.
/// The messages name the file and the fix. A file whose mode cannot be read passes here (the
/// read itself reports the problem).
pub fn check(path: &Path, allow_group_readable: bool) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    let mode = meta.permissions().mode() & 0o777;
    let shown = path.display();
    if mode & 0o004 != 0 {
        return Err(format!(
            "{shown} is readable by every user (mode {mode:04o}): run `chmod 600 {shown}`"
        ));
    }
    if mode & 0o040 != 0 {
        if allow_group_readable {
            return Ok(Some(format!(
                "{shown} is readable by its group (mode {mode:04o}), allowed by auth.allow_group_readable_secrets"
            )));
        }
        return Err(format!(
            "{shown} is readable by its group (mode {mode:04o}): run `chmod 600 {shown}` (or, where a group must read it, e.g. a Kubernetes Secret with fsGroup, set auth.allow_group_readable_secrets: true)"
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_and_world_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k1.key");
        std::fs::write(&f, "x").unwrap();
        let mode = |m| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
        for m in [0o600, 0o400, 0o700] {
            mode(m);
            assert_eq!(check(&f, false), Ok(None), "{m:o}");
        }
        mode(0o644);
        let e = check(&f, true).unwrap_err();
        assert!(e.contains("every user") && e.contains("chmod 600"), "{e}");
        mode(0o604);
        assert!(check(&f, true).is_err());
        mode(0o640);
        let e = check(&f, false).unwrap_err();
        assert!(
            e.contains("its group")
                && e.contains("chmod 600")
                && e.contains(&f.display().to_string()),
            "{e}"
        );
        assert!(check(&f, true).unwrap().unwrap().contains("allowed"));
        mode(0o440);
        assert!(check(&f, true).unwrap().is_some());
        // Through a symlink (how Kubernetes mounts a Secret), the target's mode counts.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(check(&link, false).is_err());
        assert_eq!(check(&dir.path().join("missing"), false), Ok(None));
    }
}
