import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";

export interface HealthOptions {
  /** Overall readiness; every service in serviceNames shares it. */
  isServing: () => Promise<boolean>;
  /** Fully-qualified names answered besides "" (the whole server). */
  serviceNames: string[];
  /** Ends open Watch streams, e.g. on shutdown. */
  signal?: AbortSignal;
  /** How often Watch re-checks isServing; 5000 by default. */
  watchIntervalMs?: number;
}

/** Serves grpc.health.v1.Health as the gRPC health checking protocol specifies. */
export function registerHealth(router: ConnectRouter, options: HealthOptions): void {
  const known = new Set(["", ...options.serviceNames]);
  const interval = options.watchIntervalMs ?? 5000;
  // A failing probe (e.g. the database is down) means "not serving", not an RPC error.
  const current = async (): Promise<Status> =>
    (await options.isServing().catch(() => false)) ? Status.SERVING : Status.NOT_SERVING;

  router.service(Health, {
    async check({ service }) {
      if (!known.has(service)) throw new ConnectError(`unknown service ${service}`, Code.NotFound);
      return { status: await current() };
    },
    async *watch({ service }, context) {
      const signal = options.signal ? AbortSignal.any([context.signal, options.signal]) : context.signal;
      let last: Status | undefined;
      while (!signal.aborted) {
        // Unknown services are answered, not failed: the spec keeps the call open for them.
        const status = known.has(service) ? await current() : Status.SERVICE_UNKNOWN;
        if (status !== last) yield { status };
        last = status;
        await sleep(interval, undefined, { signal }).catch(() => {});
      }
    },
  });
}
