//! Lambda's operations that Ember serves, each once with its method and
//! path: emberd and the cluster build their routers from this table
//! ([`router`]), and the cluster's front door tells which operation a
//! request is (for its body limit) before routing ([`Operation::of`]).

use http::Method;

/// The table: each operation, its method and its path (`{name}`, a
/// function's name, `name:qualifier` or ARN, and `{alias}` stand for one
/// segment each).
macro_rules! operations {
    ($($op:ident => $method:ident $path:literal,)*) => {
        /// One of Lambda's REST operations.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Operation {
            $($op,)*
        }

        impl Operation {
            pub const ALL: &'static [Operation] = &[$(Operation::$op,)*];

            /// Its method and path.
            pub fn route(self) -> (Method, &'static str) {
                match self {
                    $(Operation::$op => (Method::$method, $path),)*
                }
            }
        }
    };
}

operations! {
    CreateFunction => POST "/2015-03-31/functions",
    ListFunctions => GET "/2015-03-31/functions",
    GetFunction => GET "/2015-03-31/functions/{name}",
    DeleteFunction => DELETE "/2015-03-31/functions/{name}",
    GetFunctionConfiguration => GET "/2015-03-31/functions/{name}/configuration",
    UpdateFunctionConfiguration => PUT "/2015-03-31/functions/{name}/configuration",
    UpdateFunctionCode => PUT "/2015-03-31/functions/{name}/code",
    PublishVersion => POST "/2015-03-31/functions/{name}/versions",
    ListVersionsByFunction => GET "/2015-03-31/functions/{name}/versions",
    CreateAlias => POST "/2015-03-31/functions/{name}/aliases",
    ListAliases => GET "/2015-03-31/functions/{name}/aliases",
    GetAlias => GET "/2015-03-31/functions/{name}/aliases/{alias}",
    UpdateAlias => PUT "/2015-03-31/functions/{name}/aliases/{alias}",
    DeleteAlias => DELETE "/2015-03-31/functions/{name}/aliases/{alias}",
    Invoke => POST "/2015-03-31/functions/{name}/invocations",
    PutFunctionConcurrency => PUT "/2017-10-31/functions/{name}/concurrency",
    DeleteFunctionConcurrency => DELETE "/2017-10-31/functions/{name}/concurrency",
    GetFunctionConcurrency => GET "/2019-09-30/functions/{name}/concurrency",
    PutProvisionedConcurrencyConfig => PUT "/2019-09-30/functions/{name}/provisioned-concurrency",
    GetProvisionedConcurrencyConfig => GET "/2019-09-30/functions/{name}/provisioned-concurrency",
}

const FUNCTIONS: &str = "/2015-03-31/functions";

impl Operation {
    /// The operation a request for `path` (no query) with `method` is,
    /// matched as the router matches it; None for any other.
    pub fn of(method: &Method, path: &str) -> Option<Operation> {
        // ListFunctions and CreateFunction are also sent with a final '/'.
        let path = if path == "/2015-03-31/functions/" {
            FUNCTIONS
        } else {
            path
        };
        Operation::ALL.iter().copied().find(|op| {
            let (m, pattern) = op.route();
            m == *method && matches(pattern, path)
        })
    }
}

/// Whether `path` fits `pattern`, each `{..}` one non-empty segment.
fn matches(pattern: &str, path: &str) -> bool {
    let mut got = path.split('/');
    for want in pattern.split('/') {
        match got.next() {
            Some(seg) if want.starts_with('{') => {
                if seg.is_empty() {
                    return false;
                }
            }
            Some(seg) if seg == want => {}
            _ => return false,
        }
    }
    got.next().is_none()
}

/// A router of Lambda's operations: `handler` gives each operation this
/// side serves its handler (made with [`handle`]), None for those it does
/// not; paths with several operations get one route.
#[cfg(feature = "axum")]
pub fn router<S: Clone + Send + Sync + 'static>(
    mut handler: impl FnMut(Operation) -> Option<axum::routing::MethodRouter<S>>,
) -> axum::Router<S> {
    let mut by_path: std::collections::BTreeMap<&str, axum::routing::MethodRouter<S>> =
        Default::default();
    for &op in Operation::ALL {
        let Some(h) = handler(op) else { continue };
        let path = op.route().1;
        let merged = match by_path.remove(path) {
            Some(prev) => prev.merge(h),
            None => h,
        };
        by_path.insert(path, merged);
    }
    let mut r = axum::Router::new();
    for (path, h) in by_path {
        if path == FUNCTIONS {
            r = r.route("/2015-03-31/functions/", h.clone());
        }
        r = r.route(path, h);
    }
    r
}

/// `h` as the handler of `op` (for its method only).
#[cfg(feature = "axum")]
pub fn handle<H, T, S>(op: Operation, h: H) -> axum::routing::MethodRouter<S>
where
    H: axum::handler::Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    let filter = axum::routing::MethodFilter::try_from(op.route().0)
        .unwrap_or(axum::routing::MethodFilter::GET);
    axum::routing::on(filter, h)
}

#[cfg(test)]
mod tests {
    use super::Operation::*;
    use super::*;

    #[test]
    fn requests_are_told_apart_as_the_router_does() {
        let post = Method::POST;
        assert_eq!(
            Operation::of(&post, "/2015-03-31/functions"),
            Some(CreateFunction)
        );
        assert_eq!(
            Operation::of(&post, "/2015-03-31/functions/"),
            Some(CreateFunction)
        );
        assert_eq!(
            Operation::of(
                &post,
                "/2015-03-31/functions/arn%3Aaws%3Alambda%3Ax/invocations"
            ),
            Some(Invoke)
        );
        assert_eq!(
            Operation::of(&Method::PUT, "/2015-03-31/functions/f/code"),
            Some(UpdateFunctionCode)
        );
        assert_eq!(
            Operation::of(&Method::PUT, "/2015-03-31/functions/f/code/x"),
            None
        );
        assert_eq!(
            Operation::of(&Method::PUT, "/2015-03-31/functions//code"),
            None
        );
        assert_eq!(
            Operation::of(&Method::GET, "/2015-03-31/functions/f/code"),
            None
        );
        assert_eq!(
            Operation::of(&Method::PUT, "/2017-10-31/functions/f/concurrency"),
            Some(PutFunctionConcurrency)
        );
        // Every operation is found at its own route, and only there.
        for &op in Operation::ALL {
            let (m, p) = op.route();
            let p = p.replace("{name}", "f").replace("{alias}", "a");
            assert_eq!(Operation::of(&m, &p), Some(op), "{op:?}");
        }
    }
}
