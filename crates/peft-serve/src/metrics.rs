//! Prometheus metrics (the Prometheus project's `prometheus-client`), served as text on
//! `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub adapter: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabels {
    pub adapter: String,
    /// `active` (on the model, batchable now) or `cpu` (read into memory, not on the model).
    pub residency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub adapter: String,
}

pub struct Metrics {
    registry: Registry,
    /// Finished requests by endpoint, adapter and outcome (`ok`, `cancelled`, HTTP status).
    pub requests: Family<RequestLabels, Counter>,
    /// Requests accepted and not yet answered (queued, prefilling or decoding).
    pub in_flight: Gauge,
    /// Generation requests waiting for a batch slot.
    pub queue_depth: Gauge,
    /// Rows in the running batch (prefilling or decoding).
    pub batch_size: Gauge,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub generated_tokens: Family<TokenLabels, Counter>,
    pub prompt_tokens: Family<TokenLabels, Counter>,
    /// 1 for every adapter in memory, labelled with where it lives.
    pub adapters: Family<AdapterLabels, Gauge>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("peft");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Finished requests by endpoint, adapter and status",
            requests.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests accepted and not yet answered",
            in_flight.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Generation requests waiting for a batch slot",
            queue_depth.clone(),
        );
        let batch_size = Gauge::default();
        registry.register(
            "running_batch_size",
            "Generation rows admitted (prefilling or decoding)",
            batch_size.clone(),
        );
        let ttft = Histogram::new(latency_buckets());
        registry.register(
            "time_to_first_token_seconds",
            "From a generation request's arrival to its first token",
            ttft.clone(),
        );
        let itl = Histogram::new(latency_buckets());
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            itl.clone(),
        );
        let e2e = Histogram::new(latency_buckets());
        registry.register(
            "request_latency_seconds",
            "From a request's arrival to its last token (or answer)",
            e2e.clone(),
        );
        let generated_tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "generated_tokens",
            "Tokens generated, by adapter",
            generated_tokens.clone(),
        );
        let prompt_tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed, by adapter",
            prompt_tokens.clone(),
        );
        let adapters = Family::<AdapterLabels, Gauge>::default();
        registry.register(
            "adapter_loaded",
            "1 for each adapter in memory (residency: active on the model, or cpu)",
            adapters.clone(),
        );
        Self {
            registry,
            requests,
            in_flight,
            queue_depth,
            batch_size,
            ttft,
            itl,
            e2e,
            generated_tokens,
            prompt_tokens,
            adapters,
        }
    }

    pub fn count(&self, endpoint: &str, adapter: &str, status: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.into(),
                adapter: adapter.into(),
                status: status.into(),
            })
            .inc();
    }

    /// Replaces the adapter gauge with `(name, residency)` pairs.
    pub fn set_adapters(&self, list: &[(String, &'static str)]) {
        self.adapters.clear();
        for (name, residency) in list {
            self.adapters
                .get_or_create(&AdapterLabels {
                    adapter: name.clone(),
                    residency: residency.to_string(),
                })
                .set(1);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
