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

/// Every state the catalog shows for the health checks of one service, recorded by
/// blocking queries on `/v1/health/checks/{service}` (so a check that goes critical for a
/// moment is seen): each distinct `(CheckID, Status, Output)` once, in order. An agent that
/// is down or restarting is asked again.
#[allow(dead_code)] // Not every test binary records check states.
pub(crate) struct CheckRecorder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(String, String, String)>>,
}

#[allow(dead_code)]
impl CheckRecorder {
    /// Starts recording the checks of `service`.
    pub(crate) fn start(server: &ConsulServer, service: &str) -> Self {
        let url = format!("http://{}/v1/health/checks/{service}", server.address());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut index, mut seen) = (0u64, Vec::<(String, String, String)>::new());
            while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                let answer = http
                    .get(format!("{url}?index={index}&wait=1s"))
                    .timeout(std::time::Duration::from_secs(3))
                    .send()
                    .await;
                let Ok(resp) = answer else {
                    index = 0;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let next: u64 = resp
                    .headers()
                    .get("X-Consul-Index")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                let body = resp.bytes().await.unwrap_or_default();
                let Ok(checks) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) else {
                    index = 0;
                    continue;
                };
                // A restarted agent counts from the start again.
                index = if next < index { 0 } else { next };
                for c in checks {
                    let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    let state = (field("CheckID"), field("Status"), field("Output"));
                    if !seen.contains(&state) {
                        seen.push(state);
                    }
                }
            }
            seen
        });
        Self { stop, task }
    }

    /// Stops recording; panics, naming `what`, if a check was ever critical. Returns the
    /// states seen.
    pub(crate) async fn never_critical(self, what: &str) -> Vec<(String, String, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let states = tokio::time::timeout(std::time::Duration::from_secs(15), self.task)
            .await
            .expect("the recorder stops within its wait")
            .expect("the recorder ran");
        assert!(
            states.iter().all(|(_, status, _)| status != "critical"),
            "{what}: a check went critical: {states:?}"
        );
        states
    }
}
