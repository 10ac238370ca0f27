import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

/** Prometheus metrics of one server instance, exposed at GET /metrics. */
export class Metrics {
  readonly registry = new Registry();
  readonly rpcRequests = new Counter({
    name: "parley_rpc_requests_total",
    help: "RPCs handled, by method and final code",
    labelNames: ["method", "code"] as const,
    registers: [this.registry],
  });
  readonly rpcDuration = new Histogram({
    name: "parley_rpc_duration_seconds",
    help: "RPC latency (for streams: until the stream ends), by method and code",
    labelNames: ["method", "code"] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60],
    registers: [this.registry],
  });
  readonly activeStreams = new Gauge({
    name: "parley_active_streams",
    help: "Open server streams (WatchMessages, Subscribe, hub connections), by kind",
    labelNames: ["kind"] as const,
    registers: [this.registry],
  });
  readonly busSubscriptions = new Gauge({
    name: "parley_bus_subscriptions",
    help: "Subjects this instance is subscribed to on the bus",
    registers: [this.registry],
  });
  readonly messagesSent = new Counter({
    name: "parley_messages_sent_total",
    help: "Messages stored",
    registers: [this.registry],
  });
  readonly sendStatementDuration = new Histogram({
    name: "parley_send_statement_seconds",
    help: "Time of one statement storing queued sends (group commit), from issue to result",
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
    registers: [this.registry],
  });
  readonly sendStatementSends = new Histogram({
    name: "parley_send_statement_sends",
    help: "Sends carried by one statement (group commit)",
    buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256],
    registers: [this.registry],
  });
  readonly publishFailures = new Counter({
    name: "parley_bus_publish_failures_total",
    help: "Events that could not be published after commit (clients catch up by sequence)",
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry });
  }
}
