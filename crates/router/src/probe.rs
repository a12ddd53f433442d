//! The registration reachability check (SPEC §2.1 step 4): can the router reach the node's runtime?

use std::net::SocketAddr;
use std::time::Duration;

use llm_router_protocol::ModelList;

/// Probes `GET http://{addr}/v1/models` with a bounded timeout.
#[derive(Debug, Clone)]
pub struct Prober {
    client: reqwest::Client,
}

impl Prober {
    pub fn new(timeout: Duration) -> anyhow::Result<Prober> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Prober { client })
    }

    /// The models the runtime lists, or why it could not be reached (a sentence naming the URL and the cause).
    pub async fn models(&self, addr: SocketAddr) -> Result<Vec<String>, String> {
        let url = format!("http://{addr}/v1/models");
        let response = self.client.get(&url).send().await.map_err(|err| {
            let cause = if err.is_timeout() {
                "it did not answer in time".to_owned()
            } else if err.is_connect() {
                "the connection failed (is the runtime running and the port open to the router?)".to_owned()
            } else {
                format!("the request failed: {err}")
            };
            format!("The router could not reach the node's runtime at {url}: {cause}.")
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("The node's runtime at {url} answered HTTP {status}; it must answer 2xx."));
        }
        // A 2xx that is not a model list still proves reachability; it just names no model.
        let bytes = response.bytes().await.unwrap_or_default();
        Ok(serde_json::from_slice::<ModelList>(&bytes).map(|list| list.ids()).unwrap_or_default())
    }
}
