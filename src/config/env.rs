//! Environment overrides: `TETHER_<SECTION>__<KEY>` for every key of every table,
//! and `TETHER_<ARRAY>__<NAME>__<KEY>` for a key of the `[[upstream]]` (or any array
//! table with a `name` key) whose `name` is NAME: letters upper- or lower-case, `-`
//! in a name written `_`. Every `TETHER_` variable is configuration: one that
//! matches no key is an error that names it, with the closest name that would.
//! Values are read as figment reads them: `8`, `true`, `"5s"` or `5s`, `[a, b]`.

use figment::value::{Dict, Value};

use super::path::{display, Seg};
use super::schema::{self, Shape};
use super::ENV_PREFIX;

/// One `TETHER_` variable.
#[derive(Debug, Clone)]
pub struct Override {
    pub var: String,
    pub value: String,
}

/// The `TETHER_` variables of `vars` (the prefix in any case), in name order.
pub fn overrides(vars: &[(String, String)]) -> Vec<Override> {
    let mut out: Vec<Override> = vars
        .iter()
        .filter(|(k, _)| {
            k.len() > ENV_PREFIX.len()
                && k.is_char_boundary(ENV_PREFIX.len())
                && k[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
        })
        .map(|(k, v)| Override {
            var: k.clone(),
            value: v.clone(),
        })
        .collect();
    out.sort_by(|a, b| a.var.cmp(&b.var));
    out
}

/// How an array element's name is written in a variable.
fn env_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// The elements of the array at `path` in `dict` that have a `name`.
fn named_elements<'a>(dict: &'a Dict, key: &str) -> Vec<(usize, &'a str)> {
    match dict.get(key) {
        Some(Value::Array(_, elements)) => elements
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Value::Dict(_, d) => match d.get("name") {
                    Some(Value::String(_, n)) => Some((i, n.as_str())),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The key path `o` sets, or why it sets none. `names_known`: `dict` holds the
/// file's arrays (false after a syntax error: an element name cannot be checked).
pub fn resolve(o: &Override, dict: &Dict, names_known: bool) -> Result<Vec<Seg>, String> {
    let rest = o.var[ENV_PREFIX.len()..].to_ascii_lowercase();
    let segs: Vec<&str> = rest.split("__").collect();
    let unknown = || {
        let mut message = "matches no configuration key".to_string();
        let names = names(dict);
        if let Some(s) = schema::suggest(
            &o.var.to_ascii_uppercase(),
            names.iter().map(|n| n.as_str()),
        ) {
            message.push_str(&format!("; did you mean {s}?"));
        } else {
            message.push_str(" (TETHER_<SECTION>__<KEY>, or TETHER_UPSTREAM__<NAME>__<KEY>)");
        }
        message
    };
    let mut shape = schema::shape();
    let mut path = Vec::new();
    let mut i = 0;
    while i < segs.len() {
        let seg = segs[i];
        let Some(inner) = shape.get(seg) else {
            return Err(unknown());
        };
        path.push(Seg::Key(seg.to_string()));
        match inner {
            Shape::Tables(keys) => {
                if !keys.iter().any(|(k, _)| *k == "name") || path.len() != 1 {
                    return Err(format!(
                        "{} entries have no name to select them by: set them in the file",
                        seg
                    ));
                }
                let Some(wanted) = segs.get(i + 1) else {
                    return Err(unknown());
                };
                if !names_known {
                    return Err("not checked: the file has a syntax error".into());
                }
                let found: Vec<usize> = named_elements(dict, seg)
                    .into_iter()
                    .filter(|(_, n)| env_name(n) == *wanted)
                    .map(|(i, _)| i)
                    .collect();
                match found.as_slice() {
                    [index] => path.push(Seg::Index(*index)),
                    [] => {
                        let names = named_elements(dict, seg);
                        let near = schema::suggest(wanted, names.iter().map(|(_, n)| *n))
                            .map_or(String::new(), |n| {
                                format!("; did you mean {}?", n.to_ascii_uppercase())
                            });
                        return Err(format!(
                            "no [[{seg}]] is named {wanted:?} in the file (the environment \
                             changes listed ones, it cannot add one){near}"
                        ));
                    }
                    _ => return Err(format!("more than one [[{seg}]] is named {wanted:?}")),
                }
                shape = inner;
                i += 2;
                continue;
            }
            Shape::Table(_) | Shape::Leaf => shape = inner,
        }
        i += 1;
    }
    match shape {
        Shape::Leaf => Ok(path),
        _ => Err(format!(
            "names the table {}, not a key in it; did you mean {}__<KEY>?",
            display(&path),
            o.var
        )),
    }
}

/// Every variable name that sets a key, given the file's arrays.
pub fn names(dict: &Dict) -> Vec<String> {
    fn walk(shape: &Shape, prefix: &str, dict: &Dict, top: bool, out: &mut Vec<String>) {
        for (key, inner) in shape.keys() {
            let name = format!("{prefix}__{}", key.to_ascii_uppercase());
            match inner {
                Shape::Leaf => out.push(name),
                Shape::Table(_) => walk(inner, &name, dict, false, out),
                Shape::Tables(_) if top => {
                    for (_, n) in named_elements(dict, key) {
                        let element = format!("{name}__{}", env_name(n).to_ascii_uppercase());
                        walk(inner, &element, dict, false, out);
                    }
                }
                Shape::Tables(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(schema::shape(), "", dict, true, &mut out);
    out.into_iter()
        .map(|n| format!("{}{}", ENV_PREFIX, &n[2..]))
        .collect()
}
