//! Steps shared by the crate's tests: what another tool does to the agent behind the
//! client's back.

use waypost_testkit::ConsulServer;

/// `PUT /v1/agent/{path}` on `server` with `body` (a foreign writer: the CLI, another
/// client); panics unless the agent answers with success.
pub(crate) async fn agent_put(server: &ConsulServer, path: &str, body: Option<String>) {
    let mut req =
        reqwest::Client::new().put(format!("http://{}/v1/agent/{path}", server.address()));
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = req.send().await.expect("the agent answers");
    assert!(resp.status().is_success(), "PUT /v1/agent/{path}: {resp:?}");
}
