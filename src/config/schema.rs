//! The configuration's shape, learnt from [`Config`]'s own `Deserialize` impl, and
//! a type check of one value at a time against it.
//!
//! Nothing here lists keys by hand: every section is a `deny_unknown_fields` struct,
//! so deserializing a document holding only an unknown probe key at some place makes
//! serde name the fields that place accepts (`Kind::UnknownField`'s expected list). A
//! key whose value rejects a probe table is a leaf. A key or section added to the
//! structs is therefore known here, checked, and settable from the environment.

use std::sync::OnceLock;

use figment::error::Kind;
use figment::providers::Serialized;
use figment::value::{Dict, Tag, Value};
use figment::Figment;

use super::Config;

/// A key no struct has: sorts before every real key, so serde meets it first.
const PROBE: &str = "\u{1}probe";

/// What a place in the document holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A table with these keys (a `deny_unknown_fields` struct).
    Table(Vec<(&'static str, Shape)>),
    /// An array of tables (`[[upstream]]`), each with these keys.
    Tables(Vec<(&'static str, Shape)>),
    /// A value: its type is checked by [`check_leaf`].
    Leaf,
}

impl Shape {
    /// The keys of a table or of each table of an array.
    pub fn keys(&self) -> &[(&'static str, Shape)] {
        match self {
            Shape::Table(keys) | Shape::Tables(keys) => keys,
            Shape::Leaf => &[],
        }
    }

    pub fn get(&self, key: &str) -> Option<&Shape> {
        self.keys().iter().find(|(k, _)| *k == key).map(|(_, s)| s)
    }
}

/// One step of a path into the document: a key, or "an element of this array".
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Key(String),
    Element,
}

/// The whole configuration's shape (computed once).
pub fn shape() -> &'static Shape {
    static SHAPE: OnceLock<Shape> = OnceLock::new();
    SHAPE.get_or_init(|| Shape::Table(table_keys(&[]).unwrap_or_default()))
}

fn table_keys(at: &[Step]) -> Option<Vec<(&'static str, Shape)>> {
    let expected = fields_at(at)?;
    Some(
        expected
            .iter()
            .map(|&name| {
                let mut here = at.to_vec();
                here.push(Step::Key(name.to_string()));
                let shape = if let Some(keys) = table_keys(&here) {
                    Shape::Table(keys)
                } else {
                    here.push(Step::Element);
                    match table_keys(&here) {
                        Some(keys) => Shape::Tables(keys),
                        None => Shape::Leaf,
                    }
                };
                (name, shape)
            })
            .collect(),
    )
}

/// The field names serde accepts at `at`, or `None` when `at` does not take a table.
fn fields_at(at: &[Step]) -> Option<&'static [&'static str]> {
    let probe = Value::from(Dict::from([(PROBE.to_string(), Value::from(0u8))]));
    let errors = extract(nest(at, probe)).err()?;
    errors.into_iter().find_map(|e| match e.kind {
        Kind::UnknownField(field, expected) if field == PROBE => Some(expected),
        _ => None,
    })
}

/// The value `leaf` placed at `at` inside an otherwise empty document.
pub fn nest(at: &[Step], leaf: Value) -> Dict {
    let mut value = leaf;
    for step in at.iter().rev() {
        value = match step {
            Step::Key(k) => Value::Dict(Tag::Default, Dict::from([(k.clone(), value)])),
            Step::Element => Value::Array(Tag::Default, vec![value]),
        };
    }
    match value {
        Value::Dict(_, dict) => dict,
        _ => Dict::new(),
    }
}

/// Deserializes a whole document into [`Config`]: the one source of defaults.
// figment::Error is large by design; this is not a hot path.
#[allow(clippy::result_large_err)]
pub fn extract(document: Dict) -> Result<Config, figment::Error> {
    Figment::from(Serialized::defaults(document)).extract()
}

/// Checks `value`'s type for the key at `at` (a path ending in a key): the error
/// serde gives, if any. A required key missing beside it is not this value's fault.
pub fn check_leaf(at: &[Step], value: &Value) -> Result<(), String> {
    match extract(nest(at, value.clone())) {
        Ok(_) => Ok(()),
        Err(errors) => match errors
            .into_iter()
            .find(|e| !matches!(e.kind, Kind::MissingField(_)))
        {
            Some(e) => Err(e.kind.to_string()),
            None => Ok(()),
        },
    }
}

/// The closest of `candidates` to `word`, when close enough to be a misspelling.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|&(d, c)| d > 0 && d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_is_learnt_from_the_structs() {
        let shape = shape();
        let pool = shape.get("pool").expect("pool");
        assert!(matches!(pool, Shape::Table(_)));
        assert_eq!(pool.get("max_connections"), Some(&Shape::Leaf));
        let upstream = shape.get("upstream").expect("upstream");
        assert!(matches!(upstream, Shape::Tables(_)));
        for key in ["name", "origin", "sni", "max_connections", "max_idle"] {
            assert_eq!(upstream.get(key), Some(&Shape::Leaf), "{key}");
        }
        assert_eq!(
            shape.get("egress").unwrap().get("allow"),
            Some(&Shape::Leaf)
        );
        assert!(shape.get("poll").is_none());
    }

    #[test]
    fn leaves_are_type_checked_alone() {
        let at = |p: &[&str]| -> Vec<Step> { p.iter().map(|k| Step::Key(k.to_string())).collect() };
        assert!(check_leaf(&at(&["pool", "max_connections"]), &Value::from(3u8)).is_ok());
        let err = check_leaf(&at(&["pool", "max_connections"]), &Value::from("x")).unwrap_err();
        assert!(err.contains("string"), "{err}");
        let mut up = at(&["upstream"]);
        up.push(Step::Element);
        up.push(Step::Key("max_idle".into()));
        assert!(
            check_leaf(&up, &Value::from(2u8)).is_ok(),
            "missing name is not its fault"
        );
        assert!(check_leaf(&up, &Value::from(true)).is_err());
    }

    #[test]
    fn suggestions_are_close_words_only() {
        let keys = ["max_connections", "max_idle", "idle_timeout"];
        assert_eq!(suggest("max_conections", keys), Some("max_connections"));
        assert_eq!(suggest("idle_timout", keys), Some("idle_timeout"));
        assert_eq!(suggest("banana", keys), None);
    }
}
