//! Loading: the TOML file (or the embedded default), then `TETHER_` environment
//! variables, through [`check::load`](super::check::load), which reports every
//! problem at once; and printing the effective configuration.

use std::path::Path;

use super::{check, Config, ConfigError, Problem, EMBEDDED_CONFIG};

impl Config {
    /// `path` (or the embedded default config when `None`), then the `TETHER_`
    /// environment variables, over the structs' defaults; validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &std::env::vars().collect::<Vec<_>>())
    }

    /// [`Config::load`] with the environment given as `vars`.
    pub fn load_with_env(
        path: Option<&Path>,
        vars: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        match path {
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| {
                    let message = match e.kind() {
                        std::io::ErrorKind::NotFound => {
                            format!("config file {name} does not exist")
                        }
                        _ => format!("cannot read config file {name}: {e}"),
                    };
                    ConfigError(vec![Problem::new("", message)])
                })?;
                check::load(&name, &text, vars)
            }
            None => check::load("<embedded config/tether.toml>", EMBEDDED_CONFIG, vars),
        }
    }

    /// Parses a TOML document on top of the defaults (no environment); validated.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        check::load("<toml>", toml, &[])
    }

    /// Defaults, then `toml`, then the environment; validated. (For tests.)
    pub fn from_toml_and_env(toml: &str) -> Result<Config, ConfigError> {
        check::load("<toml>", toml, &std::env::vars().collect::<Vec<_>>())
    }

    /// The effective configuration as TOML, for `tether check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serializes to TOML")
    }
}
