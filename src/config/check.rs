//! Loading that reports every problem at once: TOML syntax, unknown keys (with a
//! suggestion), values of the wrong type, environment variables that match no key,
//! then [`Config::validate`]'s semantic problems. Each names the key in one style
//! (`upstream[1].max_connections`) and where its value was written: `file:line`, or
//! the environment variable that set it.
//!
//! The document is walked against [`schema::shape`], which is learnt from the
//! structs, so a key added to them needs no change here. A value with a problem is
//! dropped (its default stands) and the walk goes on, so one run finds them all.

use std::collections::HashMap;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use figment::Provider;
use toml_edit::{ImDocument, Item, TableLike};

use super::env::{self, Override};
use super::path::{display, parse_path, Seg};
use super::schema::{self, Shape, Step};
use super::{Config, ConfigError, Problem};

fn steps(path: &[Seg]) -> Vec<Step> {
    path.iter()
        .map(|s| match s {
            Seg::Key(k) => Step::Key(k.clone()),
            Seg::Index(_) => Step::Element,
        })
        .collect()
}

/// Where values came from, to say where a problem was written.
struct Locator<'a> {
    name: &'a str,
    text: &'a str,
    doc: Option<ImDocument<&'a str>>,
    /// Paths set by environment variables, and the variable.
    env: Vec<(Vec<Seg>, String)>,
}

/// Sort key: file problems by line, then environment ones, then the rest.
type Order = (u8, usize);

impl Locator<'_> {
    fn locate(&self, path: &[Seg]) -> (String, Order) {
        if let Some((i, (_, var))) = self
            .env
            .iter()
            .enumerate()
            .find(|(_, (p, _))| path.starts_with(p))
        {
            return (var.clone(), (1, i));
        }
        match self.doc.as_ref().and_then(|d| offset_of(d, path)) {
            Some(offset) => {
                let line = line_of(self.text, offset);
                (format!("{}:{line}", self.name), (0, line))
            }
            None => (String::new(), (2, 0)),
        }
    }

    fn problem(&self, path: &[Seg], message: String) -> (Order, Problem) {
        let (at, order) = self.locate(path);
        (
            order,
            Problem {
                path: display(path),
                message,
                at,
            },
        )
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a toml_edit::Value),
}

/// The byte offset where the key (or array element) at `path` was written.
fn offset_of(doc: &ImDocument<&str>, path: &[Seg]) -> Option<usize> {
    let mut node = Node::Table(doc.as_table());
    let mut offset = None;
    for seg in path {
        node = match seg {
            Seg::Key(k) => {
                let table: &dyn TableLike = match node {
                    Node::Item(item) => item.as_table_like()?,
                    Node::Table(t) => t,
                    Node::Value(v) => v.as_inline_table()?,
                };
                let (key, item) = table.get_key_value(k)?;
                offset = key
                    .span()
                    .or_else(|| item.span())
                    .map(|s| s.start)
                    .or(offset);
                Node::Item(item)
            }
            Seg::Index(i) => {
                let array = match node {
                    Node::Item(Item::ArrayOfTables(tables)) => {
                        let t = tables.get(*i)?;
                        offset = t.span().map(|s| s.start).or(offset);
                        node = Node::Table(t);
                        continue;
                    }
                    Node::Item(item) => item.as_array()?,
                    Node::Value(v) => v.as_array()?,
                    Node::Table(_) => return None,
                };
                let v = array.get(*i)?;
                offset = v.span().map(|s| s.start).or(offset);
                Node::Value(v)
            }
        };
    }
    offset
}

/// Loads the TOML `text` (called `name` in messages) with the `TETHER_` variables
/// of `vars` over it; every problem at once.
pub fn load(name: &str, text: &str, vars: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut problems: Vec<(Order, Problem)> = Vec::new();
    let overrides = env::overrides(vars);
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let (at, order) = match e.span() {
                Some(span) => {
                    let line = line_of(text, span.start);
                    let col = text[..span.start.min(text.len())]
                        .rsplit('\n')
                        .next()
                        .map_or(1, |l| l.chars().count() + 1);
                    (format!("{name}:{line}:{col}"), (0, line))
                }
                None => (name.to_string(), (0, 0)),
            };
            let message = format!("TOML syntax: {}", e.message().trim_end());
            problems.push((
                order,
                Problem {
                    path: String::new(),
                    message,
                    at,
                },
            ));
            // The environment can still be checked against the schema.
            for (i, o) in overrides.iter().enumerate() {
                if let Err(message) = env::resolve(o, &Dict::new(), false) {
                    problems.push(((1, i), env_problem(o, message)));
                }
            }
            return Err(finish(problems));
        }
    };
    let mut dict = match Toml::string(text).data() {
        Ok(mut profiles) => profiles
            .remove(&figment::Profile::Default)
            .unwrap_or_default(),
        Err(e) => {
            problems.push(((0, 0), Problem::at(name, "", format!("TOML: {e}"))));
            return Err(finish(problems));
        }
    };
    let mut locator = Locator {
        name,
        text,
        doc: Some(doc),
        env: Vec::new(),
    };

    walk(
        &mut dict,
        schema::shape(),
        &mut Vec::new(),
        &locator,
        &mut problems,
    );

    for (i, o) in overrides.iter().enumerate() {
        match env::resolve(o, &dict, true) {
            Ok(path) => {
                let value: Value = o.value.parse().expect("infallible");
                match schema::check_leaf(&steps(&path), &value) {
                    Ok(()) => {
                        set(&mut dict, &path, value);
                        locator.env.push((path, o.var.clone()));
                    }
                    Err(message) => problems.push((
                        (1, i),
                        Problem {
                            path: display(&path),
                            message,
                            at: o.var.clone(),
                        },
                    )),
                }
            }
            Err(message) => problems.push(((1, i), env_problem(o, message))),
        }
    }

    // Array tables missing a required key are reported and left out, so the rest
    // can still be validated; `kept` maps the remaining indices back.
    let mut kept: HashMap<String, Vec<usize>> = HashMap::new();
    for (key, shape) in schema::shape().keys() {
        if !matches!(shape, Shape::Tables(_)) {
            continue;
        }
        let Some(Value::Array(_, elements)) = dict.get_mut(*key) else {
            continue;
        };
        let mut indices = Vec::new();
        let mut i = 0;
        elements.retain(|element| {
            let path = vec![Seg::Key(key.to_string()), Seg::Index(i)];
            i += 1;
            let at = [Step::Key(key.to_string()), Step::Element];
            match schema::extract(schema::nest(&at, element.clone())) {
                Err(errors) => {
                    for e in errors {
                        problems.push(locator.problem(&path, e.kind.to_string()));
                    }
                    false
                }
                Ok(_) => {
                    indices.push(i - 1);
                    true
                }
            }
        });
        kept.insert(key.to_string(), indices);
    }

    let remap = |path: Vec<Seg>| -> Vec<Seg> {
        let mut path = path;
        if let [Seg::Key(k), Seg::Index(i), ..] = path.as_mut_slice() {
            if let Some(original) = kept.get(k.as_str()).and_then(|m| m.get(*i)) {
                *i = *original;
            }
        }
        path
    };

    let config = match schema::extract(dict) {
        Ok(config) => config,
        Err(errors) => {
            for e in errors {
                let path = remap(parse_path(&e.path.join(".")));
                problems.push(locator.problem(&path, e.kind.to_string()));
            }
            return Err(finish(problems));
        }
    };
    if let Err(ConfigError(semantic)) = config.validate() {
        for p in semantic {
            let path = remap(parse_path(&p.path));
            problems.push(locator.problem(&path, p.message));
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(finish(problems))
    }
}

fn env_problem(o: &Override, message: String) -> Problem {
    Problem {
        path: String::new(),
        message,
        at: o.var.clone(),
    }
}

fn finish(mut problems: Vec<(Order, Problem)>) -> ConfigError {
    problems.sort_by_key(|(order, _)| *order);
    ConfigError(problems.into_iter().map(|(_, p)| p).collect())
}

/// Checks every key of `dict` (at `path`) against `shape`, dropping what is wrong.
fn walk(
    dict: &mut Dict,
    shape: &Shape,
    path: &mut Vec<Seg>,
    locator: &Locator,
    problems: &mut Vec<(Order, Problem)>,
) {
    let keys: Vec<String> = dict.keys().cloned().collect();
    for key in keys {
        path.push(Seg::Key(key.clone()));
        let keep = match shape.get(&key) {
            None => {
                let names = shape.keys().iter().map(|(k, _)| *k);
                let message = match schema::suggest(&key, names) {
                    Some(s) => format!("unknown key; did you mean `{s}`?"),
                    None => format!(
                        "unknown key (keys here: {})",
                        shape
                            .keys()
                            .iter()
                            .map(|(k, _)| *k)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                problems.push(locator.problem(path, message));
                false
            }
            Some(inner @ Shape::Table(_)) => match dict.get_mut(&key) {
                Some(Value::Dict(_, d)) => {
                    walk(d, inner, path, locator, problems);
                    true
                }
                _ => leaf_ok(dict, &key, path, locator, problems),
            },
            Some(inner @ Shape::Tables(_)) => match dict.get_mut(&key) {
                Some(Value::Array(_, elements)) => {
                    for (i, element) in elements.iter_mut().enumerate() {
                        path.push(Seg::Index(i));
                        match element {
                            Value::Dict(_, d) => walk(d, inner, path, locator, problems),
                            _ => problems.push(locator.problem(path, "must be a table".into())),
                        }
                        path.pop();
                    }
                    true
                }
                _ => leaf_ok(dict, &key, path, locator, problems),
            },
            Some(Shape::Leaf) => leaf_ok(dict, &key, path, locator, problems),
        };
        if !keep {
            dict.remove(&key);
        }
        path.pop();
    }
}

/// Type-checks the value of `key` alone; records the problem when it is wrong.
fn leaf_ok(
    dict: &Dict,
    key: &str,
    path: &[Seg],
    locator: &Locator,
    problems: &mut Vec<(Order, Problem)>,
) -> bool {
    let Some(value) = dict.get(key) else {
        return true;
    };
    match schema::check_leaf(&steps(path), value) {
        Ok(()) => true,
        Err(message) => {
            problems.push(locator.problem(path, message));
            false
        }
    }
}

/// Sets `value` at `path`, making the tables on the way.
fn set(dict: &mut Dict, path: &[Seg], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = dict;
    let mut segs = parents.iter().peekable();
    while let Some(seg) = segs.next() {
        let next = match seg {
            Seg::Key(k) => node
                .entry(k.clone())
                .or_insert_with(|| Value::from(Dict::new())),
            Seg::Index(_) => continue,
        };
        // An array step: the element named by the following index.
        let next = match (next, segs.peek()) {
            (Value::Array(_, elements), Some(Seg::Index(i))) => {
                segs.next();
                match elements.get_mut(*i) {
                    Some(e) => e,
                    None => return,
                }
            }
            (other, _) => other,
        };
        match next {
            Value::Dict(_, d) => node = d,
            other => {
                *other = Value::from(Dict::new());
                let Value::Dict(_, d) = other else { return };
                node = d;
            }
        }
    }
    if let Seg::Key(k) = last {
        node.insert(k.clone(), value);
    }
}
