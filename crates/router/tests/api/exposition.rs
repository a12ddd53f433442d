//! A small, strict reader of the OpenMetrics text that `GET /metrics` serves, for tests: the `# TYPE` of each
//! family and every sample's name, labels (escapes undone) and value. The router's unit tests use it too.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug)]
pub struct Exposition {
    /// Family name to type (`counter`, `gauge`, `histogram`...), from the `# TYPE` lines.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The samples called `name`.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| sample.name == name)
    }

    /// The value of the sample called `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples(name).find(|sample| sample.labels == wanted).map(|sample| sample.value)
    }
}

/// Parses `text`, which must end with the `# EOF` line; an error names the first line that does not parse.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let body = text.strip_suffix("# EOF\n").ok_or("no `# EOF` line at the end")?;
    let mut exposition = Exposition { types: BTreeMap::new(), samples: Vec::new() };
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            if let Some(declaration) = comment.strip_prefix("TYPE ") {
                let (family, kind) = declaration.split_once(' ').ok_or(format!("bad TYPE line: {line}"))?;
                exposition.types.insert(family.to_owned(), kind.to_owned());
            }
            continue;
        }
        exposition.samples.push(sample(line).ok_or(format!("bad sample line: {line:?}"))?);
    }
    Ok(exposition)
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let (value, after) = label_value(after)?;
            if !is_name(key) || labels.insert(key.to_owned(), value).is_some() {
                return None;
            }
            rest = match after.strip_prefix(',') {
                Some(after) => after,
                None if after.starts_with('}') => after,
                None => return None,
            };
        }
    }
    // A value, then possibly a timestamp or an exemplar, which tests do not need.
    let value = rest.strip_prefix(' ')?.split(' ').next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().ok()?,
    };
    is_name(name).then(|| Sample { name: name.to_owned(), labels, value })
}

fn is_name(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// An escaped label value up to its closing quote, and what follows the quote.
fn label_value(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[at + 1..])),
            '\\' => value.push(match chars.next()?.1 {
                '\\' => '\\',
                '"' => '"',
                'n' => '\n',
                _ => return None,
            }),
            '\n' => return None,
            c => value.push(c),
        }
    }
    None
}
