//! The system prompts the nSelf features inject: shipped with the gateway (`gateway/prompts/`)
//! and replaceable by files of the operator's own (`CLAW_APP_PROMPT_FILE`,
//! `CLAW_ADMIN_PROMPT_FILE`), read once at start-up.

use std::path::Path;

/// The nSelf expert prompt (`x-nself-app`).
const APP: &str = include_str!("../../prompts/app.md");
/// The admin-mode prompt (`x-nself-admin`), followed by the live state.
const ADMIN: &str = include_str!("../../prompts/admin.md");

/// The prompts in use.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub app: String,
    pub admin: String,
}

impl Default for Prompts {
    fn default() -> Self {
        Self {
            app: APP.trim_end().to_owned(),
            admin: ADMIN.trim_end().to_owned(),
        }
    }
}

impl Prompts {
    /// The shipped prompts, each replaced by the file given for it.
    pub fn load(app: Option<&Path>, admin: Option<&Path>) -> Result<Self, String> {
        let read = |path: &Path, what: &str| {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the {what} prompt {}: {e}", path.display()))?;
            if text.trim().is_empty() {
                return Err(format!("the {what} prompt {} is empty", path.display()));
            }
            Ok(text.trim_end().to_owned())
        };
        let mut prompts = Self::default();
        if let Some(path) = app {
            prompts.app = read(path, "app")?;
        }
        if let Some(path) = admin {
            prompts.admin = read(path, "admin")?;
        }
        Ok(prompts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_prompts_are_used_unless_replaced_and_bad_files_are_refused() {
        let shipped = Prompts::load(None, None).unwrap();
        assert!(shipped.app.contains("nSelf") && shipped.admin.contains("Admin mode"));
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("app.md");
        std::fs::write(&own, "Answer in French.\n").unwrap();
        let replaced = Prompts::load(Some(&own), None).unwrap();
        assert_eq!(replaced.app, "Answer in French.");
        assert_eq!(replaced.admin, shipped.admin);
        let empty = dir.path().join("empty.md");
        std::fs::write(&empty, " \n").unwrap();
        assert!(Prompts::load(None, Some(&empty))
            .unwrap_err()
            .contains("empty"));
        assert!(Prompts::load(Some(&dir.path().join("missing.md")), None)
            .unwrap_err()
            .contains("cannot read the app prompt"));
    }
}
