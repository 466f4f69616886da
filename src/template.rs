//! Templates of `spec.secret.format.template`: compiled and checked when the spec is validated,
//! rendered with the token when the Secret is written.
//!
//! Tenants write the templates, so the engine is minijinja with nothing it could reach beyond
//! the values given (no loader, no functions, no globals), and the language is cut down to what
//! cannot amplify: text, `{{ expressions }}`, `if` and `for` over the given values, and a fixed
//! set of filters. There is no `set`, no `with` and no string repetition (`*`), which are the
//! ways a short template builds a value of gigabytes before any output limit could act; loops
//! are bounded by fuel, output by a byte limit.

use std::io::{self, Write};

use minijinja::{
    Environment, UndefinedBehavior,
    machinery::{
        WhitespaceConfig,
        ast::{BinOpKind, CallArg, Expr, Stmt},
    },
    syntax::SyntaxConfig,
};
use serde::Serialize;

/// The variables a data template sees; annotation templates see all but `token`.
pub const VARIABLES: [&str; 5] = ["token", "expires_at", "username", "scopes", "fingerprint"];
/// The filters a template may use.
pub const FILTERS: [&str; 11] = [
    "b64encode",
    "urlencode",
    "tojson",
    "upper",
    "lower",
    "trim",
    "join",
    "default",
    "length",
    "first",
    "last",
];
/// Instructions one rendering may execute: a configuration file takes a few hundred.
const FUEL: u64 = 50_000;

/// What a template is rendered with.
#[derive(Serialize)]
pub struct Values<'a> {
    /// `None` for annotation templates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a str>,
    pub expires_at: &'a str,
    pub username: Option<&'a str>,
    pub scopes: &'a [String],
    pub fingerprint: &'a str,
}

/// Why a template is refused or failed to render; never contains a rendered value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("{0}")]
    Syntax(String),
    #[error("{0} is not allowed in a template")]
    NotAllowed(String),
    #[error("rendering failed: {0}")]
    Render(String),
    #[error("the rendered value is longer than {limit} bytes")]
    TooLarge { limit: usize },
}

/// Checks that `source` parses and uses only the allowed language.
pub fn check(source: &str, with_token: bool) -> Result<(), TemplateError> {
    let parsed = minijinja::machinery::parse(source, "template", SyntaxConfig, WhitespaceConfig::default())
        .map_err(|e| TemplateError::Syntax(describe(&e)))?;
    let mut allowed = Allowed {
        with_token,
        loop_vars: Vec::new(),
    };
    allowed.stmt(&parsed)
}

/// Renders `source` (already [`check`]ed) with `values`, to at most `limit` bytes.
pub fn render(source: &str, values: &Values<'_>, limit: usize) -> Result<String, TemplateError> {
    let mut env = Environment::empty();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_keep_trailing_newline(true);
    env.add_filter("b64encode", b64encode);
    env.add_filter("urlencode", minijinja::filters::urlencode);
    env.add_filter("tojson", minijinja::filters::tojson);
    env.add_filter("upper", minijinja::filters::upper);
    env.add_filter("lower", minijinja::filters::lower);
    env.add_filter("trim", minijinja::filters::trim);
    env.add_filter("join", minijinja::filters::join);
    env.add_filter("default", minijinja::filters::default);
    env.add_filter("length", minijinja::filters::length);
    env.add_filter("first", minijinja::filters::first);
    env.add_filter("last", minijinja::filters::last);
    let template = env
        .template_from_str(source)
        .map_err(|e| TemplateError::Syntax(describe(&e)))?;
    let mut out = Capped {
        bytes: Vec::new(),
        limit,
        over: false,
    };
    let result = template.render_captured_to(values, &mut out);
    if out.over {
        return Err(TemplateError::TooLarge { limit });
    }
    result.map_err(|e| TemplateError::Render(describe(&e)))?;
    String::from_utf8(out.bytes).map_err(|_| TemplateError::Render("the output is not UTF-8".into()))
}

fn b64encode(value: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(value)
}

/// An error's kind and position, without the detail minijinja adds (which may quote the
/// template's values).
fn describe(e: &minijinja::Error) -> String {
    let what = match e.detail() {
        Some(detail) if e.kind() == minijinja::ErrorKind::SyntaxError => format!("syntax error: {detail}"),
        _ => e.kind().to_string(),
    };
    match e.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

/// Output that stops accepting bytes past `limit`.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.over = true;
            return Err(io::Error::other("output limit reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The allowed subset of the language, checked on the parsed template.
struct Allowed {
    with_token: bool,
    /// Names bound by enclosing `for` loops.
    loop_vars: Vec<String>,
}

impl Allowed {
    fn stmts(&mut self, stmts: &[Stmt<'_>]) -> Result<(), TemplateError> {
        stmts.iter().try_for_each(|s| self.stmt(s))
    }

    fn stmt(&mut self, stmt: &Stmt<'_>) -> Result<(), TemplateError> {
        match stmt {
            Stmt::Template(t) => self.stmts(&t.children),
            Stmt::EmitRaw(_) => Ok(()),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::IfCond(c) => {
                self.expr(&c.expr)?;
                self.stmts(&c.true_body)?;
                self.stmts(&c.false_body)
            }
            Stmt::ForLoop(l) => {
                if l.recursive {
                    return Err(not_allowed("a recursive loop"));
                }
                let Expr::Var(target) = &l.target else {
                    return Err(not_allowed("unpacking in a loop"));
                };
                self.expr(&l.iter)?;
                self.loop_vars.push(target.id.to_string());
                self.loop_vars.push("loop".into());
                let body = (l.filter_expr.iter().try_for_each(|e| self.expr(e)))
                    .and_then(|()| self.stmts(&l.body))
                    .and_then(|()| self.stmts(&l.else_body));
                self.loop_vars.truncate(self.loop_vars.len() - 2);
                body
            }
            Stmt::Set(_) | Stmt::SetBlock(_) => Err(not_allowed("`set`")),
            Stmt::WithBlock(_) => Err(not_allowed("`with`")),
            Stmt::AutoEscape(_) => Err(not_allowed("`autoescape`")),
            Stmt::FilterBlock(_) => Err(not_allowed("a filter block")),
            Stmt::Do(_) => Err(not_allowed("`do`")),
        }
    }

    fn exprs<'e>(&mut self, exprs: impl IntoIterator<Item = &'e Expr<'e>>) -> Result<(), TemplateError> {
        exprs.into_iter().try_for_each(|e| self.expr(e))
    }

    fn args(&mut self, args: &[CallArg<'_>]) -> Result<(), TemplateError> {
        for arg in args {
            match arg {
                CallArg::Pos(e) | CallArg::Kwarg(_, e) => self.expr(e)?,
                CallArg::PosSplat(_) | CallArg::KwargSplat(_) => return Err(not_allowed("argument splatting")),
            }
        }
        Ok(())
    }

    fn expr(&mut self, expr: &Expr<'_>) -> Result<(), TemplateError> {
        match expr {
            Expr::Var(v) => self.var(v.id),
            Expr::Const(_) => Ok(()),
            Expr::Slice(s) => {
                self.expr(&s.expr)?;
                self.exprs(s.start.iter().chain(&s.stop).chain(&s.step))
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                if matches!(b.op, BinOpKind::Mul | BinOpKind::Pow) {
                    return Err(not_allowed("`*` and `**`"));
                }
                self.expr(&b.left)?;
                self.expr(&b.right)
            }
            Expr::Compare(c) => {
                self.expr(&c.expr)?;
                self.exprs(c.ops.iter().map(|o| &o.expr))
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr)?;
                self.expr(&i.true_expr)?;
                self.exprs(i.false_expr.iter())
            }
            Expr::Filter(f) => {
                if !FILTERS.contains(&f.name) {
                    return Err(TemplateError::NotAllowed(format!(
                        "the filter {:?} (filters: {})",
                        f.name,
                        FILTERS.join(", ")
                    )));
                }
                self.exprs(f.expr.iter())?;
                self.args(&f.args)
            }
            Expr::Test(t) => Err(TemplateError::NotAllowed(format!("the test {:?}", t.name))),
            Expr::GetAttr(a) => self.expr(&a.expr),
            Expr::GetItem(i) => {
                self.expr(&i.expr)?;
                self.expr(&i.subscript_expr)
            }
            Expr::Call(_) => Err(not_allowed("a call")),
            Expr::List(l) => self.exprs(l.items.iter()),
            Expr::Map(_) => Err(not_allowed("a map literal")),
        }
    }

    fn var(&self, name: &str) -> Result<(), TemplateError> {
        let known = self.loop_vars.iter().any(|v| v == name)
            || (VARIABLES.contains(&name) && (self.with_token || name != "token"));
        if known {
            return Ok(());
        }
        let visible: Vec<&str> = VARIABLES
            .iter()
            .copied()
            .filter(|v| self.with_token || *v != "token")
            .collect();
        Err(TemplateError::NotAllowed(format!(
            "the variable {name:?} (variables: {})",
            visible.join(", ")
        )))
    }
}

fn not_allowed(what: &str) -> TemplateError {
    TemplateError::NotAllowed(what.into())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn values() -> Values<'static> {
        Values {
            token: Some("ya29.tok"),
            expires_at: "2026-01-01T01:00:00Z",
            username: Some("x-access-token"),
            scopes: &[],
            fingerprint: "0123456789ab",
        }
    }

    fn refusal(source: &str) -> String {
        match check(source, true) {
            Err(TemplateError::NotAllowed(what)) => what,
            other => panic!("{source:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn the_allowed_language_renders() {
        let source = "{% if username %}{{ username | upper }}:{% endif %}{{ token | b64encode }}\
                      {% for s in ['a', 'b'] %}[{{ loop.index }}{{ s }}]{% endfor %}";
        check(source, true).unwrap();
        assert_eq!(
            render(source, &values(), 1024).unwrap(),
            "X-ACCESS-TOKEN:eWEyOS50b2s=[1a][2b]"
        );
    }

    #[test]
    fn what_could_amplify_or_reach_out_is_refused() {
        assert_eq!(refusal("{% set a = token %}{{ a }}"), "`set`");
        assert_eq!(refusal("{% with a = token %}{{ a }}{% endwith %}"), "`with`");
        assert_eq!(refusal("{{ token * 100000000 }}"), "`*` and `**`");
        assert_eq!(refusal("{{ range(10) }}"), "a call");
        assert_eq!(refusal("{{ {'a': 1} }}"), "a map literal");
        assert!(refusal("{{ token | replace('a', 'bb') }}").starts_with("the filter \"replace\""));
        assert!(refusal("{{ secret }}").starts_with("the variable \"secret\""));
        assert!(refusal("{% for x in scopes recursive %}{{ loop(x) }}{% endfor %}").contains("recursive"));
        // Annotation templates do not see the token.
        assert!(matches!(check("{{ token }}", false), Err(TemplateError::NotAllowed(_))));
        check("{{ fingerprint }}", false).unwrap();
        assert!(matches!(check("{{ token ", true), Err(TemplateError::Syntax(_))));
    }

    #[test]
    fn loops_are_bounded_by_fuel_and_output_by_the_limit() {
        let nested = "{% for a in 'abcdefghij' %}{% for b in 'abcdefghij' %}{% for c in 'abcdefghij' %}\
                      {% for d in 'abcdefghij' %}{% for e in 'abcdefghij' %}x{% endfor %}{% endfor %}\
                      {% endfor %}{% endfor %}{% endfor %}";
        check(nested, true).unwrap();
        assert!(matches!(
            render(nested, &values(), 1 << 20),
            Err(TemplateError::Render(_))
        ));
        let long = "{% for a in 'abcdefghij' %}{{ token }}{% endfor %}";
        assert_eq!(render(long, &values(), 40), Err(TemplateError::TooLarge { limit: 40 }));
    }

    #[test]
    fn errors_do_not_quote_values() {
        let error = render("{{ token | length | upper }}{{ nothing }}", &values(), 1024).unwrap_err();
        assert!(!error.to_string().contains("ya29.tok"), "{error}");
    }

    proptest! {
        /// Any text is checked, and rendered if allowed, without a panic and within the limit.
        #[test]
        fn any_template_is_checked_and_rendered_safely(source in "[{}%# a-z|'()*~.\\[\\]0-9]{0,80}") {
            if check(&source, true).is_ok()
                && let Ok(out) = render(&source, &values(), 4096)
            {
                prop_assert!(out.len() <= 4096);
            }
        }
    }
}
