//! Lambda's operations that Ember serves, each once with its method and
//! path: emberd and the cluster build their routers from this table
//! ([`router`]), and the cluster's front door tells which operation a
//! request is (for its body limit) before routing ([`Operation::of`]).

use http::Method;

/// One of Lambda's REST operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    CreateFunction,
    ListFunctions,
    GetFunction,
    DeleteFunction,
    GetFunctionConfiguration,
    UpdateFunctionConfiguration,
    UpdateFunctionCode,
    PublishVersion,
    ListVersionsByFunction,
    CreateAlias,
    ListAliases,
    GetAlias,
    UpdateAlias,
    DeleteAlias,
    Invoke,
    PutFunctionConcurrency,
    DeleteFunctionConcurrency,
    GetFunctionConcurrency,
    PutProvisionedConcurrencyConfig,
    GetProvisionedConcurrencyConfig,
}

use Operation::*;

const FUNCTIONS: &str = "/2015-03-31/functions";

impl Operation {
    pub const ALL: [Operation; 20] = [
        CreateFunction,
        ListFunctions,
        GetFunction,
        DeleteFunction,
        GetFunctionConfiguration,
        UpdateFunctionConfiguration,
        UpdateFunctionCode,
        PublishVersion,
        ListVersionsByFunction,
        CreateAlias,
        ListAliases,
        GetAlias,
        UpdateAlias,
        DeleteAlias,
        Invoke,
        PutFunctionConcurrency,
        DeleteFunctionConcurrency,
        GetFunctionConcurrency,
        PutProvisionedConcurrencyConfig,
        GetProvisionedConcurrencyConfig,
    ];

    /// Its method and path, `{name}` (a function's name, `name:qualifier`
    /// or ARN) and `{alias}` standing for one segment each.
    pub fn route(self) -> (Method, &'static str) {
        match self {
            CreateFunction => (Method::POST, FUNCTIONS),
            ListFunctions => (Method::GET, FUNCTIONS),
            GetFunction => (Method::GET, "/2015-03-31/functions/{name}"),
            DeleteFunction => (Method::DELETE, "/2015-03-31/functions/{name}"),
            GetFunctionConfiguration => (Method::GET, "/2015-03-31/functions/{name}/configuration"),
            UpdateFunctionConfiguration => {
                (Method::PUT, "/2015-03-31/functions/{name}/configuration")
            }
            UpdateFunctionCode => (Method::PUT, "/2015-03-31/functions/{name}/code"),
            PublishVersion => (Method::POST, "/2015-03-31/functions/{name}/versions"),
            ListVersionsByFunction => (Method::GET, "/2015-03-31/functions/{name}/versions"),
            CreateAlias => (Method::POST, "/2015-03-31/functions/{name}/aliases"),
            ListAliases => (Method::GET, "/2015-03-31/functions/{name}/aliases"),
            GetAlias => (Method::GET, "/2015-03-31/functions/{name}/aliases/{alias}"),
            UpdateAlias => (Method::PUT, "/2015-03-31/functions/{name}/aliases/{alias}"),
            DeleteAlias => (
                Method::DELETE,
                "/2015-03-31/functions/{name}/aliases/{alias}",
            ),
            Invoke => (Method::POST, "/2015-03-31/functions/{name}/invocations"),
            PutFunctionConcurrency => (Method::PUT, "/2017-10-31/functions/{name}/concurrency"),
            DeleteFunctionConcurrency => {
                (Method::DELETE, "/2017-10-31/functions/{name}/concurrency")
            }
            GetFunctionConcurrency => (Method::GET, "/2019-09-30/functions/{name}/concurrency"),
            PutProvisionedConcurrencyConfig => (
                Method::PUT,
                "/2019-09-30/functions/{name}/provisioned-concurrency",
            ),
            GetProvisionedConcurrencyConfig => (
                Method::GET,
                "/2019-09-30/functions/{name}/provisioned-concurrency",
            ),
        }
    }

    /// The operation a request for `path` (no query) with `method` is,
    /// matched as the router matches it; None for any other.
    pub fn of(method: &Method, path: &str) -> Option<Operation> {
        // ListFunctions and CreateFunction are also sent with a final '/'.
        let path = if path == "/2015-03-31/functions/" {
            FUNCTIONS
        } else {
            path
        };
        Operation::ALL.into_iter().find(|op| {
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
    for op in Operation::ALL {
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
        for op in Operation::ALL {
            let (m, p) = op.route();
            let p = p.replace("{name}", "f").replace("{alias}", "a");
            assert_eq!(Operation::of(&m, &p), Some(op), "{op:?}");
        }
    }
}
