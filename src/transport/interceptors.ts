import { randomUUID } from "node:crypto";
import { ConnectError, type Interceptor } from "@connectrpc/connect";
import { callerKey } from "../auth/caller.js";
import type { TokenVerifier } from "../auth/token-verifier.js";
import { toConnectError } from "../errors.js";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";

/** Counts, times and logs every RPC (streams when they end) with a request id; never logs payloads. */
export function observe(metrics: Metrics, log: Logger): Interceptor {
  return (next) => async (req) => {
    const requestId = req.header.get("x-request-id")?.slice(0, 128) || randomUUID();
    const method = `${req.service.typeName}/${req.method.name}`;
    const started = performance.now();
    const finish = (error: unknown) => {
      const code = error === undefined ? "ok" : codeName(ConnectError.from(error).code);
      const seconds = (performance.now() - started) / 1000;
      metrics.rpcRequests.inc({ method, code });
      metrics.rpcDuration.observe({ method, code }, seconds);
      const caller = req.contextValues.get(callerKey);
      log.info(
        { requestId, method, code, ms: Math.round(seconds * 1000), tenant: caller?.tenantId, user: caller?.userId },
        "rpc",
      );
    };
    try {
      const res = await next(req);
      res.header.set("x-request-id", requestId);
      if (!res.stream) {
        finish(undefined);
        return res;
      }
      return { ...res, message: finally_(res.message, finish) };
    } catch (error) {
      finish(error);
      throw error;
    }
  };
}

/** Maps domain errors to Connect codes (unary and streams), via the one table in errors.ts. */
export function mapErrors(log: Logger): Interceptor {
  return (next) => async (req) => {
    try {
      const res = await next(req);
      if (!res.stream) return res;
      return { ...res, message: mapStreamErrors(res.message, log) };
    } catch (error) {
      throw toConnectError(error, log);
    }
  };
}

/** Verifies the bearer token and puts the caller into the context. */
export function authenticate(verifier: TokenVerifier): Interceptor {
  return (next) => async (req) => {
    const caller = await verifier.verifyHeader(req.header.get("authorization"));
    req.contextValues.set(callerKey, caller);
    return next(req);
  };
}

async function* mapStreamErrors<T>(stream: AsyncIterable<T>, log: Logger): AsyncIterable<T> {
  try {
    yield* stream;
  } catch (error) {
    throw toConnectError(error, log);
  }
}

async function* finally_<T>(stream: AsyncIterable<T>, finish: (error: unknown) => void): AsyncIterable<T> {
  let failure: unknown;
  try {
    yield* stream;
  } catch (error) {
    failure = error;
    throw error;
  } finally {
    finish(failure);
  }
}

function codeName(code: number): string {
  return codeNames[code] ?? String(code);
}

const codeNames = [
  "ok", "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists",
  "permission_denied", "resource_exhausted", "failed_precondition", "aborted", "out_of_range",
  "unimplemented", "internal", "unavailable", "data_loss", "unauthenticated",
];
