//! Loading: built-in defaults, then the TOML file (or the embedded default), then
//! `TETHER_` environment variables; and printing the effective configuration.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;

use super::{Config, ConfigError, Problem, EMBEDDED_CONFIG, ENV_PREFIX};

impl Config {
    /// Defaults, then `path` (or the embedded default config when `None`), then
    /// `TETHER_` environment variables; validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError(vec![Problem {
                    path: String::new(),
                    message: format!("config file {} does not exist", p.display()),
                }]))
            }
            Some(p) => Toml::file_exact(p),
            None => Toml::string(EMBEDDED_CONFIG),
        };
        Self::from_figment(Self::figment().merge(file).merge(env()))
    }

    /// Parses a TOML document on top of the defaults (no environment); validated.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment().merge(Toml::string(toml)))
    }

    /// Defaults, then `toml`, then the environment; validated. (For tests.)
    pub fn from_toml_and_env(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment().merge(Toml::string(toml)).merge(env()))
    }

    fn figment() -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|errors| {
            ConfigError(
                errors
                    .into_iter()
                    .map(|e| Problem {
                        path: e.path.join("."),
                        message: e.kind.to_string(),
                    })
                    .collect(),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, for `tether check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serializes to TOML")
    }
}

/// `TETHER_<SECTION>__<KEY>` variables. Only the scalar sections can be set this way,
/// and other `TETHER_*` variables (a script's `TETHER_BIN`, say) are not config.
fn env() -> Env {
    const SECTIONS: [&str; 8] = [
        "proxy",
        "admin",
        "egress",
        "pool",
        "diagnosis",
        "budget",
        "transparent",
        "cluster",
    ];
    Env::prefixed(ENV_PREFIX)
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            SECTIONS.iter().any(|s| {
                key.strip_prefix(s)
                    .is_some_and(|rest| rest.starts_with("__") || rest.starts_with('.'))
            })
        })
        .split("__")
}
