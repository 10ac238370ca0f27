import { randomUUID } from "node:crypto";
import type http from "node:http";
import type http2 from "node:http2";
import { ConnectError, type Interceptor } from "@connectrpc/connect";
import { callerKey } from "../auth/caller.js";
import type { TokenVerifier } from "../auth/token-verifier.js";
import { toConnectError } from "../errors.js";
import { withDeadline } from "../deadline.js";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";

/**
 * Counts, times and logs every RPC (streams when they end) with its request id (set by the server for
 * every request, see assignRequestId); never logs payloads.
 */
export function observe(metrics: Metrics, log: Logger): Interceptor {
  return (next) => async (req) => {
    const requestId = req.header.get("x-request-id");
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

/**
 * Gives every request an id, the client's x-request-id or a new one, echoed in the response headers
 * (also of errors that Connect raises before any interceptor runs).
 */
export function assignRequestId(req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): void {
  const given = req.headers["x-request-id"];
  const requestId = (typeof given === "string" && /^[\x21-\x7e]{1,128}$/.test(given) && given) || randomUUID();
  req.headers["x-request-id"] = requestId;
  res.setHeader("x-request-id", requestId);
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

/**
 * A unary RPC that has not finished within timeoutMs fails with UNAVAILABLE. PostgreSQL enforces
 * statement_timeout itself, but a database that stopped answering on an open connection cannot, so
 * the caller gets a fast, retryable answer instead of hanging until its own deadline.
 */
export function failFast(timeoutMs: number): Interceptor {
  return (next) => (req) => (req.stream || req.method.methodKind !== "unary" ? next(req) : withDeadline(next(req), timeoutMs, "storage"));
}

/** Verifies the bearer token and puts the caller into the context. */
export function authenticate(verifier: TokenVerifier): Interceptor {
  return (next) => async (req) => {
    const caller = await verifier.verifyHeader(req.header.get("authorization"));
    req.contextValues.set(callerKey, { ...caller, signal: req.signal });
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
