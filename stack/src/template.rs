//! Renders the text files under `templates/`, compiled into the binary.
//!
//! A template holds `{{name}}` placeholders; rendering fails on a placeholder
//! without a value, so a typo never reaches a host as literal braces.

use std::collections::BTreeMap;

/// A template that names a value nobody supplied, or is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("template {template}: {message}")]
pub struct TemplateError {
    /// Template name.
    pub template: String,
    /// What is wrong.
    pub message: String,
}

/// A template compiled into the binary.
#[derive(Clone, Copy, Debug)]
pub struct Template {
    /// Path under `templates/`.
    pub name: &'static str,
    /// Its text.
    pub text: &'static str,
}

macro_rules! template {
    ($path:literal) => {
        Template {
            name: $path,
            text: include_str!(concat!("../../templates/", $path)),
        }
    };
}

/// Configuration of the control plane on the local target.
pub const LOCAL_CONTROL_PLANE: Template = template!("local/control-plane.toml");
/// Configuration of one runner on the local target.
pub const LOCAL_RUNNER: Template = template!("local/runner.toml");
/// cloud-init user data of a runner host on the aws target.
pub const RUNNER_CLOUD_INIT: Template = template!("runner/cloud-init.yaml");

/// A template by its path under `templates/`.
pub fn by_name(name: &str) -> Option<Template> {
    [LOCAL_CONTROL_PLANE, LOCAL_RUNNER, RUNNER_CLOUD_INIT]
        .into_iter()
        .find(|t| t.name == name)
}

impl Template {
    /// Substitute every `{{name}}` with its value.
    pub fn render(&self, vars: &BTreeMap<&str, String>) -> Result<String, TemplateError> {
        let err = |message: String| TemplateError {
            template: self.name.to_string(),
            message,
        };
        let mut out = String::with_capacity(self.text.len());
        let mut rest = self.text;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| {
                err(format!(
                    "unclosed `{{{{` at byte {}",
                    self.text.len() - rest.len() + start
                ))
            })?;
            let name = after[..end].trim();
            let value = vars
                .get(name)
                .ok_or_else(|| err(format!("no value for `{{{{{name}}}}}`")))?;
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Template = Template {
        name: "t",
        text: "a={{ a }} b={{b}}\n",
    };

    #[test]
    fn renders_and_refuses_missing_values() {
        let vars = BTreeMap::from([("a", "1".to_string()), ("b", "2".to_string())]);
        assert_eq!(T.render(&vars).unwrap(), "a=1 b=2\n");
        let e = T
            .render(&BTreeMap::from([("a", "1".to_string())]))
            .unwrap_err();
        assert_eq!(e.message, "no value for `{{b}}`");
    }

    #[test]
    fn shipped_templates_render_with_their_variables() {
        let vars: BTreeMap<&str, String> = [
            "stage",
            "api_port",
            "oidc",
            "name",
            "port",
            "admin_key_file",
            "token_file",
            "state_dir",
            "database_url",
            "region",
            "artifact_url",
            "artifact_sha256",
            "token_parameter",
            "control_plane_url",
            "advertise_url",
        ]
        .into_iter()
        .map(|k| (k, "x".to_string()))
        .collect();
        for t in [LOCAL_CONTROL_PLANE, LOCAL_RUNNER, RUNNER_CLOUD_INIT] {
            let out = t.render(&vars).unwrap();
            assert!(!out.contains("{{"), "{}", t.name);
        }
    }
}
